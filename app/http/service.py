"""What every route shares: the bot, the settings, admission, the rate limit, metrics, and who the caller is."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from ..bot import Bot
from ..storage import SessionNotFound
from .admission import Admission, RateLimit, Ticket, parse_keys
from .errors import RateLimited
from .metrics import Metrics


@dataclass
class Service:
    bot: Bot
    settings: object
    admission: Admission = field(init=False)
    rate_limit: RateLimit = field(init=False)
    metrics: Metrics = field(init=False)
    keys: dict = field(init=False)
    warming: dict = field(default_factory=lambda: {"ready": False, "done": 0, "total": 0})

    def __post_init__(self):
        s = self.settings
        self.admission = Admission(s.max_active, s.max_waiting, timeout=getattr(s, "queue_timeout", 30))
        self.rate_limit = RateLimit(s.rate_limit)
        self.metrics = Metrics(self.admission)
        self.keys = parse_keys(s.api_key)

    @property
    def auth_on(self) -> bool:
        return bool(self.keys)

    def caller(self, request: Request | None, asked: str | None = None) -> str:
        """The user a request acts for: its key's user when keys are on, else the ``user`` it names."""
        if self.auth_on:
            return (request.scope.get("state", {}).get("user", "") if request is not None else "") or ""
        return asked or ""

    def charge(self, client: str) -> None:
        """Charge ``client`` one request against its per-minute budget (``FSB_RATE_LIMIT``); 429 beyond it."""
        wait = self.rate_limit.wait_for(client or "?")
        if wait:
            raise RateLimited(wait)

    def limited(self, request: Request) -> None:
        user = request.scope.get("state", {}).get("user") if self.auth_on else None
        self.charge(user or (request.client.host if request.client else "?"))

    def admit(self) -> Ticket:
        """A slot for one turn (429 when the queue is full, 503 when the wait runs out)."""
        return self.admission.admit()

    def owned_session(self, request: Request, session_id: str) -> dict:
        session = self.bot.store.session(session_id)
        if self.auth_on and session["user"] != self.caller(request):
            raise SessionNotFound(f"no session {session_id!r}")  # another user's session does not exist for you
        return session

    def healthy(self) -> tuple[bool, dict]:
        """Whether a turn can start now, with the numbers behind the answer."""
        started = time.perf_counter()
        info = {**self.admission.snapshot(), "model": self.bot.lm.name, "skills": len(self.bot.skills.all()),
                "warm": dict(self.warming)}  # prompt caches: a turn can start before they are ready, only slower
        problems = []
        try:
            self.bot.store.db.execute("select 1").fetchall()
        except Exception as exc:  # noqa: BLE001 - reported, not raised: this is the health probe
            problems.append(f"storage: {exc}")
        if not info["skills"]:
            problems.append("no skill is loaded")
        if not self.admission.can_start:
            problems.append("every chat slot is taken" + (f"; {info['waiting']} waiting" if info["waiting"] else ""))
        ok = not problems
        info.update(status="ok" if ok else ("busy" if not self.admission.can_start and len(problems) == 1
                                             else "unavailable"),
                    can_start=ok, problems=problems, checked_in_s=round(time.perf_counter() - started, 4))
        return ok, info
