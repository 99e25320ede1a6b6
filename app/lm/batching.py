"""Continuous batching: many chats share one running batch on one model, joining and leaving at step boundaries.

A scheduler thread owns the batch. Each request joins between steps, starting from its constant prefix in the prefix
cache (a skill's shots are never re-encoded). The first request of an idle batch is prefilled alone; one admitted while
rows run is prefilled inside the next step's forward pass, packed after the rows' tokens (`app.lm.packed`: the weights
are read once for both; where the model cannot be packed, it prefills alone through the model's body). Its first
token is chosen and streamed at once, and its KV cache is merged into the batch. Each step runs ONE forward pass for
every row's last token, chooses each
row's next token, streams each row's new text to that request's own queue, and drops the rows that finished (or whose
reader went away). A short request therefore finishes while a long one admitted earlier keeps going: nobody waits for
anybody else to finish, only for the step in progress.

Batch layout (the same left padding the backend's own batches use, so Gemma's sliding-window layers, which count
cache slots, see exactly what an unbatched row sees):

    cache  full-attention layers: keys/values [B, heads, S, head_dim]   S = slots of the longest row
           sliding layers:        keys/values [B, heads, min(S, window-1), head_dim], cumulative_length = S
    mask   [B, S]  1 = real token; each row's real tokens are contiguous and end at slot S-1 (pads on the left)
    row    per row: the token chosen but not yet fed, and its position (the row's real length)

A new row of L slots is left-padded to S (or every other row is, when L > S); leaving rows are removed with an index
select, and slots that are padding in every remaining row are trimmed from the left. Between such changes a decode
step writes its keys and values into spare slots of one buffer per layer (`_InPlaceLayer`), not into a fresh copy.
Prefix *compute* is shared (cached prefixes are forked, not re-encoded); prefix *memory* is not (each row holds its
copy once merged), which would need paged attention (vLLM) -- see docs/scaling.md.

Failures stay with their row where they can: a prompt that cannot join, or a token that cannot be chosen, ends that
request with an `LMError` and the others go on; only a failed forward pass (which every row shared) fails them all.

Shapes: ids [B, 1]; positions [B, 1]; logits [B, V].
"""
from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .base import LMError, Sampling
from .decoding import RowStream, choose_one, generator_for, is_greedy, left_pad
from .packed import Joiner

log = logging.getLogger(__name__)

_DONE = object()  # a request's last item: it finished
_CLOSE = object()  # the scheduler's queue: stop
_SCORE = object()  # the scheduler's queue: a scoring pass is waiting for the next step (`BatchScheduler.score`)
_LIVE: "weakref.WeakSet[BatchScheduler]" = weakref.WeakSet()  # schedulers to stop before the interpreter goes


@atexit.register
def _close_all() -> None:
    """Stop every scheduler at exit. A reader that left early (a parser cut at a loop, a client gone) leaves its row
    to be dropped at the next step; a process that ended meanwhile would tear down the interpreter under a forward
    still running on the scheduler thread ("terminate called without an active exception"). Closing joins it."""
    for scheduler in list(_LIVE):
        scheduler.close()


class _ScoreJob:
    """Texts to score in the running batch's next step: the joiners of `TransformersLM.score_prefixes`' packed pass
    and its function of their hidden states; ``done`` is set after the step (``error``: why it failed)."""

    __slots__ = ("joiners", "score", "done", "error")

    def __init__(self, joiners: list[Joiner], score):
        self.joiners, self.score, self.done, self.error = joiners, score, threading.Event(), None

    def fail(self, exc: BaseException) -> None:
        self.error = exc if isinstance(exc, LMError) else LMError(f"the model failed while scoring: {exc}")
        self.done.set()


@dataclass
class Request:
    """A generation waiting for or running in the batch; its output goes to ``sink`` as ``(tag, item)`` pairs:
    text pieces, then `_DONE` or the exception that ended it."""

    prompt: str
    stops: list[str]
    max_new_tokens: int
    sampling: Sampling
    prefix: str | None
    sink: queue.Queue
    tag: int = 0
    stats: dict | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    req: Request
    stream: RowStream
    rng: torch.Generator | None
    pos: int  # position of the next token fed (the row's real length so far)
    token: int = -1  # chosen, streamed, not yet fed


class BatchScheduler:
    """Continuous batching over one `TransformersLM`: `submit` from any thread, read the request's sink.

    Args:
        lm: the loaded `TransformersLM` (its model, tokenizer, prefix cache and forward lock are shared).
        max_batch: most rows decoded together; later requests wait at the step boundary for a free row.
        compile: compile the batched decode step with dynamic shapes (True: inductor; a string: that backend,
            e.g. "eager" to check tracing on CPU). Falls back to eager if tracing fails.
        idle_exit_s: the scheduler thread exits after this long with nothing to do and starts again on the next
            request, so an unused scheduler holds no thread (and can be garbage collected with its model).
    Example:
        >>> sched = BatchScheduler(lm, max_batch=16)
        >>> "".join(sched.generate("User: hi\\nAssistant:", stop=["\\nUser:"]))
    """

    def __init__(self, lm, max_batch: int = 16, compile: bool | str = False, idle_exit_s: float = 2.0):
        self.lm = lm
        self.runner = lm.runner
        self.max_batch = max(1, max_batch)
        self.idle_exit_s = idle_exit_s
        # The decode step's shapes change every step (batch size, cache length), so it is compiled with dynamic shapes
        # and without CUDA graphs: what it removes is the per-module Python overhead that dominates eager decoding.
        self._compiled = None
        if compile:
            opts = {} if compile is True else {"backend": compile}
            self._compiled = torch.compile(self._model_step, dynamic=True, fullgraph=False, **opts)
        self._queue: queue.Queue = queue.Queue()  # Requests from clients, or _CLOSE
        self._waiting: collections.deque[Request] = collections.deque()  # taken from the queue, no free row yet
        self._rows: list[_Row] = []
        # Prompts admitted while rows run, prefilled inside the next step's pass (`ModelRunner.packed_step`)
        self._joiners: list[tuple[_Row, Joiner]] = []
        # (not with a compiled step: its cache would then hold inference-mode tensors that it updates in place)
        self.pack = not compile and lm.runner.can_pack()
        self._scoring: list[_ScoreJob] = []  # scoring passes for the next step (guarded by _lock)
        if self.pack and hasattr(lm, "score_via"):
            lm.score_via = self.score
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, S]
        self._lock = threading.Lock()  # guards _thread, _closed and _scoring
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # batched forward passes run (for tests and benchmarks)
        self.max_rows_seen = 0
        _LIVE.add(self)

    # ------------------------------------------------------------------------------------------ client side
    def submit(self, prompt: str, stop: Sequence[str] = (), max_new_tokens: int = 64, sampling: Sampling = Sampling(),
               prefix: str | None = None, sink: queue.Queue | None = None, tag: int = 0,
               stats: dict | None = None) -> Request:
        """Queue a request; its pieces arrive on ``req.sink``. Set ``req.cancelled`` to drop it at the next step."""
        req = Request(prompt, [s for s in stop if s], max_new_tokens, sampling, prefix, sink or queue.Queue(), tag,
                      stats)
        with self._lock:
            if self._closed:
                raise LMError("the batch scheduler is closed")
            self._queue.put(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fsb-batch-scheduler", daemon=True)
                self._thread.start()
        return req

    def generate(self, prompt: str, stop: Sequence[str] = (), max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), prefix: str | None = None, stats: dict | None = None) -> Iterator[str]:
        """Stream one request's pieces as the batch produces them (submitted on the first ``next``)."""
        req = self.submit(prompt, stop, max_new_tokens, sampling, prefix, stats=stats)
        try:
            while True:
                _, item = req.sink.get()
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            req.cancelled.set()  # a consumer that stops early (client gone) frees its row at the next step

    def score(self, joiners: list[Joiner], score) -> bool:
        """Run a scoring pass (`TransformersLM.score_prefixes`) inside the running batch's next step, so that the
        running chats' tokens ride along instead of waiting for it, and wait for it. False, at once, when no batch is
        running (the caller then runs the pass alone). Raises the `LMError` that failed the step."""
        if not self.pack or threading.current_thread() is self._thread:
            return False
        job = _ScoreJob(joiners, score)
        with self._lock:  # queued under the lock: an idle scheduler leaving now sees the queue is not empty
            if self._thread is None or self._closed or not self._rows:
                return False
            self._scoring.append(job)
            self._queue.put(_SCORE)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return True

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Requests submitted that have not joined the batch yet."""
        return self._queue.qsize() + len(self._waiting)

    def close(self) -> None:
        """Stop the scheduler: running and waiting requests end with an `LMError`; later submits raise one."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._queue.put(_CLOSE)
        if thread is not None:
            thread.join(timeout=30)

    # --------------------------------------------------------------------------------------- scheduler side
    def _loop(self) -> None:
        try:
            while self._take():
                try:
                    self._admit()
                    if self._rows or self._joiners or self._scoring:
                        self._step()
                except Exception as exc:  # a failed batched forward fails every running row, never the scheduler
                    log.exception("batched generation failed")
                    self._fail_all(exc, waiting=False)
        except BaseException as exc:  # the loop itself broke: nobody may wait for an answer that never comes
            log.exception("the batch scheduler stopped")
            with self._lock:  # whatever is queued now fails too; a later submit starts a fresh thread
                self._thread = None
                while not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is not _CLOSE and item is not _SCORE:
                        self._waiting.append(item)
            self._fail_all(exc, waiting=True)
            raise

    def _fail_all(self, exc: BaseException, waiting: bool) -> None:
        err = exc if isinstance(exc, LMError) else LMError(f"the model failed while generating: {exc}")
        for row in self._rows + [row for row, _ in self._joiners]:
            row.req.sink.put((row.req.tag, err))
        self._reset()
        self._joiners = []
        with self._lock:
            jobs, self._scoring = self._scoring, []
        for job in jobs:
            job.fail(err)
        if waiting:
            for req in self._waiting:
                req.sink.put((req.tag, err))
            self._waiting.clear()

    def _take(self) -> bool:
        """Move queued requests to the waiting line (blocking while there is nothing to do). False: exit now."""
        idle = not self._rows and not self._waiting and not self._joiners
        while True:
            try:
                item = self._queue.get(timeout=self.idle_exit_s) if idle else self._queue.get_nowait()
            except queue.Empty:
                if not idle:
                    return True
                with self._lock:  # nothing to do for a while: let the thread go (submit starts a new one)
                    if self._queue.empty():
                        self._thread = None
                        return False
                continue
            if item is _CLOSE:
                self._fail_all(LMError("the batch scheduler was closed"), waiting=True)
                return False
            if item is not _SCORE:  # (a scoring job is in `_scoring` already: the item only wakes the loop)
                self._waiting.append(item)
            idle = False

    def _admit(self) -> None:
        """Waiting requests join the batch while there are free rows."""
        while self._waiting and len(self._rows) + len(self._joiners) < self.max_batch:
            req = self._waiting.popleft()
            if req.cancelled.is_set():
                continue
            try:
                joining = self._prefill(req)
            except Exception as exc:  # this request only: the batch is untouched
                if not isinstance(exc, LMError):
                    log.exception("prefill failed")
                req.sink.put((req.tag, exc if isinstance(exc, LMError) else LMError(f"the model failed: {exc}")))
                continue
            if joining is not None:
                self._join(*joining)

    def _prefill(self, req: Request):
        """Prefill one request alone (prefix from the cache) and stream its first token. Returns (row, its batch-1
        cache) to join the batch, or None when the request is already over."""
        lm = self.lm
        ids, prefix_len = lm.encode(req.prompt, req.prefix)
        room = lm.context_length - len(ids)
        if room <= 0:  # would run past the position table of the model every row shares
            raise LMError(f"the prompt is {len(ids)} tokens; the model's context is {lm.context_length}")
        stream = RowStream(lm.tok, lm.eos_ids, ids[-1], req.stops, min(req.max_new_tokens, room),
                           req.sampling.avoid, req.sampling.not_first)
        row = _Row(req, stream, generator_for(req.sampling), len(ids))
        if stream.done:
            self._finish(row)
            return None
        if self._rows and self.pack:
            # Joining a running batch: its prompt rides along with the rows' next tokens in the next step's forward
            # pass (the weights are read once for both), which also chooses its first token.
            joiner = self.runner.plan_prefill(ids, prefix_len)
            if joiner is not None:
                self._joiners.append((row, joiner))
                return None
        if self._rows and prefix_len < len(ids) - 1:
            # Joining a running batch: the prompt but its last token goes through the model's body alone, and that
            # token is fed with the batch's next step, which chooses this row's first token with everyone else's.
            # The output layer (most of a small model's weights: gemma-3-270m's is 168M of 268M parameters) is
            # then read once per step for all rows instead of once more for this prefill.
            cache, _ = self.runner.prefill(ids[:-1], prefix_len, head=False)  # batch 1, len(ids) - 1 slots
            row.pos, row.token = len(ids) - 1, ids[-1]
            return row, cache
        cache, logits = self.runner.prefill(ids, prefix_len)  # cache: batch 1, len(ids) slots; logits [V]
        self._advance(row, choose_one(logits, stream.generated, req.sampling, row.rng, stream.banned()))
        if stream.done or req.cancelled.is_set():
            self._finish(row)
            return None
        return row, cache

    def _join(self, row: _Row, cache) -> None:
        """Merge a prefilled row's KV into the running batch (left-padding the shorter side)."""
        cache = self.runner.for_decoding(cache)  # float32 prefill, bfloat16 decoder: cast the one row, not the batch
        if not self._rows:
            self._cache, self._mask = cache, torch.ones(1, row.pos, dtype=torch.long)
        else:
            try:
                with torch.inference_mode(self._compiled is None):  # (the buffers were made inside the model's pass)
                    self._cache, self._mask = _merge(self._cache, self._mask, cache, row.pos)
            except Exception as exc:  # the batch may be half merged: the loop fails every row; this one too
                row.req.sink.put((row.req.tag, LMError(f"the model failed while generating: {exc}")))
                raise
        _append_in_place(self._cache)
        self._rows.append(row)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _step(self) -> None:
        """One forward for every row's pending token (and the prompts joining, packed into it), then each row's next
        token; finished rows leave, joined prompts become rows."""
        self._drop([i for i, r in enumerate(self._rows) if r.req.cancelled.is_set()])
        waiting, self._joiners, joiners = self._joiners, [], []
        for row, joiner in waiting:  # one check per joiner: one that left now is answered, never dropped unanswered
            if row.req.cancelled.is_set():
                self._finish(row)
            else:
                joiners.append((row, joiner))
        with self._lock:
            jobs, self._scoring = self._scoring, []
        rows = self._rows
        if not rows and not joiners and not jobs:
            return
        feed = torch.tensor([[r.token] for r in rows], dtype=torch.long).view(len(rows), 1)  # [B, 1]
        positions = torch.tensor([[r.pos] for r in rows], dtype=torch.long).view(len(rows), 1)  # [B, 1]
        if rows:
            self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype)], dim=1)  # [B, S+1]
        if joiners or jobs:
            try:
                self._cache, logits = self.runner.packed_step(
                    feed, positions, self._cache, self._mask, [j for _, j in joiners],
                    scoring=[(job.joiners, job.score) for job in jobs])  # [B + J, V]
            except BaseException as exc:
                self._joiners = joiners  # failed with the rows that shared the pass (`_fail_all`)
                for job in jobs:
                    job.fail(exc)
                raise
            for job in jobs:
                job.done.set()
            if not rows and not joiners:
                return
            logits, first = logits[: len(rows)], logits[len(rows):]
        else:
            self._cache, logits = self._decode_step(feed, positions)  # logits [B, V]
        self.steps += 1
        greedy = logits.float().argmax(dim=-1).tolist() if any(is_greedy(r.req.sampling) for r in rows) else None
        done = []
        for i, row in enumerate(rows):
            row.pos += 1
            try:
                s = row.req.sampling
                token = (greedy[i] if is_greedy(s)
                         else choose_one(logits[i], row.stream.generated, s, row.rng, row.stream.banned()))
                self._advance(row, token)
            except Exception as exc:  # this row's choice or text failed: it alone ends
                log.exception("generation failed for one row")
                row.req.sink.put((row.req.tag, LMError(f"the model failed while generating: {exc}")))
                done.append(i)
                continue
            if row.stream.done or row.req.cancelled.is_set():
                self._finish(row)
                done.append(i)
        self._drop(done, finished=True)
        if joiners:
            self._joined(joiners, first)

    def _joined(self, joiners: list[tuple[_Row, Joiner]], first: torch.Tensor) -> None:
        """After a packed pass: each joiner's checkpoint is kept, its first token chosen and streamed, and its cache
        merged into the batch (unless it is over already)."""
        for (row, joiner), logits in zip(joiners, first):
            try:
                self.runner.finish_prefill(joiner)
                s = row.req.sampling
                self._advance(row, choose_one(logits, row.stream.generated, s, row.rng, row.stream.banned()))
            except Exception as exc:  # this request only
                log.exception("generation failed for one row")
                row.req.sink.put((row.req.tag, LMError(f"the model failed while generating: {exc}")))
                continue
            if row.stream.done or row.req.cancelled.is_set():
                self._finish(row)
                continue
            self._join(row, joiner.cache)

    def _advance(self, row: _Row, token: int) -> None:
        row.token = token
        piece = row.stream.push(token)
        if piece and not row.req.cancelled.is_set():
            row.req.sink.put((row.req.tag, piece))

    def _model_step(self, ids: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor):
        out = self.lm.model(input_ids=ids, cache=cache, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
        return out.cache, out.logits[:, -1]

    def _decode_step(self, feed: torch.Tensor, positions: torch.Tensor):
        """One forward for every row: ids, positions [B, 1] -> (cache, logits [B, V])."""
        if self._compiled is None:
            cache, out = self.runner.forward(feed, self._cache, mask=self._mask, positions=positions, decode=True)
            return cache, out[:, -1]
        dev = self.runner.device
        try:
            with self.runner.lock, torch.no_grad():
                return self._compiled(feed.to(dev), self._cache, self._mask.to(dev), positions.to(dev))
        except Exception as exc:  # tracing fails before the step runs: the cache is untouched, go eager for good
            log.warning("compiled batched decoding failed (%s); decoding eagerly from now on", exc)
            self._compiled = None
            return self._decode_step(feed, positions)

    def _finish(self, row: _Row) -> None:
        if row.req.stats is not None:
            row.req.stats.update(row.stream.stats())
        row.req.sink.put((row.req.tag, _DONE))

    def _drop(self, gone: list[int], finished: bool = False) -> None:
        """Remove rows ``gone`` (already answered when ``finished``) from the batch."""
        if not gone:
            return
        if not finished:
            for i in gone:
                self._finish(self._rows[i])
        keep = [i for i in range(len(self._rows)) if i not in set(gone)]
        if not keep:
            self._reset()
            return
        self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; trim slots that are padding in every remaining row.

        A leaving row's place is taken by the last row: one row of each layer's buffer is copied and the batch's views
        get one row shorter, instead of copying every remaining row into new tensors (twice: the next step's in-place
        write copied them again into a buffer). The rows' order changes; nothing depends on it."""
        rows, mask, layers = list(self._rows), self._mask, [layer for layer in self._cache.layers
                                                           if getattr(layer, "keys", None) is not None
                                                           and layer.keys.numel()]
        if all(_in_buffer(layer) for layer in layers):
            with torch.inference_mode(self._compiled is None):  # the buffers were made inside the model's pass
                for gone in sorted(set(range(len(rows))) - set(keep), reverse=True):
                    last = len(rows) - 1
                    if gone != last:
                        rows[gone] = rows[last]
                        mask[gone] = mask[last]
                        for layer in layers:
                            layer.keys[gone] = layer.keys[last]
                            layer.values[gone] = layer.values[last]
                    rows.pop()
                    for layer in layers:
                        layer.keys, layer.values = layer.keys[:last], layer.values[:last]
            self._rows, self._mask = rows, mask[: len(rows)]
        else:  # not (yet) in buffers of the batch's own (just merged, or aliasing a cached prefix): copies
            idx = torch.tensor(keep)
            self._rows = [rows[i] for i in keep]
            self._mask = mask[idx]
            dev = idx.to(self.runner.device)
            for layer in layers:
                layer.keys, layer.values = layer.keys[dev], layer.values[dev]
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-pad slots
        if lead:
            self._mask = self._mask[:, lead:]
            slots = self._mask.shape[1]
            for layer in self._cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > slots:
                    cut = layer.keys.shape[-2] - slots
                    layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
                    layer._start = getattr(layer, "_start", 0) + cut  # still a view of its buffer
                if hasattr(layer, "cumulative_length") and not torch.is_tensor(layer.cumulative_length):
                    layer.cumulative_length = slots

    def _reset(self) -> None:
        self._rows, self._cache, self._mask = [], None, None


# Free slots kept after a running batch's keys and values, so that a decode step writes its own in place, and free
# rows, so that a chat joining writes its own into them (`_merge`).
_SPARE_SLOTS = 64
_SPARE_ROWS = 4


class _InPlaceLayer(DynamicLayer):
    """A full-attention layer of the running batch whose decode steps write into spare slots of one buffer instead of
    concatenating (transformers' `DynamicLayer` copies the layer's whole cache every step: with eight rows of ~800
    slots that was 7.8 of a 47 ms step). The buffer also has spare rows, for chats that join (`_merge`); rows that
    leave are swapped out (`BatchScheduler._select`). Anything else that replaces ``keys`` is copied into a new
    buffer at the next step."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        b, start, end = _write_in_place(self, key_states, value_states)
        self.keys, self.values = self._kbuf[:b, :, start:end], self._vbuf[:b, :, start:end]
        return self.keys, self.values


class _InPlaceSlidingLayer(DynamicSlidingWindowLayer):
    """`_InPlaceLayer` for a sliding-window layer: the window kept is a moving view of the buffer, moved back to its
    start when the spare slots run out (one copy of the window every `_SPARE_SLOTS` steps)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.record_past:
            return super().update(key_states, value_states, *args, **kwargs)
        b, start, end = _write_in_place(self, key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full = self._kbuf[:b, :, start:end], self._vbuf[:b, :, start:end]  # the window before this step and the new
        kept = max(start, end - self.sliding_window + 1)  # then only the last sliding_window - 1 slots
        self.keys, self.values, self._start = self._kbuf[:b, :, kept:end], self._vbuf[:b, :, kept:end], kept
        return full


def _in_buffer(layer, add: int = 0) -> bool:
    """Whether ``layer.keys``/``values`` are views at ``layer._start`` of the layer's own buffers (rows from the
    first, the same layout), with room for ``add`` more slots."""
    buf, start = getattr(layer, "_kbuf", None), getattr(layer, "_start", 0)
    return (buf is not None and layer.keys.dtype == buf.dtype and layer.keys.shape[1] == buf.shape[1]
            and layer.keys.shape[0] <= buf.shape[0] and layer.keys.stride() == buf.stride()
            and start + layer.keys.shape[-2] + add <= buf.shape[-2]
            and layer.keys.data_ptr() == buf[:, :, start:].data_ptr()
            and layer.values.data_ptr() == layer._vbuf[:, :, start:].data_ptr())


def _write_in_place(layer, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[int, int, int]:
    """Write a step's keys and values [B, heads, add, head_dim] after ``layer``'s own, into its buffers (`_buffered`).
    Returns (B, start, end): the layer's slots, old and new, are ``[:B, :, start:end]`` of the buffers now."""
    b, n = key_states.shape[0], layer.keys.shape[-2]
    start = _buffered(layer, key_states.shape[-2])
    end = start + n + key_states.shape[-2]
    layer._kbuf[:b, :, start + n : end] = key_states
    layer._vbuf[:b, :, start + n : end] = value_states
    return b, start, end


def _buffered(layer, add: int) -> int:
    """Make ``layer.keys``/``values`` views of buffers with room for ``add`` more slots (new buffers, with spare rows
    and slots, when they are not yet or the room ran out); returns where they start in them (``layer._start``)."""
    if _in_buffer(layer, add):
        return getattr(layer, "_start", 0)
    b, n = layer.keys.shape[0], layer.keys.shape[-2]
    layer._kbuf, layer._vbuf = _new_buffers(layer.keys, layer.values, b + _SPARE_ROWS, n + add + _SPARE_SLOTS)
    layer._kbuf[:b, :, :n] = layer.keys
    layer._vbuf[:b, :, :n] = layer.values
    layer._start = 0
    return 0


def _new_buffers(keys: torch.Tensor, values: torch.Tensor, rows: int, slots: int):
    return (keys.new_empty(rows, keys.shape[1], slots, keys.shape[-1]),
            values.new_empty(rows, values.shape[1], slots, values.shape[-1]))


def _right_aligned(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write ``src`` into the last slots of ``dst`` (slots on dim -2) and zeros into the slots before it."""
    pad = dst.shape[-2] - src.shape[-2]
    dst[..., :pad, :] = 0
    dst[..., pad:, :] = src


def _append_in_place(cache) -> None:
    """Give the running batch's layers the in-place update (only layers of exactly transformers' dynamic kinds)."""
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = _InPlaceLayer
        elif type(layer) is DynamicSlidingWindowLayer:
            layer.__class__ = _InPlaceSlidingLayer


def _merge(cache, mask: torch.Tensor, new_cache, new_len: int):
    """Append a batch-1 cache of ``new_len`` slots to a batched cache, left-padding whichever is shorter.

    Where the batch's buffers have a free row and the new row is no longer than the batch, it is written into that
    row (right-aligned, zeros on its left): one row copied. Otherwise every layer gets new buffers (with spare rows
    and slots) holding the old rows and the new one, left-padded to the longer: one copy of the batch."""
    slots = max(mask.shape[1], new_len)
    pairs = [(layer, extra) for layer, extra in zip(cache.layers, new_cache.layers)
             if getattr(extra, "keys", None) is not None and extra.keys.numel()]
    direct = new_len <= mask.shape[1] and all(
        _in_buffer(layer) and layer.keys.shape[0] < layer._kbuf.shape[0] and extra.keys.shape[-2] <= layer.keys.shape[-2]
        for layer, extra in pairs)
    for layer, extra in pairs:
        b, width = layer.keys.shape[0], max(layer.keys.shape[-2], extra.keys.shape[-2])  # direct: the batch's width
        if direct:
            kbuf, vbuf, start = layer._kbuf, layer._vbuf, layer._start
        else:
            kbuf, vbuf = _new_buffers(layer.keys, layer.values, b + 1 + _SPARE_ROWS, width + _SPARE_SLOTS)
            start = 0
            _right_aligned(kbuf[:b, :, :width], layer.keys)
            _right_aligned(vbuf[:b, :, :width], layer.values)
        _right_aligned(kbuf[b, :, start : start + width], extra.keys[0])
        _right_aligned(vbuf[b, :, start : start + width], extra.values[0])
        layer._kbuf, layer._vbuf, layer._start = kbuf, vbuf, start
        layer.keys, layer.values = kbuf[: b + 1, :, start : start + width], vbuf[: b + 1, :, start : start + width]
        if hasattr(layer, "cumulative_length") and not torch.is_tensor(layer.cumulative_length):
            layer.cumulative_length = slots  # sliding layers: slots seen, as if the padded batch had been prefilled
    old = torch.nn.functional.pad(mask, (slots - mask.shape[1], 0))
    new = torch.cat([torch.zeros(1, slots - new_len, dtype=mask.dtype), torch.ones(1, new_len, dtype=mask.dtype)], 1)
    return cache, torch.cat([old, new])


class BatchedLM:
    """A `TransformersLM` whose generations all run through one `BatchScheduler`: the `LM` that serves many chats.

    ``generate`` and ``generate_batch`` from any number of threads share the running batch (an attached CUDA fast
    path still takes a single stream while it is free); ``score``, ``score_prefixes``, ``count_tokens``,
    ``prefix_cache`` and the rest are the wrapped backend's own, run in the caller's thread between batch steps (the
    model's forward lock orders them).

    Args:
        lm: the `TransformersLM` to share.
        max_batch: most generations decoded together; more wait for a free row.
        compile: compile the batched decode step (see `BatchScheduler`).
    Example:
        >>> lm = BatchedLM(TransformersLM.from_pretrained("meta-llama/Llama-3.1-8B", device="cuda"), max_batch=64)
    """

    def __init__(self, lm, max_batch: int = 16, compile: bool | str = False):
        self.inner = lm
        self.scheduler = BatchScheduler(lm, max_batch, compile)
        self.name = lm.name

    def __getattr__(self, item):  # score, score_prefixes, count_tokens, context_length, prefix_cache, tok, ...
        return getattr(self.inner, item)

    def generate(self, prompt: str, stop: Sequence[str] = (), max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), prefix: str | None = None, stats: dict | None = None) -> Iterator[str]:
        """`TransformersLM.generate`, sharing forward passes with every other generation in flight."""
        fast = getattr(self.inner, "fast", None)  # a free CUDA fast path beats the eager batch for one stream
        pieces = None if fast is None else fast.try_generate(prompt, stop, max_new_tokens, sampling, prefix, stats)
        if pieces is None:
            pieces = self.scheduler.generate(prompt, stop, max_new_tokens, sampling, prefix, stats)
        yield from pieces

    def generate_lookup(self, prompt: str, stop: Sequence[str] = (), max_new_tokens: int = 64,
                        sampling: Sampling = Sampling(), prefix: str | None = None,
                        stats: dict | None = None) -> Iterator[str]:
        """Prompt-lookup decoding (`TransformersLM.generate_lookup`) while no other generation is running: a lone
        parser verifies several copied tokens per pass. With rows in the batch, it joins them instead (its step is
        then nearly free, and its own passes would hold everyone else up)."""
        lookup = getattr(self.inner, "generate_lookup", None)
        if lookup is None or self.scheduler.running or self.scheduler.queued:
            yield from self.generate(prompt, stop, max_new_tokens, sampling, prefix, stats)
        else:
            yield from lookup(prompt, stop, max_new_tokens, sampling, prefix, stats)

    def generate_batch(self, prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 64,
                       sampling: Sampling = Sampling(), prefix: str | None = None,
                       stats: list[dict] | None = None) -> Iterator[tuple[int, str]]:
        """`TransformersLM.generate_batch`: each prompt is a row of the shared batch, streamed as ``(row, piece)``."""
        sink: queue.Queue = queue.Queue()
        reqs = []
        try:
            for row, p in enumerate(prompts):
                reqs.append(self.scheduler.submit(p, stop, max_new_tokens, sampling, prefix, sink, row,
                                                  None if stats is None else stats[row]))
            remaining = len(reqs)
            while remaining:
                row, item = sink.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield row, item
        finally:
            for r in reqs:
                r.cancelled.set()

    def close(self) -> None:
        self.scheduler.close()
