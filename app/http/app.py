"""`create_app`: the FastAPI app with every API route, health and metrics; `app.server` mounts the web chat on it."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..bot import Bot
from . import native, openai
from .errors import install_handlers
from .middleware import BodyLimit, CountRequests, KeyAuth
from .service import Service


def create_app(bot: Bot, settings) -> FastAPI:
    app = FastAPI(title="Few-Shot Bot", version="0.1.0",
                  description="A conversational agent whose every skill is learned from a few examples in a prompt.")
    svc = Service(bot, settings)
    app.state.bot = bot
    app.state.fsb = svc
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(KeyAuth, keys=svc.keys)
    app.add_middleware(CountRequests, metrics=svc.metrics)  # outermost: counts the 401s and 413s too
    install_handlers(app, settings, svc.metrics)

    @app.get("/healthz", tags=["service"])
    def healthz():
        """200 with ``status: ok`` when a turn can start now; 503 (``busy`` or ``unavailable``) with the reason."""
        ok, info = svc.healthy()
        return JSONResponse(info, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "2"})

    @app.get("/metrics", tags=["service"])
    def metrics():
        """Prometheus metrics in the text exposition format."""
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    app.include_router(openai.router(svc))
    app.include_router(native.router(svc))
    return app
