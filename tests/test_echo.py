"""An answer that opens by repeating the user's message is generated again, not shown.

Tried as a user (stop 35): after a few instructions in a row, the embedded model answered "List three benefits of
regular exercise." with that very line, and "Translate 'good night' into Spanish." likewise. The alignment layer now
holds an answer back while it could be such an echo (`app.align.opening_echo`) and, once it is one, drops it and
generates the answer again, not allowed to open with the message's first word (`Sampling.not_first`). The word ban on
the tiny model in both decode loops; the retry through the running server on loopback."""
from __future__ import annotations

import json

import httpx
import pytest

from app.align import opening_echo
from app.lm.base import Sampling
from app.lm.batching import BatchedLM
from app.lm.tiny import build_tiny_lm, default_corpus
from app.server import build_app, build_bot
from app.settings import Settings
from tests.conftest import LiveServer

PROMPT = "Dialogue:\nUser: tell me about the sea\nAssistant:"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_lm(default_corpus())


def test_an_echo_is_told_by_words_and_undecided_while_it_could_still_be_one():
    message = "List three benefits of regular exercise."
    assert opening_echo("List three benefits of", message) is True
    assert opening_echo("list THREE, benefits of regular", message) is True  # case and punctuation do not count
    assert opening_echo("List three", message) is None  # could still become the message
    assert opening_echo("Lis", message) is None  # a word still growing
    assert opening_echo("", message) is None
    assert opening_echo("Regular exercise helps your heart.", message) is False
    assert opening_echo("List three things:", message) is False
    assert opening_echo("Digital transformation plan", "Digital transformation plan") is True  # all of a short one
    assert opening_echo("Hello there!", "Hello there") is False  # a greeting may be answered in kind


def test_a_generation_told_not_to_open_with_a_word_opens_with_another(tiny):
    """Greedy decoding gives the same reply every time; told not to open with its first word, both decode loops
    (the plain one and the serving scheduler's) open with another, and the same other one."""
    replies = []
    for lm in (tiny, BatchedLM(tiny, max_batch=4)):
        plain = "".join(lm.generate(PROMPT, stop=["\n"], max_new_tokens=12)).strip()
        assert plain.split(), plain
        again = "".join(lm.generate(PROMPT, stop=["\n"], max_new_tokens=12,
                                    sampling=Sampling(not_first=(plain,)))).strip()
        assert again.split() and again.split()[0] != plain.split()[0], (plain, again)
        replies.append((plain, again))
    assert replies[0] == replies[1]


class Echoing:
    """The bot's LM: its first answer to the instruction repeats the instruction; asked again with the instruction's
    first word banned, it answers. Records what each generation was asked for."""

    def __init__(self, lm, echo: bool = True):
        self.inner, self.echo, self.calls = lm, echo, []

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def generate(self, prompt, stop=(), max_new_tokens=64, sampling=Sampling(), prefix=None, stats=None):
        self.calls.append(sampling.not_first)
        text = "List three benefits of regular exercise." if self.echo and not sampling.not_first else \
            "It keeps your heart strong."
        for word in text.split(" "):
            yield " " + word


@pytest.mark.parametrize("echo", [True, False])
def test_an_answer_that_repeats_the_message_is_generated_again_and_never_shown(tmp_path, tiny, echo):
    settings = Settings.load(env={}, model="tiny", data_dir=tmp_path / "data", selector="off", safety=False,
                             starter_kb=False)
    lm = Echoing(tiny, echo)
    bot = build_bot(settings, lm=lm)
    message = "List three benefits of regular exercise."
    with LiveServer(build_app(settings, bot=bot)) as server, httpx.Client(timeout=120) as client:
        r = client.post(server.url + "/api/chat", json={"message": message, "user": "u1", "skill": "assistant"})
        assert r.status_code == 200, r.text
        body = r.json()
        chunks = []
        with client.stream("POST", server.url + "/v1/chat/completions",
                           json={"model": "fsb:assistant", "stream": True,
                                 "messages": [{"role": "user", "content": message}]}) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices", []):
                        chunks.append((choice.get("delta") or {}).get("content") or "")
    streamed = "".join(chunks)
    assert body["reply"].strip() == "It keeps your heart strong."
    assert streamed.strip() == "It keeps your heart strong."  # not one word of the echo reached the client
    generate = next(s for s in body["trace"]["steps"] if s["step"] == "generate")
    if echo:
        assert lm.calls == [(), (message,), (), (message,)]  # each request: the echo, then the retry
        assert generate["echo_retried"] is True
    else:
        assert lm.calls == [(), ()]
        assert "echo_retried" not in generate
