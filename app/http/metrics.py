"""Prometheus metrics, in the text format at ``/metrics`` (the convention of vLLM and most servers).

Each app gets its own registry, so several apps in one process (tests) never share counts.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a cached prefix's first token is ~0.2 s on a laptop CPU, a long reply tens of seconds.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, admission):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fsb_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        in_flight = Gauge("fsb_turns_in_flight", "Turns holding a slot (generating)", registry=r)
        in_flight.set_function(lambda: admission.active)
        queued = Gauge("fsb_turns_queued", "Turns waiting for a slot", registry=r)
        queued.set_function(lambda: admission.waiting)
        capacity = Gauge("fsb_turns_capacity", "Turns that may generate at once", registry=r)
        capacity.set_function(lambda: admission.capacity)
        self.rejected = Counter("fsb_turns_rejected", "Turns turned away, by reason "
                                "(queue_full, queue_timeout, rate_limit)", ["reason"], registry=r)
        self.disconnects = Counter("fsb_client_disconnects", "Clients that went away before their reply ended",
                                   ["route"], registry=r)
        self.ttft = Histogram("fsb_time_to_first_token_seconds", "From the request to the reply's first text",
                              ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.turn = Histogram("fsb_turn_duration_seconds", "From the request to the reply's end", ["route"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("fsb_generated_tokens", "Tokens generated for replies", ["route"], registry=r)
        for reason in ("queue_full", "queue_timeout", "rate_limit"):
            self.rejected.labels(reason=reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
