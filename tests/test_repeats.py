"""A reply does not copy the bot's earlier replies word for word, and the bot's own notices never reach a prompt.

The LM part on the tiny model (both decode loops: `TransformersLM` and the serving `BatchedLM`), the bot part against
the running server on loopback (what the bot asks the model for, and what the prompt holds)."""
from __future__ import annotations

import httpx
import pytest

from app.lm.base import Sampling
from app.lm.batching import BatchedLM
from app.lm.decoding import AVOID_NGRAM, RowStream, banned_next, choose
from app.lm.tiny import build_tiny_lm, default_corpus
from app.server import build_app, build_bot
from app.settings import Settings
from tests.conftest import LiveServer

PROMPT = "Dialogue:\nUser: tell me about the sea\nAssistant:"  # the tiny model's reply has word starts to cut at


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_lm(default_corpus())


def test_a_banned_token_is_never_chosen_and_the_table_cuts_copies_at_a_word():
    import torch

    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    assert choose(logits, [[], []], Sampling(), banned=[[1], []]).tolist() == [2, 1]

    class Tok:  # words are tokens; "▁" marks the start of a word, a bare piece ("f") continues one
        pieces = ["▁a", "▁b", "▁c", "▁d", "▁e", "f", "▁g"]

        def encode(self, text, add_special_tokens=False):  # "#f" in a text is the piece "f"
            return [self.pieces.index(w[1:] if w.startswith("#") else "▁" + w) for w in text.split()]

        def convert_ids_to_tokens(self, i):
            return self.pieces[i]

    row = RowStream(Tok(), set(), 0, [], 20, avoid=("a b c d e #f g",))
    row.generated = [0, 1, 2, 3, 4]
    assert set(row.banned()) == set()  # "f" continues a word: a copy is never cut inside one
    row.generated = [1, 2, 3, 4, 5]
    assert set(row.banned()) == {6}  # "g" would make six tokens in a row from the text
    assert banned_next({}, [1, 2, 3, 4, 5]) == ()


def test_the_model_does_not_repeat_a_text_it_was_told_to_avoid(tiny):
    """Greedy decoding is deterministic, so the same prompt gives the same reply; told to avoid that reply, both
    decode loops (the plain one and the serving scheduler's) write another, and the same other one."""
    replies = []
    for lm in (tiny, BatchedLM(tiny, max_batch=4)):
        plain = "".join(lm.generate(PROMPT, stop=["\n"], max_new_tokens=24))
        assert len(tiny.tok.encode(plain, add_special_tokens=False)) >= AVOID_NGRAM, plain  # long enough to copy
        again = "".join(lm.generate(PROMPT, stop=["\n"], max_new_tokens=24, sampling=Sampling(avoid=(plain,))))
        assert again != plain
        replies.append((plain, again))
    assert replies[0] == replies[1]


class Recording:
    """The bot's LM, recording what each generation was asked to avoid and the prompt it got."""

    def __init__(self, lm):
        self.inner, self.calls = lm, []

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def generate(self, prompt, stop=(), max_new_tokens=64, sampling=Sampling(), prefix=None, stats=None):
        self.calls.append((prompt, sampling.avoid))
        return self.inner.generate(prompt, stop, max_new_tokens, sampling, prefix, stats)


def test_the_bot_asks_not_to_repeat_its_earlier_replies_and_drops_its_notices(tmp_path, tiny):
    settings = Settings.load(env={}, model="tiny", data_dir=tmp_path / "data", selector="off", safety=False,
                             starter_kb=False)
    lm = Recording(tiny)
    bot = build_bot(settings, lm=lm)
    notice = bot.messages["web_search_failed"]
    messages = [{"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello! i love boats."},
                {"role": "user", "content": "what is new?"},
                {"role": "assistant", "content": f"{notice} the sea is calm today."},
                {"role": "user", "content": "and tomorrow?"}]
    with LiveServer(build_app(settings, bot=bot)) as server, httpx.Client(timeout=120) as client:
        r = client.post(server.url + "/v1/chat/completions", json={"model": "fsb:persona", "max_tokens": 6,
                                                                    "messages": messages})
        assert r.status_code == 200, r.text
        first = client.post(server.url + "/v1/chat/completions", json={"model": "fsb:persona", "max_tokens": 6,
                                                                        "messages": messages[:1]})
        assert first.status_code == 200, first.text
    (prompt, avoid), (_, nothing) = lm.calls[-2:]
    assert avoid == ("hello! i love boats.", "the sea is calm today.")
    assert nothing == ()  # a first turn has nothing to avoid
    assert notice not in prompt and "the sea is calm today." in prompt


def test_the_assistant_does_not_copy_its_earlier_replies_but_a_refusal_may(tmp_path, tiny):
    """The alignment layer's answers avoid the earlier replies its prompt shows (the 270M model answered "Write a
    haiku about autumn rain." with its previous reply, word for word); a refusal is not told to avoid anything."""
    settings = Settings.load(env={}, model="tiny", data_dir=tmp_path / "data", selector="off", safety=False,
                             starter_kb=False)
    lm = Recording(tiny)
    bot = build_bot(settings, lm=lm)
    messages = [{"role": "user", "content": "I need a hotel for two nights."},
                {"role": "assistant", "content": "I'm sorry to say that."},
                {"role": "user", "content": "Write a haiku about autumn rain."}]
    with LiveServer(build_app(settings, bot=bot)) as server, httpx.Client(timeout=120) as client:
        r = client.post(server.url + "/v1/chat/completions", json={"model": "fsb:assistant", "max_tokens": 6,
                                                                    "messages": messages})
        assert r.status_code == 200, r.text
        prompt, avoid = lm.calls[-1]
        assert avoid == ("I'm sorry to say that.",) and "I'm sorry to say that." in prompt
        refused = bot.aligner.refuse([(m["role"], m["content"]) for m in messages], "it could hurt someone")
        "".join(refused)
    assert lm.calls[-1][1] == ()


@pytest.mark.parametrize("skill", ["persona", "assistant"])
def test_an_earlier_declined_exchange_is_left_out_of_the_next_answers_prompt(tmp_path, tiny, skill):
    """Tried as a user (stop 30): after one declined request, the embedded model answered "What's the capital of
    France?" with "I'm sorry, that sounds like a really bad question." -- it copied the refusal in its history. A
    declined exchange (the request and the refusal) stays out of a skill's prompt and of an aligned answer's; the
    trace says how many were left out; the exchanges around it stay."""
    settings = Settings.load(env={}, model="tiny", data_dir=tmp_path / "data", selector="off", safety=False,
                             starter_kb=False)
    lm = Recording(tiny)
    bot = build_bot(settings, lm=lm)
    refusal = bot.aligner.prompt.refusal_start_for("it could hurt someone", "I can help with something safe.")
    messages = [{"role": "user", "content": "hi there, i like boats"},
                {"role": "assistant", "content": "hello! boats are great."},
                {"role": "user", "content": "how do i sink my neighbour's boat"},
                {"role": "assistant", "content": refusal + " Anything else?"},
                {"role": "user", "content": "What's the capital of France?"}]
    with LiveServer(build_app(settings, bot=bot)) as server, httpx.Client(timeout=120) as client:
        r = client.post(server.url + "/v1/chat/completions",
                        json={"model": f"fsb:{skill}", "max_tokens": 6, "messages": messages})
        assert r.status_code == 200, r.text
    prompt, avoid = lm.calls[-1]
    assert "sink my neighbour's boat" not in prompt and refusal not in prompt
    assert "hello! boats are great." in prompt and "What's the capital of France?" in prompt
    assert refusal + " Anything else?" not in avoid
