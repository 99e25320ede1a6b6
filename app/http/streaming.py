"""Streamed replies: server-sent events that always give their slot back, however the client leaves.

Starlette runs a sync body iterator in a worker thread and, when the client disconnects, cancels the response: a
generator that never started, or one suspended at a ``yield``, is then left as it is, so a slot released inside it
would leak (vLLM's answer is the same as ours: release in the outermost code that always runs). `HeldStream`
closes the body iterator (which stops the model's generation) and releases the ticket in its own ``__call__``.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterator

import anyio
from starlette.responses import StreamingResponse

from .errors import error_body

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HeldStream(StreamingResponse):
    """An SSE response over ``chunks`` that holds ``ticket`` until it ends or the client goes away.

    Args:
        chunks: a sync iterator of SSE strings.
        ticket: the admission `Ticket` (released exactly once, whatever happens).
        on_disconnect: called when the client went away before the stream's end.
    """

    def __init__(self, chunks: Iterator[str], ticket, on_disconnect: Callable[[], None] = lambda: None):
        self._source = chunks
        self._ticket = ticket
        self._on_disconnect = on_disconnect
        self._ended = False
        self._body = self._marked()
        super().__init__(self._body, media_type="text/event-stream", headers=SSE_HEADERS)

    def _marked(self) -> Iterator[str]:
        yield from self._source
        self._ended = True

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                if not self._ended:
                    self._on_disconnect()
                    await anyio.to_thread.run_sync(self._close)
                self._ticket.release()

    def _close(self) -> None:
        """Close the body (suspended, or never started): GeneratorExit reaches the turn, which stops the model."""
        for it in (self._body, self._source):
            close = getattr(it, "close", None)
            try:
                if close is not None:
                    close()
            except Exception:  # noqa: BLE001 - a generator that fails while closing must not keep the slot
                log.exception("closing an abandoned stream failed")


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def chat_chunks(stream, cid: str, model: str, started: float, metrics, route: str) -> Iterator[str]:
    """A turn as OpenAI chat-completion chunks; a failure midway ends it with an error event, then ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    first = True
    try:
        for piece in stream:
            if first:
                metrics.ttft.labels(route=route).observe(time.monotonic() - started)
                first = False
            yield chunk({"content": piece})
        reply = stream.reply
        metrics.turn.labels(route=route).observe(time.monotonic() - started)
        metrics.tokens.labels(route=route).inc(reply.completion_tokens)
        final = json.loads(chunk({}, reply.finish_reason)[6:])
        final["usage"] = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        final["fsb"] = {"skill": reply.skill, "sources": reply.passages}
        yield sse(final)
    except GeneratorExit:  # the client went away: stop the turn's generation now
        stream.close()
        raise
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band, keep the server serving
        log.exception("stream %s failed", cid)
        yield sse(error_body(f"the reply failed midway: {exc}", "server_error", code="generation_failed"))
    yield sse("[DONE]")


def completion_chunks(pieces: Iterator[str], stats: dict, cid: str, model: str, started: float, metrics
                      ) -> Iterator[str]:
    created = int(time.time())

    def chunk(text: str, finish: str | None = None) -> str:
        return sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

    first = True
    try:
        for piece in pieces:
            if first:
                metrics.ttft.labels(route="completions").observe(time.monotonic() - started)
                first = False
            yield chunk(piece)
        metrics.turn.labels(route="completions").observe(time.monotonic() - started)
        metrics.tokens.labels(route="completions").inc(int(stats.get("tokens", 0)))
        yield chunk("", finish_reason(stats.get("finish")))
    except GeneratorExit:
        getattr(pieces, "close", lambda: None)()
        raise
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        log.exception("completion stream %s failed", cid)
        yield sse(error_body(f"the completion failed midway: {exc}", "server_error", code="generation_failed"))
    yield sse("[DONE]")


def finish_reason(reason: str | None) -> str:
    """OpenAI's finish reasons: a stop string or end of text is "stop", the token limit "length"."""
    return "length" if reason == "length" else "stop"
