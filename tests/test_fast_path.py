"""The static-cache fast path (app/lm/fast.py) and continuous batching (app/lm/batching.py) on the tiny model, on CPU.

The fast path runs eagerly here (and traced by dynamo with the "eager" backend); its CUDA-graph speed is measured
only by bench/gpu.py on a GPU. What is checked: greedy (and seeded sampled) output equal to `TransformersLM`'s own
loop, with a cached prefix copied into the static cache -- longer than the sliding window too -- and the hook in
`TransformersLM.generate`. The scheduler: several threads at once each get exactly what they would get alone, and a
short request finishes while a long one admitted earlier is still decoding.
"""
from __future__ import annotations

import threading
import time

import pytest

from app.lm import Sampling, complete
from app.lm.batching import BatchScheduler
from app.lm.fast import FastPath, enable_fast_path
from app.lm.tiny import build_tiny_lm, default_corpus

SHOTS = "".join(f"Persona Information:\nI like {x}.\nDialogue:\nUser: hi\nAssistant: hello, I like {x}.\n\n"
                for x in ("cats", "boats", "bread"))
PROMPTS = [  # (prompt, prefix): prefix longer than the 16-token window, shorter than it, none, the whole prompt
    (SHOTS + "Dialogue:\nUser: what do you like?\nAssistant:", SHOTS),
    ("User: hi\nAssistant: hello\nUser: bye\nAssistant:", "User: hi\n"),
    ("User: tell me about boats\nAssistant:", None),
    (SHOTS, SHOTS),
]


@pytest.fixture(scope="module")
def lm():
    return build_tiny_lm(default_corpus())


def plain(lm, prompt, **kw):
    """The ordinary decode loop, with any fast path detached."""
    fast, lm.fast = getattr(lm, "fast", None), None
    try:
        return complete(lm, prompt, **kw)
    finally:
        lm.fast = fast


@pytest.mark.parametrize("compile", [False, "eager"], ids=["eager", "dynamo-traced"])
def test_fast_path_greedy_output_equals_the_ordinary_loop(lm, compile):
    cases = PROMPTS if compile is False else PROMPTS[:1]  # tracing is slow on CPU: the sliding-ring case only
    expected = []
    for prompt, prefix in cases:
        stats: dict = {}
        expected.append((plain(lm, prompt, prefix=prefix, max_new_tokens=40, stats=stats), stats))
    lm.fast = FastPath(lm, max_len=512, compile=compile)
    try:
        for _ in range(2):  # the second round reuses the static cache and the cached prefixes
            for (prompt, prefix), want in zip(cases, expected):
                stats = {}
                assert (complete(lm, prompt, prefix=prefix, max_new_tokens=40, stats=stats), stats) == want
        assert lm.fast.used == 2 * len(cases)
    finally:
        lm.fast = None


def test_fast_path_stops_and_sampling_match(lm):
    lm.fast = FastPath(lm, max_len=512, compile=False)
    try:
        prompt, prefix = PROMPTS[0]
        free = plain(lm, prompt, prefix=prefix, max_new_tokens=30)
        stop = free[4:6]
        assert complete(lm, prompt, prefix=prefix, stop=[stop], max_new_tokens=30) == free[: free.find(stop)]
        for s in (Sampling(temperature=1.2, top_k=50, seed=3), Sampling(repetition_penalty=3.0)):
            assert complete(lm, prompt, sampling=s, max_new_tokens=20) == plain(lm, prompt, sampling=s,
                                                                                   max_new_tokens=20)
    finally:
        lm.fast = None


def test_fast_path_declines_what_it_cannot_hold_and_is_cuda_only(lm):
    lm.fast = FastPath(lm, max_len=64, compile=False)
    try:
        prompt, prefix = PROMPTS[0]  # longer than 64 tokens: the ordinary loop takes it
        assert complete(lm, prompt, prefix=prefix, max_new_tokens=8) == plain(lm, prompt, prefix=prefix,
                                                                              max_new_tokens=8)
        assert lm.fast.used == 0
        first = lm.generate(PROMPTS[2][0], max_new_tokens=30)
        next(first)  # the fast path is busy with this stream...
        other = complete(lm, PROMPTS[1][0], max_new_tokens=10)  # ...so a concurrent one takes the ordinary loop
        assert other == plain(lm, PROMPTS[1][0], max_new_tokens=10) and lm.fast.used == 1
        first.close()
    finally:
        lm.fast = None
    assert enable_fast_path(lm) is None and getattr(lm, "fast", None) is None  # CPU: not attached


# ------------------------------------------------------------------------------------------ continuous batching
@pytest.mark.parametrize("compile", [False, "eager"], ids=["eager", "dynamo-traced"])
def test_concurrent_requests_each_get_what_they_would_get_alone(lm, compile):
    jobs = [(p, x, n) for (p, x), n in zip(PROMPTS, (40, 25, 33, 18))] + [(PROMPTS[2][0], None, 5)]
    if compile:  # every new batch size and length is a recompile on CPU: fewer, shorter jobs
        jobs = [(p, x, n // 3) for p, x, n in jobs]
    expected = [plain(lm, p, prefix=x, max_new_tokens=n) for p, x, n in jobs]
    sched = BatchScheduler(lm, max_batch=4, compile=compile)  # five requests, four rows: one waits for a row
    got: list = [None] * len(jobs)

    def client(i):
        p, x, n = jobs[i]
        got[i] = "".join(sched.generate(p, prefix=x, max_new_tokens=n))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == expected
        assert sched.max_rows_seen > 1  # they really shared the batch
        assert (sched._compiled is not None) == bool(compile)  # tracing held up (no fallback to eager)
    finally:
        sched.close()


def test_short_request_finishes_before_a_long_one_started_earlier(lm):
    sched = BatchScheduler(lm, max_batch=8)
    events: list[tuple[str, float]] = []
    long_started = threading.Event()

    def long_client():
        for i, _ in enumerate(sched.generate(PROMPTS[2][0], max_new_tokens=300)):
            long_started.set()
        events.append(("long done", time.perf_counter()))

    try:
        t = threading.Thread(target=long_client)
        t.start()
        assert long_started.wait(60)
        short = "".join(sched.generate(PROMPTS[1][0], max_new_tokens=4))
        events.append(("short done", time.perf_counter()))
        t.join(timeout=300)
        assert [e for e, _ in events] == ["short done", "long done"]
        assert short == plain(lm, PROMPTS[1][0], max_new_tokens=4)
    finally:
        sched.close()


def test_a_consumer_that_leaves_frees_its_row(lm):
    sched = BatchScheduler(lm, max_batch=1)
    try:
        stream = sched.generate(PROMPTS[2][0], max_new_tokens=500)
        next(stream)
        stream.close()  # e.g. the HTTP client went away
        assert complete(sched, PROMPTS[1][0], max_new_tokens=6) == plain(lm, PROMPTS[1][0], max_new_tokens=6)
    finally:
        sched.close()
