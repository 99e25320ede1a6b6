"""Raw completion (`/v1/completions`) through the real openai client, and the per-client rate limit."""
from __future__ import annotations

import json

import httpx as _httpx
import openai
import pytest

from app.http.admission import RateLimit
from app.lm import complete
from tests.conftest import LiveServer

httpx = _httpx.Client(timeout=60)
PROMPT = "User: hi! what do you like to do?\nAssistant:"


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_completion_is_the_raw_models_continuation_plain_and_streamed(live_server, tiny_lm):
    c = client(live_server)
    expected = complete(tiny_lm, PROMPT, max_new_tokens=10)
    plain = c.completions.create(model="fsb", prompt=PROMPT, max_tokens=10)
    assert plain.object == "text_completion" and plain.choices[0].text == expected
    assert plain.usage.completion_tokens == 10 and plain.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model="fsb", prompt=PROMPT, max_tokens=10, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len([ch for ch in chunks if ch.choices[0].text]) > 1


def test_completion_stops_at_a_stop_string_and_takes_a_list_of_prompts(live_server, tiny_lm):
    full = complete(tiny_lm, PROMPT, max_new_tokens=12)
    stop = full[4:7]
    assert stop and stop in full
    out = client(live_server).completions.create(model="fsb", prompt=PROMPT, max_tokens=12, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    two = client(live_server).completions.create(model="fsb", prompt=[PROMPT, "Hello"], max_tokens=4)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].text == complete(tiny_lm, PROMPT, max_new_tokens=4)
    assert two.choices[1].text == complete(tiny_lm, "Hello", max_new_tokens=4)


@pytest.mark.parametrize("body, status, code", [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ({"model": "fsb", "prompt": ""}, 400, None),
    ({"model": "fsb", "prompt": ["a", "b"], "stream": True}, 400, None),
    ({"model": "fsb", "prompt": "word " * 5000, "max_tokens": 10}, 400, "context_length_exceeded"),
    ({"model": "fsb", "prompt": 3}, 400, "invalid_value"),
])
def test_bad_completion_requests_get_openai_errors(live_server, body, status, code):
    r = httpx.post(live_server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"] and (code is None or r.json()["error"]["code"] == code)
    assert httpx.get(live_server.url + "/healthz").status_code == 200


class FailingLM:
    """The tiny model, but generation raises after its first piece."""

    def __init__(self, lm):
        self._lm = lm

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def generate(self, prompt, **kw):
        for i, piece in enumerate(self._lm.generate(prompt, **kw)):
            if i == 1:
                raise RuntimeError("device lost")
            yield piece


def test_a_model_error_mid_completion_stream_ends_it_with_an_error_event(live_server, tiny_lm):
    live_server.bot.lm = FailingLM(tiny_lm)
    try:
        with httpx.stream("POST", live_server.url + "/v1/completions",
                          json={"model": "fsb", "prompt": PROMPT, "max_tokens": 12, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events
        assert "error" in json.loads(events[-2]), events
        assert json.loads(events[-2])["error"]["code"] == "generation_failed"
        assert json.loads(events[0])["choices"][0]["text"]
        plain = httpx.post(live_server.url + "/v1/completions", json={"model": "fsb", "prompt": PROMPT})
        assert plain.status_code == 500 and plain.json()["error"]["code"] == "generation_failed"
    finally:
        live_server.bot.lm = tiny_lm
    assert httpx.post(live_server.url + "/v1/completions", json={"model": "fsb", "prompt": PROMPT}).status_code == 200


def test_token_bucket_refills_with_time():
    now = [0.0]
    limit = RateLimit(2, clock=lambda: now[0])
    assert [limit.wait_for("a"), limit.wait_for("a")] == [0.0, 0.0]
    assert limit.wait_for("a") == pytest.approx(30.0)  # 2 a minute: one more after 30 s
    assert limit.wait_for("b") == 0.0  # another client has its own budget
    now[0] = 30.0
    assert limit.wait_for("a") == 0.0
    assert RateLimit(0).wait_for("a") == 0.0  # off


def test_rate_limit_per_client_over_http(settings, tiny_lm):
    from app.server import build_app, build_bot

    settings = settings.replace(api_key="alice:key-a,bob:key-b", rate_limit=2)
    with LiveServer(build_app(settings, bot=build_bot(settings, lm=tiny_lm))) as server:
        alice = client(server, "key-a")
        for _ in range(2):
            alice.completions.create(model="fsb", prompt="hi", max_tokens=1)
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": "Bearer key-a"},
                       json={"model": "fsb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        with pytest.raises(openai.RateLimitError):
            alice.completions.create(model="fsb", prompt="hi", max_tokens=1)
        assert client(server, "key-b").completions.create(model="fsb", prompt="hi", max_tokens=1).choices
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer key-a"}).status_code == 200
