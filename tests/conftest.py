"""Shared fixtures: a tiny real model (random weights, real tokenizer and transformers code), settings in a temp data
directory, a live server on loopback, and the embedded gemma model for the few end-to-end checks."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from app.settings import REPO_ROOT, Settings


@pytest.fixture(scope="session")
def tiny_lm():
    from app.lm.tiny import build_tiny_lm, default_corpus

    return build_tiny_lm(default_corpus())


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.load(env={}, model="tiny", data_dir=tmp_path / "data", selector="off",
                         starter_kb=False)


@pytest.fixture(scope="session")
def gemma_lm():
    """The embedded default model, converted once into the default data directory and reused across runs."""
    from app.lm import load_lm

    return load_lm(Settings.load(env={}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app on a loopback port in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(settings, tiny_lm):
    from app.server import build_app, build_bot

    bot = build_bot(settings, lm=tiny_lm)
    with LiveServer(build_app(settings, bot=bot)) as server:
        server.bot = bot
        yield server


# The stand-in web search engine (ddgs' own engine code pointed at a loopback server) for every test directory.
from tests.retrievers.conftest import engines, search_server  # noqa: E402,F401
