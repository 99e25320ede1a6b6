"""Errors at the edge: domain errors raised inside become OpenAI-style error objects with the right status here.

``{"error": {"message", "type", "param", "code"}}``; 4xx for anything the caller can fix, 429/503 with
``Retry-After`` when the bot is busy, 5xx only for a failure of the server itself (a broken model).
"""
from __future__ import annotations

import json
import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrievers.base import RetrieverError

from ..align import AlignError
from ..bot import BadRequest
from ..lm import LMError
from ..selector import SelectorError
from ..storage import SessionNotFound

log = logging.getLogger(__name__)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object; every error this server sends is built here."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(message: str, **kw) -> bytes:
    return json.dumps(error_body(message, **kw)).encode()


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class NotFound(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "not_found"):
        super().__init__(message)
        self.param, self.code = param, code


class Busy(Exception):
    """No room for another turn: every slot is taken and the queue is full (429)."""


class QueueTimeout(Exception):
    """A queued turn could not start within ``FSB_QUEUE_TIMEOUT`` seconds (503)."""

    def __init__(self, waited: float):
        super().__init__(waited)
        self.waited = waited


class RateLimited(Exception):
    def __init__(self, retry_after: float):
        super().__init__(retry_after)
        self.retry_after = retry_after


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('msg')}", None
    param = ".".join(loc) or None
    msg = str(err.get("msg") or "invalid request").removeprefix("Value error, ")  # pydantic's prefix for our own checks
    return (f"{param}: {msg}" if param else msg), param


def install_handlers(app: FastAPI, settings, metrics) -> None:
    """Map every domain error to its HTTP answer."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        status = 404 if exc.code == "model_not_found" else 400
        return error_response(status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(AlignError)
    async def _align(request: Request, exc: AlignError):
        return error_response(400, f"the conversation cannot be answered: {exc}", param="messages",
                              code="invalid_conversation")

    @app.exception_handler(SelectorError)
    async def _selector(request: Request, exc: SelectorError):
        return error_response(400, f"no skill can take this turn: {exc}", param="model", code="no_skill")

    @app.exception_handler(LMError)
    async def _lm(request: Request, exc: LMError):
        log.error("model failure: %s", exc)
        return error_response(503, f"the language model is unavailable: {exc}", type_="server_error",
                              code="model_unavailable", headers={"Retry-After": "5"})

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
        metrics.rejected.labels(reason="queue_full").inc()
        return error_response(429, "the bot is busy with other chats; retry shortly", type_="rate_limit_error",
                              code="busy", headers={"Retry-After": "2"})

    @app.exception_handler(QueueTimeout)
    async def _timeout(request: Request, exc: QueueTimeout):
        metrics.rejected.labels(reason="queue_timeout").inc()
        return error_response(503, f"no chat slot came free within {exc.waited:g} s; retry shortly",
                              type_="server_error", code="queue_timeout", headers={"Retry-After": "5"})

    @app.exception_handler(RateLimited)
    async def _rate_limited(request: Request, exc: RateLimited):
        metrics.rejected.labels(reason="rate_limit").inc()
        seconds = max(1, int(exc.retry_after + 0.999))
        return error_response(429, f"rate limit: {settings.rate_limit} requests a minute per client; retry in "
                              f"{seconds} s", type_="rate_limit_error", code="rate_limit_exceeded",
                              headers={"Retry-After": str(seconds)})

    @app.exception_handler(RetrieverError)
    async def _retriever(request: Request, exc: RetrieverError):
        return error_response(400, str(exc), code="invalid_value")

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error_response(404, str(exc), param=exc.param, code=exc.code)
