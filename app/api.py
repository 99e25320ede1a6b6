"""The HTTP API: OpenAI-compatible chat completions, model list, health, and the native chat endpoint.

Errors leave here as OpenAI-style objects ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; a
failure in the middle of a stream ends that stream with an error event (``data: {"error": ...}``) then ``[DONE]``.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from typing import Any, Iterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrievers.base import RetrieverError

from .bot import BadRequest, Bot, TurnStream
from .lm import Sampling
from .storage import SessionNotFound

log = logging.getLogger(__name__)
MODEL_AUTO = "fsb"


# ------------------------------------------------------------------------------------------------ schemas
class NotFound(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "not_found"):
        super().__init__(message)
        self.param, self.code = param, code


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    """The OpenAI request; unknown OpenAI options are accepted and ignored. ``session_id`` (extension) stores the
    exchange in that session."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[ChatMessage]
    stream: StrictBool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    user: StrictStr | None = None
    session_id: StrictStr | None = None


class CompletionRequest(BaseModel):
    """The OpenAI legacy completion request: the raw language model continues ``prompt`` (no skill, no alignment)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: Union[StrictStr, list[StrictStr]]
    stream: StrictBool = False
    max_tokens: int | None = Field(16, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    user: StrictStr | None = None


class NativeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: StrictStr = Field(min_length=1)
    session_id: StrictStr | None = None
    skill: StrictStr | None = None
    user: StrictStr = ""


# ------------------------------------------------------------------------------------------------- errors
def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('msg')}", None
    param = ".".join(loc) or None
    return (f"{param}: {err.get('msg')}" if param else err.get("msg", "invalid request")), param


class BodyLimit:
    """Pure ASGI middleware: refuse request bodies over ``limit`` bytes with 413, before anything parses them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"request body over {self.limit} bytes", "type":
                                     "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class Admission:
    """At most ``active`` turns generate at once and ``waiting`` more queue; the rest are turned away at once.

    A turn holds its slot until its stream ends (or the client goes away), so the model is never oversubscribed and a
    burst gets a clean 429 with ``Retry-After`` instead of an unbounded queue.
    """

    def __init__(self, active: int, waiting: int):
        self._slots = threading.BoundedSemaphore(max(1, active))
        self._tickets = threading.BoundedSemaphore(max(1, active) + max(0, waiting))

    def enter(self) -> bool:
        if not self._tickets.acquire(blocking=False):
            return False
        self._slots.acquire()
        return True

    def leave(self) -> None:
        self._slots.release()
        self._tickets.release()


class Busy(Exception):
    pass


class RateLimited(Exception):
    def __init__(self, retry_after: float):
        super().__init__(retry_after)
        self.retry_after = retry_after


class RateLimit:
    """Per-client token bucket: ``per_minute`` requests a minute, in bursts of up to that many; 0 turns it off.

    A client is its API key's user when keys are on, else its address. Idle buckets are dropped, so memory stays
    bounded by the clients seen in the last minute.
    """

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)
        self._lock = threading.Lock()

    def wait_for(self, client: str) -> float:
        """0 when ``client`` may go now (and charges it one request), else the seconds until it may."""
        if self.capacity <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            if len(self._buckets) > 10_000:  # a bucket idle for a minute is full again: forget it
                self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < 60.0}
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate


def parse_keys(spec: str) -> dict[str, str]:
    """``FSB_API_KEY``: one key (its user is "default") or ``user:key,user:key``; returns key -> user."""
    keys: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, _, key = item.rpartition(":")
        keys[key] = user or "default"
    return keys


class KeyAuth:
    """Pure ASGI middleware: with keys configured, every API route needs ``Authorization: Bearer <key>`` (or
    ``X-API-Key``); the caller's user name goes to ``scope["state"]["user"]``. The web chat is guarded by Gradio's own
    login (see `app.server`), ``/healthz`` stays open for probes."""

    GUARDED = ("/v1", "/api", "/docs", "/redoc", "/openapi.json")

    def __init__(self, app, keys: dict[str, str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(self.GUARDED):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode(
            "latin-1")
        user = self.keys.get(key)
        if user is None:
            body = json.dumps({"error": {"message": "a valid API key is required (Authorization: Bearer <key>)",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "invalid_api_key"}}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------- app
def create_app(bot: Bot, settings) -> FastAPI:
    """The FastAPI app with every API route; the web chat is mounted on it by `app.server`."""
    app = FastAPI(title="Few-Shot Bot", version="0.1.0",
                  description="A conversational agent whose every skill is learned from a few examples in a prompt.")
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(KeyAuth, keys=parse_keys(settings.api_key))
    app.state.bot = bot
    admission = Admission(settings.max_active, settings.max_waiting)
    rate_limit = RateLimit(settings.rate_limit)
    auth_on = bool(parse_keys(settings.api_key))

    def limited(request: Request) -> None:
        """Charge the caller one request against its per-minute budget (``FSB_RATE_LIMIT``); 429 beyond it."""
        client = request.scope.get("state", {}).get("user") if auth_on else None
        wait = rate_limit.wait_for(client or (request.client.host if request.client else "?"))
        if wait:
            raise RateLimited(wait)

    def caller(request: Request, asked: str | None = None) -> str:
        """The user a request acts for: its key's user when keys are on, else the ``user`` it names."""
        return request.scope.get("state", {}).get("user", "") if auth_on else (asked or "")

    def owned_session(request: Request, session_id: str) -> dict:
        session = bot.store.session(session_id)
        if auth_on and session["user"] != caller(request):
            raise SessionNotFound(f"no session {session_id!r}")  # another user's session does not exist for you
        return session

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), type_="invalid_request_error", code="not_found"
                              if exc.status_code == 404 else None)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        status = 404 if exc.code == "model_not_found" else 400
        return error_response(status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(SessionNotFound)
    async def _no_session(request: Request, exc: SessionNotFound):
        return error_response(404, exc.args[0], param="session_id", code="session_not_found")

    @app.exception_handler(sqlite3.OperationalError)
    async def _storage(request: Request, exc: sqlite3.OperationalError):
        log.warning("storage unavailable: %s", exc)
        return error_response(503, f"storage is unavailable right now ({exc}); retry shortly", type_="server_error",
                              code="storage_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return error_response(429, "the bot is busy with other chats; retry shortly", type_="rate_limit_error",
                              code="busy", headers={"Retry-After": "2"})

    @app.exception_handler(RateLimited)
    async def _rate_limited(request: Request, exc: RateLimited):
        seconds = max(1, int(exc.retry_after + 0.999))
        return error_response(429, f"rate limit: {settings.rate_limit} requests a minute per client; retry in "
                              f"{seconds} s", type_="rate_limit_error", code="rate_limit_exceeded",
                              headers={"Retry-After": str(seconds)})

    def admitted(run):
        """Run ``run()`` (which starts a turn) inside an admission slot; the slot is released when the turn's
        stream ends, or at once if starting it failed."""
        if not admission.enter():
            raise Busy()
        try:
            return run()
        except BaseException:
            admission.leave()
            raise

    def released(stream: TurnStream):
        try:
            yield from stream
        finally:
            admission.leave()

    @app.exception_handler(RetrieverError)
    async def _retriever(request: Request, exc: RetrieverError):
        return error_response(400, str(exc), code="invalid_value")

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error_response(404, str(exc), param=exc.param, code=exc.code)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok", "model": bot.lm.name, "skills": len(bot.skills.all())}

    @app.get("/v1/models", tags=["openai"])
    def models() -> dict:
        created = int(time.time())
        names = [MODEL_AUTO] + [f"{MODEL_AUTO}:{s.name}" for s in bot.skills.all() if s.kind == "response"]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "fsb"}
                                           for n in names]}

    @app.post("/v1/chat/completions", tags=["openai"])
    def chat_completions(req: ChatCompletionRequest, request: Request):
        skill = _skill_from_model(req.model, bot)
        limited(request)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        sampling = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        asked = req.max_completion_tokens or req.max_tokens
        limit = min(asked, settings.max_tokens) if asked else None  # None: the skill's own setting
        user = caller(request, req.user)
        if req.session_id:
            owned_session(request, req.session_id)
            stream = admitted(lambda: bot.chat(req.session_id, messages[-1]["content"] if messages else "",
                                               skill=skill, sampling=sampling, max_tokens=limit, user=user))
        else:
            stream = admitted(lambda: bot.turn(messages, skill=skill, sampling=sampling, max_tokens=limit,
                                               user=user))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_sse(stream, released(stream), cid, req.model), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = "".join(released(stream))
        reply = stream.reply
        return {
            "id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
            "fsb": {"skill": reply.skill, "sources": reply.passages},
        }

    @app.post("/v1/completions", tags=["openai"])
    def completions(req: CompletionRequest, request: Request):
        """Raw completion: the language model continues the prompt as it is (no skill, no alignment layer)."""
        if req.model not in (MODEL_AUTO, bot.lm.name):
            raise BadRequest(f"unknown model {req.model!r}; raw completion serves 'fsb' (the loaded model, "
                             f"{bot.lm.name})", "model", "model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or not all(prompts):
            raise BadRequest("prompt must be a non-empty string or a list of non-empty strings", "prompt")
        if req.stream and len(prompts) > 1:
            raise BadRequest("stream: true takes one prompt", "prompt")
        limit = min(req.max_tokens or 16, settings.max_tokens)
        for p in prompts:
            if bot.lm.count_tokens(p) + limit > bot.lm.context_length:
                raise BadRequest(f"the prompt and max_tokens ({limit}) exceed the model's context of "
                                 f"{bot.lm.context_length} tokens", "prompt", "context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        limited(request)
        sampling = Sampling().with_overrides(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def run_one(prompt: str):
            stats: dict = {}
            return stats, bot.lm.generate(prompt, stop=stops, max_new_tokens=limit, sampling=sampling, stats=stats)

        if req.stream:
            stats, pieces = admitted(lambda: run_one(prompts[0]))

            def held():
                try:
                    yield from pieces
                finally:
                    pieces.close()
                    admission.leave()

            return StreamingResponse(_completion_sse(held(), stats, cid, created, req.model),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(prompts):
            stats, pieces = admitted(lambda: run_one(prompt))
            try:
                text = "".join(pieces)
            except Exception as exc:  # noqa: BLE001 - a model failure is this request's error, not the server's
                log.exception("completion %s failed", cid)
                return error_response(500, f"the model failed: {exc}", type_="server_error", code="generation_failed")
            finally:
                admission.leave()
            prompt_tokens += bot.lm.count_tokens(prompt)
            completion_tokens += int(stats.get("tokens", 0))
            choices.append({"index": index, "text": text, "logprobs": None,
                            "finish_reason": _finish(stats.get("finish"))})
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/api/chat", tags=["native"])
    def native_chat(req: NativeChatRequest, request: Request) -> dict:
        """One turn in a stored session (created when ``session_id`` is absent): reply, skill, sources and trace."""
        if req.skill is not None:
            bot.skill_for(req.skill)
        limited(request)
        user = caller(request, req.user)
        if req.session_id:
            owned_session(request, req.session_id)

        def start():  # the session is created only once the turn is admitted: a 429 leaves nothing behind
            sid = req.session_id or bot.store.create_session(user=user)
            return sid, bot.chat(sid, req.message, skill=req.skill, user=user)

        sid, stream = admitted(start)
        text = "".join(released(stream))
        reply = stream.reply
        return {"session_id": sid, "reply": text, "skill": reply.skill, "sources": reply.passages,
                "trace": reply.trace}

    @app.get("/api/sessions", tags=["native"])
    def list_sessions(request: Request, user: str | None = None) -> list[dict]:
        return bot.store.sessions(user=caller(request) if auth_on else user)

    @app.get("/api/sessions/{session_id}", tags=["native"])
    def get_session(session_id: str, request: Request) -> dict:
        return {**owned_session(request, session_id), "messages": bot.store.messages(session_id)}

    def memory_user(request: Request, user: str | None) -> str:
        who = caller(request, user)
        if not who:
            raise BadRequest("name the user whose memories to read (?user=...)", "user")
        return who

    @app.get("/api/memory", tags=["native"])
    def list_memory(request: Request, user: str | None = None) -> list[dict]:
        """What the bot keeps about a user (the caller's own when API keys are on)."""
        who = memory_user(request, user)
        return [vars(f) for f in bot.knowledge.memory.list(who)] if bot.knowledge else []

    @app.delete("/api/memory", tags=["native"])
    def forget_all(request: Request, user: str | None = None) -> dict:
        who = memory_user(request, user)
        return {"deleted": bot.knowledge.memory.forget(who) if bot.knowledge else 0}

    @app.delete("/api/memory/{fact_id}", tags=["native"])
    def forget_one(fact_id: int, request: Request, user: str | None = None) -> dict:
        who = memory_user(request, user)
        deleted = bot.knowledge.memory.forget(who, fact_id) if bot.knowledge else 0
        if not deleted:
            raise NotFound(f"no memory {fact_id} for this user", "fact_id", "memory_not_found")
        return {"deleted": deleted}

    @app.get("/api/skills", tags=["native"])
    def skills() -> list[dict[str, Any]]:
        return [{"name": s.name, "kind": s.kind, "retriever": s.retriever, "description": s.description}
                for s in bot.skills.all()]

    @app.get("/api/skills/problems", tags=["native"])
    def skill_problems() -> list[dict[str, Any]]:
        """Skill files that failed to load (the last good version of each keeps serving)."""
        bot.skills.refresh()
        return [{"file": e.path, "line": e.line, "message": e.message} for e in bot.skills.errors]

    return app


def _skill_from_model(model: str, bot: Bot) -> str | None:
    if model == MODEL_AUTO:
        return None
    if model.startswith(MODEL_AUTO + ":"):
        name = model.split(":", 1)[1]
        bot.skill_for(name)  # raises UnknownSkill -> 404
        return name
    raise BadRequest(f"unknown model {model!r}; use 'fsb' (automatic skill) or 'fsb:<skill>' (see /v1/models)",
                     "model", "model_not_found")


def _finish(reason: str | None) -> str:
    """OpenAI's finish reasons: a stop string or end of text is "stop", the token limit "length"."""
    return "length" if reason == "length" else "stop"


def _completion_sse(pieces: Iterator[str], stats: dict, cid: str, created: int, model: str) -> Iterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        for piece in pieces:
            yield chunk(piece)
        yield chunk("", _finish(stats.get("finish")))
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        log.exception("completion stream %s failed", cid)
        err = {"error": {"message": f"the completion failed midway: {exc}", "type": "server_error", "param": None,
                         "code": "generation_failed"}}
        yield f"data: {json.dumps(err)}\n\n"
    yield "data: [DONE]\n\n"


def _sse(stream: TurnStream, pieces: Iterator[str], cid: str, model: str) -> Iterator[str]:
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        for piece in pieces:
            yield chunk({"content": piece})
        yield chunk({}, stream.reply.finish_reason)
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band, keep the server serving
        log.exception("stream %s failed", cid)
        err = {"error": {"message": f"the reply failed midway: {exc}", "type": "server_error", "param": None,
                         "code": "generation_failed"}}
        yield f"data: {json.dumps(err)}\n\n"
    yield "data: [DONE]\n\n"
