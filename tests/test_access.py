"""Access: with API keys set, every API route and the web chat refuse without a key, and users are kept apart."""
from __future__ import annotations

import httpx as _httpx

httpx = _httpx.Client(timeout=60)
import pytest

from tests.conftest import LiveServer

KEYS = "alice:key-a,bob:key-b"
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


@pytest.fixture
def server(settings, tiny_lm):
    from app.server import build_app, build_bot

    settings = settings.replace(api_key=KEYS)
    bot = build_bot(settings, lm=tiny_lm)
    with LiveServer(build_app(settings, bot=bot)) as s:
        s.bot = bot
        yield s


CHAT = {"model": "fsb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT),
          ("POST", "/api/chat", {"message": "hi"}), ("GET", "/api/sessions", None), ("GET", "/api/skills", None),
          ("GET", "/api/memory", None), ("DELETE", "/api/memory", None), ("GET", "/openapi.json", None),
          ("GET", "/docs", None)]


@pytest.mark.parametrize("method, path, body", ROUTES)
def test_every_api_route_refuses_without_a_valid_key(server, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "nope"}):
        r = httpx.request(method, server.url + path, json=body, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.request(method, server.url + path, json=body, headers=A).status_code == 200
    assert httpx.request(method, server.url + path, json=body, headers={"X-API-Key": "key-b"}).status_code == 200


def test_health_stays_open_for_probes(server):
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_web_chat_needs_a_login_including_its_queue(server):
    config = httpx.get(server.url + "/config")
    assert config.status_code == 401 and config.json()["detail"]["error"] == "Not authenticated"
    r = httpx.post(server.url + "/gradio_api/queue/join", json={"data": ["hi"], "fn_index": 0,
                                                                  "session_hash": "x"})
    assert r.status_code in (401, 403)
    login = httpx.post(server.url + "/login", data={"username": "alice", "password": "wrong"})
    assert login.status_code in (400, 401)
    login = httpx.post(server.url + "/login", data={"username": "alice", "password": "key-a"})
    assert login.status_code == 200


def test_a_users_sessions_and_memories_are_not_readable_with_another_key(server):
    sid = httpx.post(server.url + "/api/chat", json={"message": "my cat is called Tom"}, headers=A).json()[
        "session_id"]
    assert httpx.get(f"{server.url}/api/sessions/{sid}", headers=A).status_code == 200
    assert httpx.get(f"{server.url}/api/sessions/{sid}", headers=B).status_code == 404
    assert [s["id"] for s in httpx.get(server.url + "/api/sessions", headers=B).json()] == []
    assert [s["id"] for s in httpx.get(server.url + "/api/sessions", headers=A).json()] == [sid]
    r = httpx.post(server.url + "/api/chat", json={"message": "hijack", "session_id": sid}, headers=B)
    assert r.status_code == 404
    # The turn above may already have stored what the (random) tiny model extracted; only our fact matters here.
    server.bot.knowledge.memory.add("alice", ["I have a cat called Tom."])
    facts = {m["text"]: m["id"] for m in httpx.get(server.url + "/api/memory", headers=A).json()}
    assert "I have a cat called Tom." in facts
    assert httpx.get(server.url + "/api/memory?user=alice", headers=B).json() == []
    assert httpx.get(server.url + "/api/memory", headers=B).json() == []
    fact = facts["I have a cat called Tom."]
    assert httpx.delete(f"{server.url}/api/memory/{fact}", headers=B).status_code == 404
    assert "I have a cat called Tom." in [m["text"] for m in httpx.get(server.url + "/api/memory", headers=A).json()]
    assert httpx.delete(f"{server.url}/api/memory/{fact}", headers=A).json() == {"deleted": 1}
    assert "I have a cat called Tom." not in [m["text"] for m in
                                              httpx.get(server.url + "/api/memory", headers=A).json()]
