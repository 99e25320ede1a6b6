"""Conversation checkpoints against the running server: chats played at once, turn after turn, through the real
HTTP API on loopback get the replies they get without checkpoints, while later turns start from the earlier turns'
checkpoints (app/lm/decoding.py `ModelRunner.prefill`). On the tiny model (float32), stateless and stored sessions."""
from __future__ import annotations

import threading

import httpx

from app.lm.tiny import build_tiny_lm, default_corpus
from app.server import build_app, build_bot
from app.settings import Settings
from tests.conftest import LiveServer

CHATS = [
    ["hi there, how are you?", "what do you like to do?", "do you like boats?", "and bread?"],
    ["tell me about the sea", "is it cold?", "thanks, bye"],
    ["hello", "i like cats", "do you have pets?", "what are their names?"],
]


def play(url: str, chat: list[str], out: dict, key: int, stored: bool) -> None:
    """One chat, turn after turn: stateless through /v1/chat/completions (the whole history each time), or stored
    through /api/chat (the server keeps the session)."""
    with httpx.Client(timeout=120) as client:
        messages, replies, session = [], [], None
        for text in chat:
            if stored:
                body = {"message": text, "user": f"u{key}", **({"session_id": session} if session else {})}
                r = client.post(url + "/api/chat", json=body)
                assert r.status_code == 200, r.text
                session, reply = r.json()["session_id"], r.json()["reply"]
            else:
                messages.append({"role": "user", "content": text})
                r = client.post(url + "/v1/chat/completions", json={"model": "fsb", "max_tokens": 12,
                                                                     "messages": messages})
                assert r.status_code == 200, r.text
                reply = r.json()["choices"][0]["message"]["content"]
                messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
        out[key] = replies


def run_all(tmp_path, checkpoint_mb: int):
    lm = build_tiny_lm(default_corpus(), checkpoint_mb=checkpoint_mb)
    settings = Settings.load(env={}, model="tiny", data_dir=tmp_path / f"data-{checkpoint_mb}", selector="off",
                             starter_kb=False)
    bot = build_bot(settings, lm=lm)
    out: dict = {}
    with LiveServer(build_app(settings, bot=bot)) as server:
        threads = [threading.Thread(target=play, args=(server.url, chat, out, i, i % 2 == 1))
                   for i, chat in enumerate(CHATS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out, lm.prefix_cache


def test_chats_at_once_get_the_same_replies_with_checkpoints_and_later_turns_use_them(tmp_path):
    without, cache_off = run_all(tmp_path, 0)
    with_cp, cache_on = run_all(tmp_path, 64)
    assert len(without) == len(CHATS) and with_cp == without
    assert cache_off.checkpoint_hits == 0 and cache_off.checkpoint_held == 0
    # every turn after a chat's first starts from a checkpoint of its own chat (the interleaved ones do not match)
    later_turns = sum(len(c) - 1 for c in CHATS)
    assert cache_on.checkpoint_hits >= later_turns, (cache_on.checkpoint_hits, later_turns)
    assert 0 < cache_on.checkpoint_held <= 64 * 2**20
