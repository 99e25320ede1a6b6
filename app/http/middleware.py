"""Pure ASGI middleware: request-body size limit, API keys, and request counts for ``/metrics``."""
from __future__ import annotations

from .errors import error_bytes


async def _send_error(send, status: int, body: bytes, extra_headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before anything parses them."""

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
        await _send_error(send, 413, error_bytes(f"request body over {self.limit} bytes", code="request_too_large"))


class _TooLarge(Exception):
    pass


class KeyAuth:
    """With keys configured, every API route needs ``Authorization: Bearer <key>`` (or ``X-API-Key``); the caller's
    user name goes to ``scope["state"]["user"]``. The web chat is guarded by Gradio's own login (see `app.server`),
    ``/healthz`` and ``/metrics`` stay open for probes and scrapers."""

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
            body = error_bytes("a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")
            return await _send_error(send, 401, body, [(b"www-authenticate", b"Bearer")])
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


class CountRequests:
    """Count answered requests by route template (``/api/sessions/{session_id}``, not each id) and status."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def watched(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", None)
            label = route if route and route.startswith(("/v1", "/api", "/healthz", "/metrics")) else "web"
            self.metrics.requests.labels(route=label, status=str(status["code"])).inc()
