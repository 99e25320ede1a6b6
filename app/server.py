"""Building the service from settings: model, skills, storage, the bot, the HTTP API and the web chat on one app."""
from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
import time

from .settings import Settings

log = logging.getLogger("fsb")


def build_bot(settings: Settings, lm=None, embedder=None, web=None):
    """The `Bot` with its model (loaded unless given), skills, store, selector, alignment layer and retrievers."""
    import yaml

    from retrievers import WebSearch, default_embedder
    from retrievers.embed import ExampleCache

    from .align import Aligner
    from .bot import Bot
    from retrievers.db import open_db
    from .knowledge import Knowledge
    from .lm import load_lm
    from .router import build_router
    from .skills import SkillRegistry
    from .storage import Store

    skills = SkillRegistry(settings.skills_dir)
    for err in skills.errors:
        print(f"[fsb] skill file problem: {err}", file=sys.stderr)
    db = open_db(settings.db_path)
    store = Store(db)
    lm = lm or load_lm(settings)
    embedder = embedder or default_embedder()
    knowledge = Knowledge(db, embedder, web=web or WebSearch(db, backend=settings.web_backend))
    if settings.starter_kb and not knowledge.kb.list():
        _ingest_starter_kb(knowledge)
    # The selectors embed the skills' examples through a cache in the data directory: a restart skips that work.
    router = build_router(settings, skills, lm, ExampleCache(embedder, open_db(settings.data_dir / "examples.db")))
    aligner = Aligner(lm, settings, variant=settings.align_variant, guarded=router.first_stage is not None)
    messages = yaml.safe_load((settings.prompts_dir / "messages.yaml").read_text(encoding="utf-8"))
    return Bot(settings, lm, skills, store, router=router, aligner=aligner, knowledge=knowledge, messages=messages)


def _ingest_starter_kb(knowledge) -> None:
    """The shipped starter documents, so knowledge-grounded skills answer out of the box (once, into an empty KB)."""
    from retrievers import starter_kb_dir
    from retrievers.kb import expand_paths

    paths = expand_paths([starter_kb_dir()])
    print(f"[fsb] indexing the starter knowledge base ({len(paths)} documents)", file=sys.stderr, flush=True)
    for path in paths:
        knowledge.kb.add(path)


def build_app(settings: Settings, lm=None, bot=None, warm: str = "now"):
    """The FastAPI app: API routes first, then the Gradio chat mounted at ``/``.

    ``warm``: encode every constant prompt prefix (selector prompts, skills' examples, the alignment layer) ``now``,
    in the ``background`` while the server already answers (``fsb serve``: turns can start at once, the first ones
    are slower; ``/healthz`` reports the progress), or ``off``."""
    import gradio as gr

    from .http import create_app
    from .ui import build_ui

    bot = bot or build_bot(settings, lm)
    app = create_app(bot, settings)
    svc = app.state.fsb
    if warm == "now":
        warm_up(bot, svc.warming)
    elif warm == "background":
        stop = threading.Event()
        thread = threading.Thread(target=warm_up, args=(bot, svc.warming, stop), name="fsb-warm", daemon=True)
        app.state.fsb_warm_up = (thread, stop)  # `stop_warm_up` ends it when the server stops
        thread.start()
    keys = svc.keys
    # With API keys on, the web chat asks for a login: user name and that user's key (Gradio then guards its own
    # routes, the queue and file routes included).
    auth = (lambda username, password: keys.get(password) == username) if keys else None
    return gr.mount_gradio_app(app, build_ui(bot, svc), path="/", auth=auth,
                               auth_message="Sign in with your user name and API key." if keys else None)


class _WarmUpStopped(Exception):
    pass


def warm_up(bot, state: dict, stop: threading.Event | None = None) -> None:
    """`Bot.warm` with a progress bar on a terminal (a line per quarter otherwise); ``state`` feeds ``/healthz``.
    Setting ``stop`` ends it after the prefix being encoded."""
    from tqdm import tqdm

    started = time.perf_counter()
    bar = None

    def progress(done: int, total: int, what: str) -> None:
        nonlocal bar
        if stop is not None and stop.is_set():
            raise _WarmUpStopped
        if bar is None:
            bar = tqdm(total=total, desc="[fsb] warming prompt caches", unit="prefix", file=sys.stderr,
                       disable=not sys.stderr.isatty())
        bar.update(1)
        state.update(done=done, total=total)
        if not sys.stderr.isatty() and total and done in {total // 4, total // 2, 3 * total // 4}:
            print(f"[fsb] warming prompt caches: {done}/{total}", file=sys.stderr, flush=True)

    try:
        n = bot.warm(progress)
        state.update(ready=True, seconds=round(time.perf_counter() - started, 1))
        print(f"[fsb] {n} prompt prefixes cached in {time.perf_counter() - started:.1f} s", file=sys.stderr,
              flush=True)
    except _WarmUpStopped:
        state.update(ready=False)
    except Exception as exc:  # noqa: BLE001 - turns still work, only slower: say so and keep serving
        log.exception("warming the prompt caches failed")
        state.update(ready=False, error=str(exc))
    finally:
        if bar is not None:
            bar.close()


class CannotServe(RuntimeError):
    """The server cannot start as configured; the message says why and what to change."""


class AddressUnavailable(CannotServe):
    """The server cannot listen where it was asked to (the port is taken, or the address is not this machine's)."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, taken before the model loads: a port that is already in use fails at once
    with what to do, instead of after the load with uvicorn's error and a crash of the threads still loading.

    Raises:
        AddressUnavailable: with the reason and how to pick another port.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn does
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        hint = (f"another server (an earlier `fsb serve`?) is using it: stop that one, or pick another port with "
                f"--port {port + 1} or FSB_PORT={port + 1}" if exc.errno == errno.EADDRINUSE
                else "use an address of this machine (--host 127.0.0.1, or 0.0.0.0 for every interface)")
        raise AddressUnavailable(f"cannot listen on {host}:{port}: {reason}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> None:
    """Serve until interrupted. The address is taken first, then the model loads (minutes on a first run).

    Raises:
        CannotServe: a skill or prompt folder that is not there, or an address that cannot be bound
            (`AddressUnavailable`); nothing is loaded then.
    """
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for folder, var, what in ((settings.skills_dir, "FSB_SKILLS_DIR", "skill files"),
                              (settings.prompts_dir, "FSB_PROMPTS_DIR", "alignment prompts")):
        if not folder.is_dir():  # a mistyped path would serve a bot with no skills at all
            raise CannotServe(f"{folder}: not a folder; {var} must name the folder that holds the {what} (unset it "
                              f"for the installed ones)")
    sock = listening_socket(settings.host, settings.port)
    print(f"[fsb] loading model {settings.model} …", file=sys.stderr, flush=True)
    app = build_app(settings, warm="background")
    print(f"[fsb] serving on http://{settings.host}:{settings.port}/  (API: /v1/chat/completions, docs: /docs)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop_warm_up(app)


def stop_warm_up(app, timeout: float = 30.0) -> None:
    """End a background warm-up (`build_app` with ``warm="background"``) and wait for it: a server stopped while it
    warms (Ctrl-C right after start) would otherwise leave the interpreter under a forward pass still running on that
    thread, and the process would abort ("terminate called without an active exception") instead of exiting."""
    thread, stop = getattr(app.state, "fsb_warm_up", (None, None))
    if thread is not None:
        stop.set()
        thread.join(timeout)
