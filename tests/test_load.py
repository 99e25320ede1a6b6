"""Load on loopback (short, for CI; `bench/load.py` runs the long version): concurrent clients, streamed and not, get a
complete reply or a clean 429 with Retry-After, and no reply lands in another session."""
from __future__ import annotations

import threading

import httpx
import pytest

from tests.conftest import LiveServer


@pytest.fixture
def busy_server(settings, tiny_lm):
    from app.server import build_app, build_bot

    settings = settings.replace(max_active=2, max_waiting=2)
    bot = build_bot(settings, lm=tiny_lm)
    with LiveServer(build_app(settings, bot=bot)) as s:
        s.bot = bot
        yield s


def test_concurrent_clients_get_whole_replies_or_a_clean_429_and_sessions_stay_apart(busy_server):
    url = busy_server.url
    results: list[tuple[int, str, dict]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            if i % 2:
                body = {"model": "fsb", "stream": True, "max_tokens": 16,
                        "messages": [{"role": "user", "content": f"client {i} says hello"}]}
                with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code == 200:
                        text = "\n".join(line for line in r.iter_lines() if line)
                    else:
                        text = r.read().decode()
                    out = (r.status_code, text, dict(r.headers))
            else:
                r = c.post(url + "/api/chat", json={"message": f"client {i} says hello", "user": f"u{i}"})
                out = (r.status_code, r.text, dict(r.headers))
        with lock:
            results.append((i, *out))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(results) == 12
    ok = [r for r in results if r[1] == 200]
    refused = [r for r in results if r[1] != 200]
    assert len(ok) >= 4  # the 2 active + 2 waiting slots are always served
    for i, status, text, headers in refused:
        assert status == 429 and headers.get("retry-after") == "2" and '"code":"busy"' in text.replace(" ", "")
    for i, status, text, headers in ok:
        if i % 2:
            assert text.endswith("data: [DONE]") and '"finish_reason": "' in text
    # every stored session holds exactly its own client's message and one reply
    for session in busy_server.bot.store.sessions():
        msgs = busy_server.bot.store.messages(session["id"])
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert msgs[0]["content"] == f"client {session['user'][1:]} says hello"
    assert httpx.get(url + "/healthz").status_code == 200
