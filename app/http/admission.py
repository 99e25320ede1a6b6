"""Who may start a turn now: slots with a bounded, time-limited queue; a per-client rate limit; API keys.

A turn holds a `Ticket` from admission until its reply is out or its client is gone. The ticket is released in the
outermost code that always runs (the route's ``finally``, or the streamed response's own ``__call__``), never inside
a generator that might never start, and releasing twice is harmless.
"""
from __future__ import annotations

import threading
import time

from .errors import Busy, QueueTimeout


class Ticket:
    """One admitted turn's slot. ``release()`` is idempotent."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._released = False
        self._lock = threading.Lock()
        self.started = time.monotonic()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._leave()

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Admission:
    """At most ``active`` turns generate at once and at most ``waiting`` more queue, each for up to ``timeout``
    seconds; the rest are turned away at once (`Busy`, 429) or when their wait runs out (`QueueTimeout`, 503).

    The model is never oversubscribed, a burst gets a clean answer with ``Retry-After``, and nothing waits forever.
    """

    def __init__(self, active: int, waiting: int, timeout: float = 30.0):
        self.capacity = max(1, active)
        self.max_waiting = max(0, waiting)
        self.timeout = timeout
        self.active = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def admit(self) -> Ticket:
        """A ticket for a new turn; blocks (up to ``timeout``) while every slot is taken."""
        with self._cond:
            if self.active < self.capacity and self.waiting == 0:
                self.active += 1
                return Ticket(self)
            if self.waiting >= self.max_waiting:
                raise Busy()
            self.waiting += 1
            started = time.monotonic()
            try:
                free = self._cond.wait_for(lambda: self.active < self.capacity, timeout=self.timeout)
            finally:
                self.waiting -= 1
            if not free:
                raise QueueTimeout(round(time.monotonic() - started, 1))
            self.active += 1
            return Ticket(self)

    def _leave(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()

    @property
    def can_start(self) -> bool:
        """Whether a turn asked for now would start at once."""
        return self.active < self.capacity and self.waiting == 0

    def snapshot(self) -> dict:
        return {"active": self.active, "waiting": self.waiting, "capacity": self.capacity,
                "max_waiting": self.max_waiting}


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
