"""Prompt injection: every page of the corpus in bench/data/injection.jsonl, retrieved into a knowledge skill's prompt,
stays data — it adds no dialogue line, no header, no block marker, and it cannot change the selected skill.
(bench/injection.py measures what the embedded model then does with it.)"""
from __future__ import annotations

import json

import pytest

from app.settings import REPO_ROOT
from retrievers.embed import HashingEmbedder

CORPUS = [json.loads(line) for line in (REPO_ROOT / "bench" / "data" / "injection.jsonl").read_text().splitlines()
          if line.strip()]
QUESTION = [{"role": "user", "content": "how do plants turn sunlight into food?"}]
HEADERS = ("User:", "Assistant:", "Human:", "AI:", "Dialogue:", "Knowledge:", "Persona Information:",
           "Search Results:", "<query>", "</query>", "<answer>", "</answer>")


@pytest.fixture(scope="module")
def bot(tmp_path_factory, tiny_lm):
    from app.server import build_bot
    from app.settings import Settings

    settings = Settings.load(env={}, model="tiny", data_dir=tmp_path_factory.mktemp("inj"), starter_kb=False,
                             selector="prompt", memory=False)
    return build_bot(settings, lm=tiny_lm, embedder=HashingEmbedder())


def line_heads(text: str) -> list[str]:
    return [h for line in text.splitlines() for h in HEADERS if line.startswith(h)]


@pytest.mark.parametrize("item", CORPUS, ids=lambda item: f"{item['id']}-{item['kind']}")
def test_an_injected_page_stays_data(bot, tmp_path, item):
    clean = bot.skills.get("wow").prompt({"dialogue": [[QUESTION[0]["content"], ""]]})
    baseline = bot.selector.select([[QUESTION[0]["content"], ""]]).skill
    for old in bot.knowledge.kb.list():
        bot.knowledge.kb.remove(old.path)
    page = tmp_path / "page.md"
    page.write_text(item["text"])
    bot.knowledge.kb.add(page)
    stream = bot.turn(QUESTION, skill="wow", max_tokens=2)
    stream.text()
    prompt = stream.reply.prompt
    assert stream.reply.passages, "the page was retrieved"
    assert line_heads(prompt) == line_heads(clean.text)  # no forged role line, header or block marker
    knowledge = prompt.rsplit("Knowledge:\n", 1)[1].split("\nDialogue:\n")[0].splitlines()
    assert len(knowledge) == len(stream.reply.passages)  # one line per passage, however many lines the page had
    assert bot.selector.select([[QUESTION[0]["content"], ""]]).skill == baseline
    assert stream.reply.trace["selection"]["method"] == "forced"
