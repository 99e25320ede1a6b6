"""The skill lab (`app.lab`, ``fsb skills try``, the web chat's "Skill lab" tab) on the tiny model: a draft is
validated with its line numbers, rendered within the budget, answered with the draft forced through the bot's own
turn, ranked by the bot's own selector, and saved only when valid — the running bot never sees it before."""
from __future__ import annotations

import json
import shutil

import pytest

from app.lab import DraftInvalid, SaveRefused, SkillLab

DRAFT = """\
name: recipes
description: Suggests a simple recipe from the ingredients the user has.
kind: response
retriever: none
template: |
  Dialogue:
  {{ history }}
generation: {max_new_tokens: 16}
examples:
  - dialogue:
      - ["what can I cook with leeks and potatoes ?", "a leek and potato soup : soften the leeks , add the potatoes and stock , simmer twenty minutes ."]
  - dialogue:
      - ["I have eggs , spinach and cheese , any idea ?", "a spinach omelette : whisk the eggs , wilt the spinach , fold in the cheese ."]
"""
PROMPT = """\
Dialogue:
User: what can I cook with leeks and potatoes ?
Assistant: a leek and potato soup : soften the leeks , add the potatoes and stock , simmer twenty minutes .

Dialogue:
User: I have eggs , spinach and cheese , any idea ?
Assistant: a spinach omelette : whisk the eggs , wilt the spinach , fold in the cheese .

Dialogue:
User: what can I cook with rice ?
Assistant:"""


def broken(line: int, text: str) -> str:
    """DRAFT with its ``line``-th line (1-based) replaced."""
    lines = DRAFT.splitlines()
    lines[line - 1] = text
    return "\n".join(lines) + "\n"


@pytest.fixture
def bot(settings, tiny_lm, tmp_path):
    """A bot over a copy of the shipped skills (the lab may save into it) whose history selector is the
    embedding one over a deterministic embedder: ranking is fast and repeatable."""
    from app.server import build_bot
    from retrievers.embed import HashingEmbedder

    skills = tmp_path / "skills"
    shutil.copytree(settings.skills_dir, skills)
    s = settings.replace(skills_dir=skills, selector="embedding", safety=False)
    bot = build_bot(s, lm=tiny_lm, embedder=HashingEmbedder())
    yield bot
    bot.close()


@pytest.fixture
def lab(bot):
    return SkillLab(bot)


# ------------------------------------------------------------------------------------------------- validate
@pytest.mark.parametrize("line, text, message", [
    (3, "kind: response: oops", "YAML syntax error"),
    (4, "retreiver: none", "unknown key 'retreiver'"),
    (7, "  {{ history }", "template:"),
    (4, "query_skill: no-such-parser", "query_skill 'no-such-parser' is not an installed skill"),
    (6, "  Persona: {{ persona }}", "the template uses a field this example lacks"),
])
def test_a_broken_draft_is_reported_at_its_line(lab, line, text, message):
    errors = lab.validate(broken(line, text))
    assert errors, text
    found = errors[0]
    # the persona line breaks example 1, which the loader reports at that example's line
    assert found.line == (10 if "persona" in text else line), errors
    assert message in found.message
    label = "draft.yaml" if "YAML" in message else "recipes.yaml"  # a file that does not parse has no name yet
    assert str(found) == f"{label}:{found.line}: {found.message}"


def test_a_field_a_live_turn_cannot_fill_is_a_problem_too(lab):
    text = DRAFT.replace("  Dialogue:\n", "  Mood: {{ mood }}\n  Dialogue:\n").replace(
        '  - dialogue:\n', '  - mood: calm\n    dialogue:\n')
    errors = lab.validate(text)
    assert [e.message.split(";")[0] for e in errors] == ["a live turn cannot render: 'mood' is undefined"]
    assert lab.validate(text + "defaults:\n  mood: cheerful\n") == []


def test_the_starter_draft_is_a_renamed_copy_of_an_installed_skill_and_valid(lab, bot):
    text = lab.starter()
    assert lab.validate(text) == []
    skill = lab.load(text)
    assert skill.name == "my-skill" and skill.examples == bot.skills.get(bot.settings.default_skill).examples
    assert lab.load(lab.starter(like="dailydialog", name="my-dd")).template == bot.skills.get("dailydialog").template


# --------------------------------------------------------------------------------------------------- render
def test_a_valid_draft_renders_its_prompt_with_its_token_count_against_the_budget(lab, bot):
    assert lab.validate(DRAFT) == []
    rendered = lab.render(DRAFT, "what can I cook with rice ?")
    assert rendered.text == PROMPT
    assert rendered.tokens == bot.lm.count_tokens(PROMPT)
    assert rendered.budget == min(bot.settings.context_tokens, bot.lm.context_length)
    assert (rendered.examples, rendered.dropped, rendered.max_new_tokens) == (2, 0, 16)
    assert rendered.summary().startswith(f"{rendered.tokens} of {rendered.budget} tokens (+16 for the reply), 2 ")


def test_examples_that_do_not_fit_the_budget_are_dropped_and_counted(lab, bot, monkeypatch):
    first, _, query = PROMPT.split("\n\n")
    budget = bot.lm.count_tokens(query) + 16 + bot.lm.count_tokens(first + "\n\n") + 1
    monkeypatch.setattr(bot, "settings", bot.settings.replace(context_tokens=budget))
    rendered = lab.render(DRAFT, "what can I cook with rice ?")
    assert (rendered.examples, rendered.dropped) == (1, 1)
    assert rendered.text == "\n\n".join(PROMPT.split("\n\n")[::2])


# ----------------------------------------------------------------------------------------------------- chat
def test_chat_forces_the_draft_through_the_bots_turn_and_leaves_the_bot_unchanged(lab, bot):
    before = sorted(p.name for p in bot.settings.skills_dir.iterdir())
    reply = lab.chat(DRAFT, [{"role": "user", "content": "what can I cook with rice ?"}])
    assert reply.skill == "recipes"
    assert reply.prompt == PROMPT  # the turn's own prompt is the one the lab shows
    assert reply.trace["selection"]["method"] == "forced"
    assert reply.completion_tokens <= 16
    assert "recipes" not in bot.skills
    assert sorted(p.name for p in bot.settings.skills_dir.iterdir()) == before


def test_a_broken_draft_cannot_chat(lab):
    with pytest.raises(DraftInvalid) as info:
        lab.chat(broken(3, "kind: response: oops"), [{"role": "user", "content": "hi"}])
    assert info.value.errors[0].line == 3


# ----------------------------------------------------------------------------------------------------- rank
def test_rank_places_the_draft_among_the_installed_response_skills_with_the_bots_selector(lab, bot):
    installed = sorted(s.name for s in bot.skills.all("response") if s.selector_shots > 0)
    on_topic, off_topic = lab.rank(DRAFT, ["what can I cook with leeks and potatoes tonight ?",
                                           "can you book me a taxi to the train station ?"])
    assert (on_topic.skill, on_topic.rank, on_topic.winner) == ("recipes", 1, "recipes")
    assert on_topic.of == len(installed) + 1
    assert on_topic.method == bot.selector.method == "embedding"
    assert on_topic.top[0] == ("recipes", on_topic.score) and len(on_topic.top) == 3
    assert off_topic.rank > 1 and off_topic.winner in installed
    scores = [s for _, s in off_topic.top]
    assert scores == sorted(scores, reverse=True)
    # the bot's own selector still chooses among the installed skills only
    assert "recipes" not in bot.selector.select([["what can I cook with leeks and potatoes ?", ""]]).scores


def test_a_draft_the_selector_never_picks_is_not_ranked(lab):
    (rank,) = lab.rank(DRAFT.replace("retriever: none", "retriever: none\nselector_shots: 0"), ["hello"])
    assert rank.rank is None and "selector_shots: 0" in rank.note


# ----------------------------------------------------------------------------------------------------- save
def test_save_writes_the_skill_file_and_the_registry_serves_it(lab, bot):
    assert "recipes" not in bot.skills
    path = lab.save(DRAFT)
    assert path == bot.settings.skills_dir / "recipes.yaml"
    assert path.read_text(encoding="utf-8") == DRAFT
    assert bot.skills.get("recipes").description.startswith("Suggests a simple recipe")
    assert not [p for p in bot.settings.skills_dir.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(SaveRefused, match="recipes.yaml already exists"):
        lab.save(DRAFT.replace("a simple recipe", "one recipe"))
    lab.save(DRAFT.replace("a simple recipe", "one recipe"), overwrite=True)
    assert bot.skills.get("recipes").description.startswith("Suggests one recipe")


def test_a_shipped_skill_is_not_replaced_unless_asked(lab, bot):
    text = DRAFT.replace("name: recipes", "name: persona")
    with pytest.raises(SaveRefused, match=r"persona.yaml already exists \(a shipped skill\)"):
        lab.save(text)
    assert bot.skills.get("persona").description != "Suggests a simple recipe from the ingredients the user has."


def test_a_broken_draft_is_never_saved(lab, bot):
    before = sorted(p.name for p in bot.settings.skills_dir.iterdir())
    with pytest.raises(DraftInvalid):
        lab.save(broken(7, "  {{ history }"))
    assert sorted(p.name for p in bot.settings.skills_dir.iterdir()) == before
    assert "recipes" not in bot.skills and not bot.skills.errors


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def cli_env(tmp_path, settings):
    skills = tmp_path / "skills"
    shutil.copytree(settings.skills_dir, skills)
    env = {"FSB_MODEL": "tiny", "FSB_DATA_DIR": str(tmp_path / "data"), "FSB_SKILLS_DIR": str(skills),
           "FSB_STARTER_KB": "0", "FSB_SELECTOR": "embedding", "FSB_SAFETY": "0"}
    return env, skills


def test_fsb_skills_try_reports_a_broken_draft_by_file_and_line_before_loading_a_model(tmp_path, cli_env):
    from click.testing import CliRunner

    from app.cli import cli

    env, _ = cli_env
    draft = tmp_path / "recipes.yaml"
    draft.write_text(broken(7, "  {{ history }"), encoding="utf-8")
    result = CliRunner().invoke(cli, ["skills", "try", str(draft), "--message", "hi"], env=env)
    assert result.exit_code == 1
    assert result.output.startswith(f"{draft}:7: template: ")
    assert "loading" not in result.output


def test_fsb_skills_try_prints_prompt_reply_and_rank_and_saves(tmp_path, cli_env):
    from click.testing import CliRunner

    from app.cli import cli

    env, skills = cli_env
    draft = tmp_path / "drafts" / "any-name.yaml"
    draft.parent.mkdir()
    draft.write_text(DRAFT, encoding="utf-8")
    args = ["skills", "try", str(draft), "--message", "what can I cook with rice ?", "--message",
            "can you book me a taxi to the train station ?"]
    result = CliRunner().invoke(cli, args + ["--json", "--save"], env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["valid"], out["skill"], out["kind"]) == (True, "recipes", "response")
    assert out["prompt"]["text"] == PROMPT
    assert out["prompt"]["examples"] == 2 and out["prompt"]["fits"]
    assert [m["message"] for m in out["messages"]] == args[4::2]
    assert all(m["skill"] == "recipes" for m in out["messages"])
    ranks = [m["rank"] for m in out["messages"]]
    assert ranks[0]["rank"] == 1 and ranks[0]["method"] == "embedding" and ranks[1]["rank"] > 1
    assert out["saved"] == str(skills / "recipes.yaml") and (skills / "recipes.yaml").read_text() == DRAFT

    text = CliRunner().invoke(cli, args[:5], env=env)  # the readable form; saving again is not asked
    assert text.exit_code == 0, text.output
    assert f"{draft}: valid, response skill recipes, 2 examples" in text.output
    assert PROMPT in text.output and "tokens (+16 for the reply), 2 examples fit" in text.output
    assert "\n> what can I cook with rice ?\nrecipes: " in text.output
    assert "rank 1 of " in text.output


# -------------------------------------------------------------------------------------------------- browser
@pytest.fixture
def lab_server(tmp_path, settings, tiny_lm):
    """The web app (chat + lab tab) over a copy of the shipped skills, so saving never writes the repo's."""
    from app.server import build_app, build_bot
    from retrievers.embed import HashingEmbedder
    from tests.conftest import LiveServer

    skills = tmp_path / "skills"
    shutil.copytree(settings.skills_dir, skills)
    s = settings.replace(skills_dir=skills, selector="embedding", safety=False)
    bot = build_bot(s, lm=tiny_lm, embedder=HashingEmbedder())
    with LiveServer(build_app(s, bot=bot)) as server:
        server.bot = bot
        yield server
    bot.close()


def set_editor(page, text: str) -> None:
    """Replace the code editor's whole text, as typing would (CodeMirror: select all, then insert)."""
    editor = page.locator("#fsb-lab-editor .cm-content")
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(text)


@pytest.mark.browser
def test_the_skill_lab_tab_validates_chats_ranks_and_saves_a_draft(lab_server):
    import httpx
    from playwright.sync_api import expect

    from tests.test_browser import browser_page

    bot = lab_server.bot
    with browser_page(lab_server.url) as page:
        page.get_by_role("tab", name="Skill lab").click()
        errors = page.locator("#fsb-lab-errors")
        expect(errors).to_contain_text("valid", timeout=30_000)  # the starter draft

        set_editor(page, broken(3, "kind: response: oops"))
        expect(errors).to_contain_text("line 3: YAML syntax error", timeout=30_000)
        expect(page.locator("#fsb-lab-tokens")).to_contain_text("Fix the problems", timeout=10_000)

        set_editor(page, DRAFT)
        expect(errors).to_contain_text("valid: response skill recipes, 2 examples", timeout=30_000)
        page.locator("#fsb-lab-samples textarea").fill("what can I cook with rice ?")
        expect(page.locator("#fsb-lab-prompt textarea")).to_have_value(PROMPT, timeout=30_000)
        expect(page.locator("#fsb-lab-tokens")).to_contain_text("(+16 for the reply), 2 examples fit")

        box = page.locator("#fsb-lab-input textarea")
        box.fill("what can I cook with rice ?")
        box.press("Enter")
        chat = page.locator("#fsb-lab-chat")
        chat.get_by_text("draft: recipes").wait_for(timeout=60_000)
        assert "recipes" not in bot.skills  # trying never installs

        page.locator("#fsb-lab-samples textarea").fill("what can I cook with leeks and potatoes tonight ?\n"
                                                       "can you book me a taxi to the train station ?")
        page.locator("#fsb-lab-rank").click()
        ranks = page.locator("#fsb-lab-ranks")
        expect(ranks).to_contain_text("what can I cook with leeks and potatoes tonight ?", timeout=60_000)
        expect(ranks).to_contain_text("1 of ")
        expect(ranks).to_contain_text("recipes")

        page.locator("#fsb-lab-save").click()
        expect(page.locator("#fsb-lab-saved")).to_contain_text("recipes.yaml", timeout=30_000)
        expect(page.locator("#fsb-lab-saved")).to_contain_text("fsb:recipes")
        page.screenshot(path=str(bot.settings.data_dir / "skill-lab.png"), full_page=True)
    assert (bot.settings.skills_dir / "recipes.yaml").read_text(encoding="utf-8") == DRAFT
    models = httpx.get(lab_server.url + "/v1/models").json()
    assert "fsb:recipes" in [m["id"] for m in models["data"]]
