"""The HTTP API on a real loopback server, through the real openai client and raw HTTP for bad input."""
from __future__ import annotations

import json

import httpx as _httpx

httpx = _httpx.Client(timeout=60)
import openai
import pytest

from app.lm import LMError
from tests.conftest import LiveServer


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_health_and_models(live_server):
    answer = httpx.get(live_server.url + "/healthz")
    health = answer.json()
    assert answer.status_code == 200
    assert {k: health[k] for k in ("status", "model", "skills", "can_start", "active", "waiting", "capacity")} == {
        "status": "ok", "model": "tiny", "skills": len(live_server.bot.skills.all()), "can_start": True,
        "active": 0, "waiting": 0, "capacity": live_server.bot.settings.max_active}
    ids = [m.id for m in client(live_server).models.list().data]
    assert ids[0] == "fsb" and "fsb:persona" in ids


def test_chat_completion_plain_and_streamed_give_the_same_reply(live_server):
    c = client(live_server)
    messages = [{"role": "user", "content": "hi! what do you like to do?"}]
    plain = c.chat.completions.create(model="fsb:persona", messages=messages, max_tokens=12)
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    finish = plain.choices[0].finish_reason
    assert finish == ("length" if plain.usage.completion_tokens == 12 else "stop")
    assert 0 < plain.usage.completion_tokens <= 12 and text and "\n" not in text
    chunks = list(c.chat.completions.create(model="fsb:persona", messages=messages, max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    assert len([ch for ch in chunks if ch.choices[0].delta.content]) > 1  # really streamed, piece by piece


def test_stop_strings_developer_messages_and_n_as_openai_clients_send_them(live_server):
    """``stop`` cuts the reply before the first stop string, plain and streamed (it used to be ignored); a
    ``developer`` message is a system message (it used to be a 400); ``n`` other than 1 is a 400 that says so (it used
    to be ignored, one choice returned)."""
    c = client(live_server)
    messages = [{"role": "user", "content": "hi! what do you like to do?"}]
    full = c.chat.completions.create(model="fsb:persona", messages=messages, max_tokens=16).choices[0].message.content
    assert len(full) > 6
    stop = full[3:5]  # the tiny model's greedy reply, cut before the first place these two characters occur
    want = full[: full.index(stop)]
    cut = c.chat.completions.create(model="fsb:persona", messages=messages, max_tokens=16, stop=[stop, "never seen"])
    assert cut.choices[0].message.content == want and cut.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="fsb:persona", messages=messages, max_tokens=16, stop=stop,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"

    as_system = c.chat.completions.create(model="fsb:persona", max_tokens=8,
                                          messages=[{"role": "system", "content": "Be brief."}] + messages)
    as_developer = c.chat.completions.create(model="fsb:persona", max_tokens=8,
                                             messages=[{"role": "developer", "content": "Be brief."}] + messages)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="fsb", messages=messages, max_tokens=4, n=2)
    assert err.value.body["param"] == "n" and "only n=1 is served" in err.value.body["message"]
    assert c.chat.completions.create(model="fsb", messages=messages, max_tokens=4, n=1).choices


def test_stream_ends_with_done(live_server):
    body = {"model": "fsb", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", live_server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "fsb", "messages": [', 400, None),
    (b'{"model": "fsb", "messages": []}', 400, "messages"),
    (b'{"model": "fsb", "messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content"),
    (b'{"model": "fsb", "messages": [{"role": "robot", "content": "hi"}]}', 400, "messages.0.role"),
    (b'{"model": "fsb", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, '
     b'"tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, '
     b'{"role": "user", "content": "ok"}]}', 400, "messages.1.content"),
    (b'{"model": "fsb", "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "1", '
     b'"content": "42"}]}', 400, "messages.1.role"),
    (b'{"model": "fsb", "messages": [{"role": "user", "content": [{"type": "image_url", '
     b'"image_url": {"url": "http://x/y.png"}}]}]}', 400, "messages.0.content"),
    (b'{"model": "fsb", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream"),
    (b'{"model": "fsb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    (b'{"model": "fsb:no-such-skill", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    (b'{"model": "fsb", "messages": [{"role": "assistant", "content": "hi"}]}', 400, "messages"),
    (b'[1, 2, 3]', 400, None),
])
def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(live_server, body, status, param):
    r = httpx.post(live_server.url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert (err["param"] or "").startswith(param)
    assert httpx.get(live_server.url + "/healthz").status_code == 200


def test_oversized_message_and_body_are_refused(live_server):
    limit = live_server.bot.settings.max_message_chars
    r = httpx.post(live_server.url + "/v1/chat/completions",
                   json={"model": "fsb", "messages": [{"role": "user", "content": "x" * (limit + 1)}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "message_too_long"
    huge = b'{"model": "fsb", "messages": [{"role": "user", "content": "' + b"y" * 2_000_000 + b'"}]}'
    r = httpx.post(live_server.url + "/v1/chat/completions", content=huge,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError):
        client(live_server).chat.completions.create(model="fsb", messages=[])


class FailingLM:
    """The tiny model, but it fails after a few pieces, as a GPU running out of memory would."""

    def __init__(self, lm, fail_after: int):
        self._lm, self.fail_after = lm, fail_after
        self.name, self.context_length = lm.name, lm.context_length

    def count_tokens(self, text):
        return self._lm.count_tokens(text)

    def generate(self, prompt, **kw):
        for i, piece in enumerate(self._lm.generate(prompt, **kw)):
            if i == self.fail_after:
                raise LMError("the model failed while generating: simulated device fault")
            yield piece


def test_model_error_mid_stream_ends_that_stream_with_an_error_event(settings, tiny_lm):
    from app.server import build_app, build_bot

    bot = build_bot(settings, lm=FailingLM(tiny_lm, fail_after=2))
    with LiveServer(build_app(settings, bot=bot)) as server:
        body = {"model": "fsb", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "generation_failed" and "simulated device fault" in error["message"]
        assert len(events) == 1 + 2 + 2  # role chunk, two content pieces, the error, [DONE]
        with pytest.raises(openai.APIError, match="simulated"):
            list(client(server).chat.completions.create(model="fsb", messages=body["messages"], stream=True))
        assert httpx.get(server.url + "/healthz").status_code == 200


def test_sessions_keep_their_own_history_and_traces(live_server):
    """Two sessions chat through the native API; each keeps its own history, in order."""
    url = live_server.url + "/api/chat"
    a = httpx.post(url, json={"message": "hello from a"}).json()
    b = httpx.post(url, json={"message": "hello from b"}).json()
    httpx.post(url, json={"message": "second from a", "session_id": a["session_id"]})
    sa = httpx.get(f"{live_server.url}/api/sessions/{a['session_id']}").json()
    sb = httpx.get(f"{live_server.url}/api/sessions/{b['session_id']}").json()
    assert [m["content"] for m in sa["messages"] if m["role"] == "user"] == ["hello from a", "second from a"]
    assert [m["content"] for m in sb["messages"] if m["role"] == "user"] == ["hello from b"]
    assert a["skill"] == "persona" and a["trace"]["skill"] == "persona" and a["reply"] == sa["messages"][1]["content"]
    assert [s["step"] for s in sa["messages"][1]["trace"]["steps"]] == ["select", "prompt", "generate"]


def test_sessions_survive_a_restart(settings, tiny_lm):
    from app.server import build_app, build_bot

    with LiveServer(build_app(settings, bot=build_bot(settings, lm=tiny_lm))) as server:
        sid = httpx.post(server.url + "/api/chat", json={"message": "remember me"}).json()["session_id"]
    with LiveServer(build_app(settings, bot=build_bot(settings, lm=tiny_lm))) as server:
        session = httpx.get(f"{server.url}/api/sessions/{sid}").json()
        assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
        assert session["messages"][0]["content"] == "remember me"
        r = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "fsb", "session_id": sid, "messages": [{"role": "user", "content": "still there?"}],
            "max_tokens": 5})
        assert r.status_code == 200
        assert len(httpx.get(f"{server.url}/api/sessions/{sid}").json()["messages"]) == 4
        assert httpx.get(f"{server.url}/api/sessions/nope").status_code == 404
