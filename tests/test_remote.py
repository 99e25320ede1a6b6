"""RemoteLM beyond the shared contract: the model spec, failures at the edge (a misbehaving stand-in server on
loopback: HTTP errors, a stream that breaks or stalls, a server that refuses ``echo``), and scoring by teacher
forcing against the real llama.cpp server (the fallback for servers without prompt log-probabilities)."""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import Request  # module level: the stand-in's handlers are annotated with it (PEP 563 strings)

from app.lm import LMError, complete, load_lm
from app.lm.remote import RemoteLM, parse_spec
from app.settings import Settings

from .conftest import LiveServer
from .test_lm_contract import llama_server, remote_lm  # noqa: F401  (the shared session server)


def test_model_spec():
    assert parse_spec("openai:http://127.0.0.1:8080/v1") == {"base_url": "http://127.0.0.1:8080/v1"}
    assert parse_spec("openai:https://gpu:8000/v1#model=meta-llama/Llama-3.1-8B&context=8192&timeout=30") == {
        "base_url": "https://gpu:8000/v1", "model": "meta-llama/Llama-3.1-8B", "context_length": 8192,
        "timeout": 30.0}
    with pytest.raises(ValueError, match="unknown option 'temp'"):
        parse_spec("openai:http://x/v1#temp=1")
    with pytest.raises(ValueError, match="http://"):
        parse_spec("openai:localhost:8080")


def test_load_lm_picks_the_remote_backend(tmp_path):
    lm = load_lm(Settings.load(env={}, model="openai:http://127.0.0.1:9/v1#model=m&context=4096",
                               data_dir=tmp_path))
    assert isinstance(lm, RemoteLM) and lm.context_length == 4096 and lm.model == "m"
    assert lm.name == "openai:http://127.0.0.1:9/v1#model=m&context=4096"


# ------------------------------------------------------------------------------------ a misbehaving stand-in
def standin_app():
    """Answers by the prompt's first word: how a broken or limited server behaves."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"data": [{"id": "standin", "max_model_len": 1234}]}

    @app.post("/extras/tokenize")
    async def tokenize(request: Request):
        return {"tokens": list(range(len((await request.json())["input"])))}  # one token per character

    def event(text, finish=None):
        return "data: " + json.dumps({"choices": [{"text": text, "index": 0, "finish_reason": finish}]}) + "\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        kind = body["prompt"].split()[0]
        if body.get("echo"):  # what llama.cpp's llama-server answers
            return JSONResponse({"error": {"code": 400, "message": "Only no echo is supported"}}, status_code=400)
        if kind == "http500":
            return JSONResponse({"error": {"message": "model exploded"}}, status_code=500)
        if body.get("logprobs"):
            top = {"a": -1.0, "b": -2.0, **({"ab": -0.5} if kind == "merge" else {})}
            return {"choices": [{"text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-1.0],
                                                            "top_logprobs": [top]}, "finish_reason": "length"}]}

        async def stream():
            yield event("Hello")
            yield event(" there")
            if kind == "break":
                raise RuntimeError("worker died")  # the connection drops mid-body
            if kind == "stall":
                await asyncio.sleep(2.5)
            if kind == "errorevent":
                yield "data: " + json.dumps({"error": {"message": "out of KV cache"}}) + "\n\n"
            if kind == "truncated":
                return  # no finish_reason, no [DONE]
            yield event(". User: next", "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def standin():
    with LiveServer(standin_app()) as server:
        yield RemoteLM(server.url + "/v1", timeout=1.5, connect_timeout=2)


def test_generation_streams_and_cuts_at_stops_the_server_missed(standin):
    assert standin.model == "standin" and standin.context_length == 1234
    stats: dict = {}
    assert list(standin.generate("fine", stop=[" User:"], stats=stats)) == ["Hello", " there", "."]
    assert stats == {"tokens": 3, "finish": "stop"}


@pytest.mark.parametrize("kind, message", [
    ("http500", "HTTP 500 .*model exploded"),
    ("break", "broke mid-stream"),
    ("stall", "stalled: nothing for 1.5 s"),
    ("errorevent", "failed mid-stream: out of KV cache"),
    ("truncated", "ended the stream without finishing"),
])
def test_server_failures_are_lm_errors_after_what_was_shown(standin, kind, message):
    shown = []
    with pytest.raises(LMError, match=message):
        for piece in standin.generate(f"{kind} please"):
            shown.append(piece)
    assert "".join(shown) in ("", "Hello there")


def test_batch_failure_in_one_row_is_raised(standin):
    with pytest.raises(LMError, match="HTTP 500"):
        list(standin.generate_batch(["fine", "http500"]))


def test_a_server_without_echo_is_scored_by_teacher_forcing(standin):
    assert standin.score("word", ["ab", "", "z"]) == [-3.0, 0.0, -2.0]  # "z" is outside the top k: the k-th best
    assert standin.score_mode == "forced"
    assert standin.score("merge", ["ab"]) == [-0.5]  # the longest matching token wins
    assert standin.count_tokens("three words") == 11


# -------------------------------------------------------------------------------------- the real llama.cpp server
def test_teacher_forcing_agrees_with_echo_scores_on_a_real_server(llama_server):
    context = "User: what is the capital of France?\nAssistant: The capital of France is"
    conts = [" Paris.", " a banana."]
    echo = RemoteLM(llama_server.url, score_mode="echo")
    forced = RemoteLM(llama_server.url, score_mode="forced")
    try:
        e, f = echo.score(context, conts), forced.score(context, conts)
        assert e[0] > e[1] and f[0] > f[1]
        assert f[0] == pytest.approx(e[0], abs=0.05)  # every token of " Paris." is among the top 20: exact
        assert f[1] >= e[1] - 0.05  # " banana" is not: the 20th best's log-prob bounds it from above
    finally:
        echo.close()
        forced.close()


def test_concurrent_rows_on_a_real_server(remote_lm):
    prompts = ["User: hi!\nAssistant:", "User: name a colour.\nAssistant:", "User: count to three.\nAssistant:"]
    out, stats = [""] * 3, [{}, {}, {}]
    for row, piece in remote_lm.generate_batch(prompts, stop=["\nUser:"], max_new_tokens=12, stats=stats):
        out[row] += piece
    assert out == [complete(remote_lm, p, stop=["\nUser:"], max_new_tokens=12) for p in prompts]
    assert all(0 < s["tokens"] <= 12 for s in stats)
