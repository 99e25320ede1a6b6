"""The family vote against the running server: a booking chat that moves from a hotel to a taxi is answered by the
taxi skill, and small talk that turns into a booking by the booking skill (the shipped skill files, routed through the
real HTTP API on loopback); with the vote off, the history's skill keeps the turn. The embedding selector (no LM scoring) on the tiny model, so the routing is deterministic."""
from __future__ import annotations

import httpx
import pytest

from app.lm.tiny import build_tiny_lm, default_corpus
from app.server import build_app, build_bot
from app.settings import Settings
from retrievers.embed import HashingEmbedder
from tests.conftest import LiveServer

CHAT = [
    ("Hi, I need a hotel in the north of town with free parking.", "The Acorn Guest House is in the north and has "
     "free parking. Shall I book it?"),
    ("Yes, for two people, three nights from Friday.", "Booked! Your reference number is AB12CD."),
    ("Does the hotel have wifi too?", "Yes, the Acorn Guest House has free wifi."),
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_lm(default_corpus())


SMALL_TALK = [
    ("Hi! How's your day going?", "Pretty good, thanks! I just got back from a walk. How about yours?"),
    ("Busy, I've been packing all morning.", "Packing? That sounds exciting, are you going somewhere nice?"),
]


def routed(tmp_path, tiny, margin: float, last: str, chat=CHAT, embedder=None) -> tuple[str, dict]:
    settings = Settings.load(env={"FSB_SELECTOR_FAMILY_MARGIN": str(margin)}, model="tiny", selector="embedding",
                             safety=False, data_dir=tmp_path / f"data-{margin}", starter_kb=False)
    bot = build_bot(settings, lm=tiny, embedder=embedder or HashingEmbedder())
    messages = [m for u, a in chat for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    messages.append({"role": "user", "content": last})
    with LiveServer(build_app(settings, bot=bot)) as server, httpx.Client(timeout=120) as client:
        r = client.post(server.url + "/v1/chat/completions", json={"model": "fsb", "max_tokens": 4,
                                                                    "messages": messages})
        assert r.status_code == 200, r.text
        first = client.post(server.url + "/api/chat", json={"message": last, "user": "u1"})
    assert first.status_code == 200, first.text
    return r.json()["fsb"]["skill"], first.json()


def test_a_booking_that_moves_to_a_taxi_is_answered_by_the_taxi_skill(tmp_path, tiny):
    last = "I also need a taxi from the hotel to the train station at 9am on Saturday."
    assert routed(tmp_path, tiny, 0.0, last)[0] == "mwoz-hotel"  # the vote off: the history's hotel answers
    skill, alone = routed(tmp_path, tiny, 0.2, last)
    assert skill == "mwoz-taxi"
    # the same message alone in a new stored session (/api/chat): the trace shows the vote's scores
    assert alone["skill"] == "mwoz-taxi", alone
    assert alone["trace"]["selection"]["family"]["scores"]["mwoz-taxi"] > 0


def test_a_closing_line_keeps_the_booking_where_it_is(tmp_path, tiny):
    assert routed(tmp_path, tiny, 0.2, "Thanks, that's all I needed!")[0] == "mwoz-hotel"


def test_small_talk_that_turns_into_a_booking_is_answered_by_the_booking_skill(tmp_path, tiny):
    from retrievers.embed import default_embedder

    minilm = default_embedder()  # the shipped embedder: the hashing one matches the word "hotel" in the history too
    last = "Yes! I need a hotel in the centre of town for three nights, with free parking."
    before, _ = routed(tmp_path, tiny, 0.0, last, chat=SMALL_TALK, embedder=minilm)
    assert not before.startswith("mwoz-")  # the vote off: the small talk's skill answers
    skill, alone = routed(tmp_path, tiny, 0.2, last, chat=SMALL_TALK, embedder=minilm)
    assert skill == "mwoz-hotel"
    assert alone["skill"] == "mwoz-hotel", alone  # the same message alone, in a new stored session
    # small talk that only mentions a trip stays with the chat
    assert not routed(tmp_path, tiny, 0.2, "We stayed in a lovely little hotel in Rome last summer.",
                      chat=SMALL_TALK, embedder=minilm)[0].startswith("mwoz-")


def test_a_booking_that_turns_into_small_talk_is_answered_by_a_chat_skill(tmp_path, tiny):
    from retrievers.embed import default_embedder

    minilm = default_embedder()
    last = "How are you doing today? Any fun plans for the weekend?"
    assert routed(tmp_path, tiny, 0.0, last, embedder=minilm)[0] == "mwoz-hotel"  # the vote off: the booking answers
    assert not routed(tmp_path, tiny, 0.2, last, embedder=minilm)[0].startswith("mwoz-")
    # a closing line and a question about the booking stay with it
    for line in ("Thanks, that's all I needed!", "Does the hotel have wifi too?"):
        assert routed(tmp_path, tiny, 0.2, line, embedder=minilm)[0] == "mwoz-hotel", line
