"""Load on loopback (short, for CI; `bench/load.py` runs the long version): concurrent clients, streamed and not, get a
complete reply or a clean 429 with Retry-After, and no reply lands in another session; the bench itself, briefly on the
tiny model with half its requests hanging up, reports what it should and ends on time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from app.settings import REPO_ROOT
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


def test_the_load_bench_with_disconnects_reports_goodput_and_ends_on_time():
    seconds, grace, drain = 5, 5, 10
    env = {**os.environ, "FSB_SELECTOR": "off", "FSB_MEMORY": "off", "FSB_MAX_ACTIVE": "2", "FSB_MAX_WAITING": "2"}
    cmd = [sys.executable, "bench/load.py", "--model", "tiny", "--clients", "4", "--seconds", str(seconds),
           "--max-tokens", "8", "--disconnect-rate", "0.5", "--timeout", "10", "--grace", str(grace),
           "--drain", str(drain), "--seed", "7", "--json"]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    # the clients stop within --seconds + --grace, and the drain within --drain more, whatever the server does
    assert result["seconds"] <= seconds + grace + 1
    assert time.monotonic() - started < 300 + seconds + grace + drain + 60  # start (<= 300 s), run, drain, stop

    for key in ("requests", "ok", "disconnected"):
        assert isinstance(result[key], int) and result[key] >= 0, key
    assert result["requests"] >= result["ok"] + result["disconnected"] > 0
    assert isinstance(result["errors"], dict)
    assert result["requests"] == result["ok"] + result["disconnected"] + sum(result["errors"].values())
    assert result["disconnected"] > 0  # about half of the requests hang up on purpose
    assert sum(result["disconnected_at"].values()) == result["disconnected"]
    assert set(result["disconnected_at"]) <= {"partial-body", "after-send", "first-chunk", "mid-stream"}
    assert isinstance(result["goodput_rps"], float) and result["goodput_rps"] >= 0
    assert result["goodput_rps"] == pytest.approx(result["ok"] / result["seconds"], rel=0.05, abs=0.01)
    assert isinstance(result["peak_rss_mb"], float) and result["peak_rss_mb"] > 0
    for key in ("p50_s", "p95_s"):  # over completed turns only: null when none completed
        assert (result[key] is None) if result["ok"] == 0 else (isinstance(result[key], float) and result[key] > 0)
    if result["ok"]:
        assert result["p50_s"] <= result["p95_s"]
    # read from the server's /metrics once the clients stop: no turn is left holding a slot or waiting for one,
    # whichever point the clients hung up at
    assert result["in_flight_after"] == 0 and result["queued_after"] == 0, (result, done.stderr[-2000:])
