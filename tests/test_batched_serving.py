"""Serving shares the model: `load_lm` returns an LM whose concurrent `generate` calls run in one continuous batch
(app/lm/batching.py), each getting exactly what it would get alone -- text, stop cuts and stats -- while scoring from
other threads goes on, a reader that leaves frees its row, and a failing row fails alone (a failed forward pass fails
the rows that shared it, and serving goes on). On the tiny model, on CPU.

The solo reference is the wrapped `TransformersLM` itself (``lm.inner``), called while nothing else runs.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from app.lm import LMError, Sampling, complete, load_lm
from app.settings import Settings

SHOTS = "".join(f"Persona Information:\nI like {x}.\nDialogue:\nUser: hi\nAssistant: hello, I like {x}.\n\n"
                for x in ("cats", "boats", "bread"))
JOBS = [  # (prompt, prefix, max_new_tokens): lengths differ; prefixes longer than the 16-slot window, shorter, none
    (SHOTS + "Dialogue:\nUser: what do you like?\nAssistant:", SHOTS, 40),
    (SHOTS + "Dialogue:\nUser: do you sail?\nAssistant:", SHOTS, 23),
    ("User: hi\nAssistant: hello\nUser: bye\nAssistant:", "User: hi\n", 31),
    ("User: tell me about boats\nAssistant:", None, 12),
    ("User: a much longer opening question about bread, boats and the sea?\nAssistant:", None, 50),
    (SHOTS, SHOTS, 7),
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    served = load_lm(Settings.load(env={}, model="tiny", data_dir=tmp_path_factory.mktemp("data")))
    yield served
    served.close()


def solo(lm, prompt, **kw):
    """The unbatched path's text and stats (the wrapped backend, nothing else running)."""
    stats: dict = {}
    return complete(lm.inner, prompt, stats=stats, **kw), stats


def wait_until(check, timeout=30.0):
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def run_together(lm, clients, chats=None):
    """Start one thread per client while the model is held (as by a long forward pass), release it once every
    chat (the first ``chats`` clients, default all) has queued, so all of them are in the batch at once. Returns what
    each client returned or raised."""
    results: list = [None] * len(clients)

    def run(i):
        try:
            results[i] = clients[i]()
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    with lm.runner.lock:
        for t in threads:
            t.start()
        chats = len(clients) if chats is None else chats
        wait_until(lambda: lm.scheduler.queued == chats - 1)  # the first one is prefilling: waits for the lock
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return results


def client(lm, prompt, **kw):
    def call():
        stats: dict = {}
        return "".join(lm.generate(prompt, stats=stats, **kw)), stats
    return call


def test_load_lm_serves_through_one_shared_batch(lm):
    assert lm.name == "tiny" and lm.context_length == lm.inner.context_length
    expected = [solo(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS]
    steps_before = lm.scheduler.steps
    got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS])
    assert got == expected  # token for token, and the same stats ({"tokens", "finish"})
    assert all(text for text, _ in got)
    assert lm.scheduler.max_rows_seen == len(JOBS)  # all six decoded together...
    # ...in about as many forward passes as the longest chat alone needs, not one pass per token of every chat (plus
    # one: the chats that joined a running batch take their first token from a shared step, not from their prefill)
    assert lm.scheduler.steps - steps_before <= max(n for *_, n in JOBS) + 1 < sum(n for *_, n in JOBS) / 3
    assert lm.scheduler.running == 0


def test_chats_that_join_a_running_batch_prefill_inside_its_next_step(lm, monkeypatch):
    """Only the first chat prefills in a pass of its own; the four admitted while it runs are packed into the batch's
    next forward pass (app/lm/packed.py: their prompts ride along with the running row's token, one read of the
    weights for all) and take their first token from it -- and every chat still gets exactly what it gets alone."""
    assert lm.scheduler.pack  # the tiny Gemma 3, decoding itself, with sdpa attention
    expected = [solo(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:5]]
    runner, prefills, packed = lm.inner.runner, [], []
    forward, packed_step = runner.forward, runner.packed_step

    def recording(ids, *a, keep=1, decode=False, **kw):
        if not decode:
            prefills.append("body" if torch.is_tensor(keep) and keep.numel() == 0 else "logits")
        return forward(ids, *a, keep=keep, decode=decode, **kw)

    def packing(feed, positions, cache, mask, joiners, scoring=()):
        packed.append((feed.shape[0], [j.fed for j in joiners]))
        return packed_step(feed, positions, cache, mask, joiners, scoring)

    monkeypatch.setattr(runner, "forward", recording)
    monkeypatch.setattr(runner, "packed_step", packing)
    lm.inner.prefix_cache.clear()  # every prefix is encoded again
    got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:5]])
    assert got == expected
    assert prefills == ["logits"] * 3  # the first chat's prompt, and the two prefixes the cache encodes
    # the four joined in packed passes (one, or two when the last ones were queued after the first step began), each
    # pass with the running rows' tokens in it
    assert sum(len(fed) for _, fed in packed) == 4 and len(packed) <= 2
    assert all(rows >= 1 and all(n >= 1 for n in fed) for rows, fed in packed)


def test_without_packing_a_joining_chat_prefills_through_the_body_only(lm, monkeypatch):
    """Where passes cannot be packed (a float32 model with a bfloat16 decoder, another architecture), the chats
    admitted while rows are running prefill all but their last prompt token through the model's body (no output
    layer: no logits kept) and take their first token from the next shared step -- with the same texts."""
    monkeypatch.setattr(lm.scheduler, "pack", False)
    expected = [solo(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:5]]
    runner, prefills = lm.inner.runner, []
    forward = runner.forward

    def recording(ids, *a, keep=1, decode=False, **kw):
        if not decode:
            prefills.append("body" if torch.is_tensor(keep) and keep.numel() == 0 else "logits")
        return forward(ids, *a, keep=keep, decode=decode, **kw)

    monkeypatch.setattr(runner, "forward", recording)
    lm.inner.prefix_cache.clear()  # every prefix is encoded again: one prefill forward per chat at least
    got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:5]])
    assert got == expected
    assert prefills.count("body") == 4  # four chats joined the running batch
    assert prefills.count("logits") == 3  # the first chat's prompt, and the two prefixes the cache encodes


def test_long_generations_write_in_place_and_equal_their_solo_text(lm):
    """Rows decoded together for more steps than the spare slots of the in-place buffers (so the sliding window's view
    moves back to the buffer's start and full layers get a bigger buffer) give exactly their solo text, and the running
    batch's layers write in place (no copy of the whole cache per step)."""
    from app.lm.batching import _SPARE_SLOTS, _InPlaceLayer, _InPlaceSlidingLayer

    jobs = [(SHOTS + "Dialogue:\nUser: tell me everything about boats\nAssistant:", SHOTS, 3 * _SPARE_SLOTS),
            ("User: and about bread?\nAssistant:", None, 2 * _SPARE_SLOTS + 9)]
    expected = [solo(lm, p, prefix=x, max_new_tokens=n, stop=()) for p, x, n in jobs]
    assert all(stats["tokens"] == n for (_, stats), (*_, n) in zip(expected, jobs))  # no early end: every step runs
    kinds = set()
    step = lm.scheduler._step

    def watching():
        if lm.scheduler._cache is not None:
            kinds.update(type(layer) for layer in lm.scheduler._cache.layers)
        step()

    lm.scheduler._step = watching
    try:
        got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=n, stop=()) for p, x, n in jobs])
    finally:
        del lm.scheduler._step
    assert got == expected
    assert kinds == {_InPlaceLayer, _InPlaceSlidingLayer}


def test_stop_strings_cut_each_row_where_they_cut_alone(lm):
    jobs = []
    for prompt, prefix, n in JOBS:
        free, _ = solo(lm, prompt, prefix=prefix, max_new_tokens=n)
        stop = free[3:5] if len(free.strip()) > 6 else "\u2603"  # a stop from inside the text, or one never written
        jobs.append((prompt, prefix, n, [stop, "\nUser:"]))
    expected = [solo(lm, p, prefix=x, max_new_tokens=n, stop=s) for p, x, n, s in jobs]
    got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=n, stop=s) for p, x, n, s in jobs])
    assert got == expected
    assert sum(stats["finish"] == "stop" for _, stats in got) >= 3
    for (text, _), (*_, stops) in zip(got, jobs):
        assert not any(s in text for s in stops)


def test_a_reader_that_leaves_frees_its_row_and_the_others_finish(lm):
    left: dict = {}

    def leaver():
        stream = lm.generate(JOBS[4][0], max_new_tokens=400, stats=left)
        first = [next(stream), next(stream)]
        stream.close()  # the HTTP client went away
        return first

    expected = [solo(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:4]]
    got = run_together(lm, [leaver] + [client(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:4]])
    assert got[1:] == expected and len(got[0]) == 2
    wait_until(lambda: lm.scheduler.running == 0)
    assert left["tokens"] < 100  # it left the batch when its reader did, far from its 400 tokens


EXIT_AFTER_LEAVING = """
import torch
from app.lm.base import Sampling
from app.lm.batching import BatchedLM
from app.lm.tiny import build_tiny_lm, default_corpus

lm = BatchedLM(build_tiny_lm(default_corpus()))
forward, big = lm.inner.runner.forward, torch.randn(1200, 1200)


def slow(*args, **kwargs):  # a step that spends a while inside ATen, as a real model's does
    for _ in range(30):
        big @ big
    return forward(*args, **kwargs)


lm.inner.runner.forward = slow
pieces = lm.generate("User: hi\\nAssistant:", max_new_tokens=200, sampling=Sampling(0.0))
next(pieces)
pieces.close()  # a parser cut at a loop, a client gone: the row is dropped at the next step
print("left", flush=True)
"""


def test_a_process_that_ends_while_a_left_row_is_still_stepping_exits_cleanly():
    """Without the exit hook that joins the scheduler, the interpreter was torn down under the running forward:
    "terminate called without an active exception", exit status 134 (seen after `fsb eval skill dialkg-parse`)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", EXIT_AFTER_LEAVING], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "left"
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr


def test_a_failing_row_fails_alone(lm):
    too_long = "boats and bread " * 3000  # past the tiny model's 4096-token context
    clients = [client(lm, too_long, max_new_tokens=5),
               client(lm, JOBS[0][0], prefix=JOBS[0][1], max_new_tokens=20, sampling=Sampling(temperature=1e-300)),
               client(lm, JOBS[2][0], prefix=JOBS[2][1], max_new_tokens=30),
               client(lm, JOBS[3][0], max_new_tokens=12)]
    expected = [solo(lm, JOBS[2][0], prefix=JOBS[2][1], max_new_tokens=30), solo(lm, JOBS[3][0], max_new_tokens=12)]
    got = run_together(lm, clients)
    assert isinstance(got[0], LMError) and "context" in str(got[0])
    assert isinstance(got[1], LMError) and "probability" in str(got[1])  # a temperature too small to sample with
    assert got[2:] == expected
    assert complete(lm, JOBS[3][0], max_new_tokens=12) == expected[1][0]  # the scheduler serves on


def test_a_failed_forward_fails_the_rows_that_shared_it_and_serving_goes_on(lm, monkeypatch):
    real, steps = lm.runner.forward, []

    def failing(ids, *args, **kw):
        if ids.shape == (3, 1):  # a decode step of the three-row batch
            steps.append(1)
            if len(steps) == 4:
                raise RuntimeError("out of memory (simulated)")
        return real(ids, *args, **kw)

    monkeypatch.setattr(lm.runner, "forward", failing)
    got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=30) for p, x, _ in JOBS[:3]])
    assert all(isinstance(g, LMError) and "simulated" in str(g) for g in got)
    monkeypatch.undo()
    assert complete(lm, JOBS[3][0], max_new_tokens=12) == solo(lm, JOBS[3][0], max_new_tokens=12)[0]


def test_scoring_from_other_threads_while_chats_decode(lm):
    context, conts = "Dialogue:\nUser: do you like boats?\nAssistant:", [" yes, I love boats.", " no", " bread"]
    prefixes = [SHOTS, "Persona Information:\nI like tea.\n"]
    want_scores = lm.inner.score(context, conts, prefix="Dialogue:\n")
    want_prefixed = lm.inner.score_prefixes(prefixes, context)
    expected = [solo(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:4]]

    def scorer():
        return [(lm.score(context, conts, prefix="Dialogue:\n"), lm.score_prefixes(prefixes, context))
                for _ in range(5)]

    got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=n) for p, x, n in JOBS[:4]] + [scorer, scorer],
                       chats=4)
    assert got[:4] == expected
    for rounds in got[4:]:
        assert not isinstance(rounds, Exception), rounds
        for scores, prefixed in rounds:
            assert scores == pytest.approx(want_scores, abs=1e-4)
            assert prefixed == pytest.approx(want_prefixed, abs=1e-4)
    assert lm.count_tokens("hello there") == lm.inner.count_tokens("hello there") > 0
    assert lm.prefix_cache is lm.inner.prefix_cache


def test_a_scoring_pass_rides_in_the_running_batchs_next_step(lm, monkeypatch):
    """While chats decode, a selector's scoring pass is not a pass of its own that every chat waits for: its rows go
    into the batch's next step (`BatchScheduler.score`), with the same scores as alone and the chats' text unchanged.
    A step that fails fails its scoring pass with the chats that shared it; serving goes on."""
    context = "Dialogue:\nUser: do you like boats?\nAssistant: yes, I love boats.\nUser: and bread?"
    prefixes = [SHOTS, "Persona Information:\nI like tea.\n"]
    want = lm.inner.score_prefixes(prefixes, context)
    jobs = JOBS[:2] + [(JOBS[2][0], JOBS[2][1], 300)]  # one chat decodes long enough for the scorer to meet it
    expected = [solo(lm, p, prefix=x, max_new_tokens=n) for p, x, n in jobs]
    runner, packed_step = lm.inner.runner, lm.inner.runner.packed_step
    passes = []

    def packing(feed, positions, cache, mask, joiners, scoring=()):
        passes.append((feed.shape[0], len(scoring)))
        return packed_step(feed, positions, cache, mask, joiners, scoring)

    monkeypatch.setattr(runner, "packed_step", packing)

    def scorer():
        wait_until(lambda: lm.scheduler.running > 0)
        return [lm.score_prefixes(prefixes, context) for _ in range(3)]

    got = run_together(lm, [client(lm, p, prefix=x, max_new_tokens=n) for p, x, n in jobs] + [scorer], chats=3)
    assert got[:3] == expected
    assert not isinstance(got[3], Exception), got[3]
    for scores in got[3]:
        assert scores == pytest.approx(want, abs=1e-4)
    assert any(rows > 0 and scoring for rows, scoring in passes), passes  # scored with chats in the same pass

    def failing(feed, positions, cache, mask, joiners, scoring=()):
        if scoring:
            raise RuntimeError("simulated failure")
        return packed_step(feed, positions, cache, mask, joiners, scoring)

    monkeypatch.setattr(runner, "packed_step", failing)
    got = run_together(lm, [client(lm, JOBS[2][0], prefix=JOBS[2][1], max_new_tokens=300), scorer], chats=1)
    assert all(isinstance(g, LMError) and "simulated" in str(g) for g in got), got
    monkeypatch.undo()
    assert lm.score_prefixes(prefixes, context) == pytest.approx(want, abs=1e-4)
    assert complete(lm, JOBS[3][0], max_new_tokens=12) == solo(lm, JOBS[3][0], max_new_tokens=12)[0]


def test_generate_batch_and_seeded_sampling_through_the_batch(lm):
    prompts = [JOBS[0][0], JOBS[1][0]]
    stats_b, stats_s = [{}, {}], [{}, {}]
    out = ["", ""]
    for row, piece in lm.generate_batch(prompts, max_new_tokens=15, prefix=SHOTS, stats=stats_b):
        out[row] += piece
    assert [(o, s) for o, s in zip(out, stats_b)] == [solo(lm, p, prefix=SHOTS, max_new_tokens=15) for p in prompts]
    sampling = Sampling(temperature=1.3, top_k=40, repetition_penalty=1.3, seed=11)
    assert complete(lm, prompts[0], sampling=sampling, max_new_tokens=15, stats=stats_s[0]) == complete(
        lm.inner, prompts[0], sampling=sampling, max_new_tokens=15, stats=stats_s[1])
    assert stats_s[0] == stats_s[1]


def test_a_packed_pass_gives_the_logits_and_caches_of_its_plain_passes(lm):
    """`ModelRunner.packed_step` against the passes it replaces, on the tiny float32 Gemma 3 (16-slot sliding window):
    two running rows' decode step (left-padded, different lengths) plus two joining prompts, one from a cached prefix
    with more new tokens than the window and one from nothing, give each row's and each joiner's logits and caches as
    the plain decode step and the two plain prefills do; with no running rows, the joiners alone likewise."""
    from app.lm.batching import _merge
    from app.lm.prefix_cache import fork_cache

    inner, runner = lm.inner, lm.inner.runner
    tok = inner.tok
    rows = [tok.encode(SHOTS + "Dialogue:\nUser: what do you like?\nAssistant: I", add_special_tokens=True),
            tok.encode("User: hi\nAssistant: hello", add_special_tokens=True)]
    prefix = tok.encode(SHOTS, add_special_tokens=True)
    joining = [prefix + tok.encode("Dialogue:\nUser: a much longer question about bread, boats, cats and the sea, "
                                   "asked slowly?\nAssistant:", add_special_tokens=False),
               tok.encode("User: tell me about boats\nAssistant:", add_special_tokens=True)]
    assert len(joining[0]) - len(prefix) > 16

    def batch():  # the two rows prefilled (all but their last token) and merged as the scheduler merges them
        cache = mask = None
        for ids in rows:
            c, _ = runner.prefill(ids[:-1], 0)
            if cache is None:
                cache, mask = c, torch.ones(1, len(ids) - 1, dtype=torch.long)
            else:
                cache, mask = _merge(cache, mask, c, len(ids) - 1)
        return cache, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)

    feed = torch.tensor([[ids[-1]] for ids in rows])
    positions = torch.tensor([[len(ids) - 1] for ids in rows])
    inner.prefix_cache.clear()
    cache, mask = batch()
    plain_cache, plain_rows = runner.forward(feed, fork_cache(cache), mask=mask, positions=positions, decode=True)
    plain_joiners = [runner.prefill(ids, len(prefix) if i == 0 else 0) for i, ids in enumerate(joining)]

    inner.prefix_cache.clear()
    cache, mask = batch()
    plans = [runner.plan_prefill(ids, len(prefix) if i == 0 else 0) for i, ids in enumerate(joining)]
    assert plans[0].done >= len(prefix) and plans[1].done == 0  # (the first row's checkpoint may go further)
    packed_cache, logits = runner.packed_step(feed, positions, cache, mask, plans)
    for p in plans:
        runner.finish_prefill(p)
    assert logits.shape[0] == 4
    assert torch.allclose(logits[:2], plain_rows[:, -1], atol=1e-4)
    for (c, want), got, p in zip(plain_joiners, logits[2:], plans):
        assert torch.allclose(got, want, atol=1e-4)
        for mine, theirs in zip(p.cache.layers, c.layers):
            assert mine.keys.shape == theirs.keys.shape and torch.allclose(mine.keys, theirs.keys, atol=1e-4)
    for mine, theirs in zip(packed_cache.layers, plain_cache.layers):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-4)

    plans = [runner.plan_prefill(ids, len(prefix) if i == 0 else 0) for i, ids in enumerate(joining)]
    none, logits = runner.packed_step(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long),
                                      None, None, plans)
    assert none is None and logits.shape[0] == 2
    assert all(torch.allclose(got, want, atol=1e-4) for got, (_, want) in zip(logits, plain_joiners))


def test_a_joining_row_is_written_into_a_free_row_and_a_leaving_one_is_swapped_out():
    """The running batch's buffers have spare rows: a chat no longer than the batch is written into one (right-aligned,
    zeros on its left, the same buffer), a longer one gets new buffers with every row left-padded to it; and
    `BatchScheduler._select` fills a leaving row's place with the last row, in the same buffer."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from app.lm.batching import _SPARE_ROWS, BatchScheduler, _append_in_place, _merge

    def cache_of(*rows):  # one full-attention layer, keys and values [B, 1, n, 2] holding the row's values
        cache = DynamicCache()
        layer = DynamicLayer()
        layer.keys = torch.stack([r for r in rows])[:, None, :, None].expand(-1, 1, -1, 2).clone()
        layer.values = layer.keys.clone()
        layer.is_initialized = True
        cache.layers = [layer]
        return cache

    batch = cache_of(torch.tensor([1.0, 2, 3, 4]))
    mask = torch.ones(1, 4, dtype=torch.long)
    batch, mask = _merge(batch, mask, cache_of(torch.tensor([5.0, 6, 7, 8, 9, 10])), 6)  # longer: new buffers
    _append_in_place(batch)
    layer = batch.layers[0]
    buffer = layer._kbuf
    assert buffer.shape[0] == 2 + _SPARE_ROWS
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    with torch.inference_mode():
        layer.update(torch.full((2, 1, 1, 2), 11.0), torch.full((2, 1, 1, 2), 11.0))  # a decode step, in place
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.inference_mode():
        batch, mask = _merge(batch, mask, cache_of(torch.tensor([12.0, 13])), 2)  # shorter: into a free row
    assert layer._kbuf is buffer
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 1, 2, 3, 4, 11], [5, 6, 7, 8, 9, 10, 11], [0] * 5 + [12, 13]]
    assert mask[2].tolist() == [0] * 5 + [1, 1]

    sched = BatchScheduler.__new__(BatchScheduler)  # only the state `_select` works on
    sched._rows, sched._cache, sched._mask, sched._compiled = ["a", "b", "c"], batch, mask, None
    sched._select([1, 2])  # "a" leaves: "c" takes its place
    assert sched._rows == ["c", "b"] and layer._kbuf is buffer
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 0, 0, 0, 12, 13], [5, 6, 7, 8, 9, 10, 11]]
    assert torch.equal(layer.values, layer.keys)
    assert sched._mask.tolist() == [[0] * 5 + [1, 1], [1] * 7]


def test_without_transformers_attention_registry_packing_is_off_instead_of_failing(monkeypatch):
    """`packed.install` wraps transformers' registered sdpa function; a transformers without that registry turns
    packing off (joining chats then prefill alone) rather than failing the model's load."""
    import transformers

    from app.lm import packed

    class NoRegistry:
        def __getitem__(self, name):
            raise KeyError(name)

    monkeypatch.setattr(transformers, "AttentionInterface", NoRegistry)
    assert packed.install.__wrapped__() is False
    monkeypatch.undo()
    assert packed.install() is True
