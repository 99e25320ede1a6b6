"""The HTTP layer: OpenAI-compatible routes, the native routes, health and metrics, on one FastAPI app.

    schemas.py      request bodies (pydantic)
    errors.py       the one OpenAI error object, domain errors -> HTTP statuses
    admission.py    turn slots with a bounded queue, per-client rate limit, API keys
    middleware.py   pure ASGI middleware: body size limit, API keys, request metrics
    metrics.py      Prometheus metrics (``/metrics``)
    streaming.py    a streamed turn that always gives its slot back, and the SSE chunk formats
    openai.py       /v1/models, /v1/chat/completions, /v1/completions
    native.py       /api/chat, sessions, memory, skills
    app.py          `create_app`: the pieces above, /healthz and /metrics
"""
from .app import create_app

__all__ = ["create_app"]
