"""Continuous batching: many chats share one running batch on one model, joining and leaving at step boundaries.

A scheduler thread owns the batch. Each step it (1) admits waiting requests: prefills each one alone (its constant
prefix comes from the `TransformersLM` prefix cache, so a skill's shots are never re-encoded) and merges its KV cache
into the batch; (2) picks one token per row and streams each row's new text to that request's own queue; (3) drops
finished rows; (4) runs ONE forward pass for all remaining rows. A short request therefore finishes while a long one
admitted earlier keeps going: nobody waits for anybody else to finish, only for the step in progress.

Batch layout (the same left padding the backend's own batches use, so Gemma's sliding-window layers, which count
cache slots, see exactly what an unbatched row sees):

    cache  full-attention layers: keys/values [B, heads, S, head_dim]   S = slots of the longest row
           sliding layers:        keys/values [B, heads, min(S, window-1), head_dim], cumulative_length = S
    mask   [B, S]  1 = real token; each row's real tokens are contiguous and end at slot S-1 (pads on the left)
    pos    per row, the position of the next token fed (its real length)
    logits [B, V]  next-token logits per row

A new row of L slots is left-padded to S (or every other row is, when L > S); leaving rows are removed with an index
select, and slots that are padding in every remaining row are trimmed from the left. Prefix *compute* is shared
(cached prefixes are forked, not re-encoded); prefix *memory* is not (each row holds its copy once merged), which
would need paged attention (vLLM) -- see docs/scaling.md.

Shapes: ids [B, 1]; positions [B, 1]; logits [B, V].
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .base import LMError, Sampling, StopScanner

log = logging.getLogger(__name__)


class RowStream:
    """One generation's text state: tokens so far, the stop scanner, and why it finished.

    ``push(token)`` returns the new text that is safe to show; ``done`` turns true on EOS, a stop string, or the
    token limit. The same rules as `TransformersLM`'s decode loop, so outputs match token for token.
    """

    def __init__(self, lm, anchor: int, stops: Sequence[str], max_new_tokens: int):
        self.lm, self.anchor, self.max_new_tokens = lm, anchor, max_new_tokens
        self.generated: list[int] = []
        self.scanner = StopScanner(stops)
        self.finish = "length"
        self.done = max_new_tokens <= 0

    def push(self, token: int) -> str:
        if token in self.lm.eos_ids:
            self.finish, self.done = "eos", True
            return self.scanner.finish(self.text())
        self.generated.append(token)
        text = self.text()
        piece = self.scanner.feed(text)
        if self.scanner.done:
            self.finish, self.done = "stop", True
        elif len(self.generated) >= self.max_new_tokens:
            piece += self.scanner.finish(text)
            self.done = True
        return piece

    def text(self) -> str:
        return self.lm._text(self.anchor, self.generated)

    def stats(self) -> dict:
        return {"tokens": len(self.generated), "finish": self.finish}


_DONE = object()


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
    pos: int  # position of the next token fed
    rng: torch.Generator | None


class BatchScheduler:
    """Continuous batching over one `TransformersLM`: `submit` from any thread, read the request's sink.

    Args:
        lm: the loaded `TransformersLM` (its model, tokenizer, prefix cache and forward lock are shared).
        max_batch: most rows decoded together; later requests wait at the step boundary for a free row.
        compile: compile the batched decode step with dynamic shapes (True: inductor; a string: that backend,
            e.g. "eager" to check tracing on CPU). Falls back to eager if tracing fails.
    Example:
        >>> sched = BatchScheduler(lm, max_batch=16)
        >>> "".join(sched.generate("User: hi\\nAssistant:", stop=["\\nUser:"]))
    """

    def __init__(self, lm, max_batch: int = 16, compile: bool | str = False):
        self.lm = lm
        self.max_batch = max(1, max_batch)
        # The decode step's shapes change every step (batch size, cache length), so it is compiled with dynamic shapes
        # and without CUDA graphs: what it removes is the per-module Python overhead that dominates eager decoding.
        self._compiled = None
        if compile:
            opts = {} if compile is True else {"backend": compile}
            self._compiled = torch.compile(self._model_step, dynamic=True, fullgraph=False, **opts)
        self._pending: queue.Queue[Request] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, S]
        self._logits: torch.Tensor | None = None  # [B, V]
        self._closed = threading.Event()
        self.steps = 0  # forward passes run (for tests and benchmarks)
        self.max_rows_seen = 0
        self._thread = threading.Thread(target=self._loop, name="fsb-batch-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ client side
    def submit(self, prompt: str, stop: Sequence[str] = (), max_new_tokens: int = 64, sampling: Sampling = Sampling(),
               prefix: str | None = None, sink: queue.Queue | None = None, tag: int = 0,
               stats: dict | None = None) -> Request:
        if self._closed.is_set():
            raise LMError("the batch scheduler is closed")
        req = Request(prompt, [s for s in stop if s], max_new_tokens, sampling, prefix, sink or queue.Queue(), tag,
                      stats)
        self._pending.put(req)
        return req

    def generate(self, prompt: str, stop: Sequence[str] = (), max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), prefix: str | None = None, stats: dict | None = None) -> Iterator[str]:
        """Stream one request's pieces as the batch produces them."""
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
            req.cancelled.set()  # a consumer that stops early frees its row at the next step

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=30)

    # --------------------------------------------------------------------------------------- scheduler side
    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._admit()
                if not self._rows:
                    continue
                self._step()
            except Exception as exc:  # a failed step fails every running row, never the scheduler
                log.exception("batched generation failed")
                err = exc if isinstance(exc, LMError) else LMError(f"the model failed while generating: {exc}")
                for row in self._rows:
                    row.req.sink.put((row.req.tag, err))
                self._reset()
        for row in self._rows:
            row.req.sink.put((row.req.tag, LMError("the batch scheduler was closed")))

    def _admit(self) -> None:
        """Take waiting requests into free rows (block briefly when idle)."""
        while len(self._rows) < self.max_batch:
            try:
                req = self._pending.get(timeout=0.1) if not self._rows else self._pending.get_nowait()
            except queue.Empty:
                return
            if req.cancelled.is_set():
                continue
            try:
                self._join(req)
            except Exception as exc:
                log.exception("prefill failed")
                req.sink.put((req.tag, exc if isinstance(exc, LMError) else LMError(f"the model failed: {exc}")))

    def _join(self, req: Request) -> None:
        """Prefill one request alone (prefix from the cache) and merge its KV into the running batch."""
        lm = self.lm
        ids, prefix_len = lm.encode(req.prompt, req.prefix)
        stream = RowStream(lm, ids[-1], req.stops, req.max_new_tokens)
        if stream.done:
            self._finish(_Row(req, stream, len(ids), None))
            return
        cache, logits = lm._prefill(ids, prefix_len)  # cache: batch 1, len(ids) slots; logits [V]
        rng = torch.Generator().manual_seed(req.sampling.seed) if req.sampling.seed is not None else None
        row = _Row(req, stream, len(ids), rng)
        if not self._rows:
            self._cache, self._mask, self._logits = cache, torch.ones(1, len(ids), dtype=torch.long), logits[None]
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, len(ids))
            self._logits = torch.cat([self._logits, logits[None].to(self._logits.dtype)])
        self._rows.append(row)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _step(self) -> None:
        rows = self._rows
        tokens = self._choose([r.req.sampling for r in rows], [r.stream.generated for r in rows],
                              [r.rng for r in rows])
        keep = []
        for i, (row, tok) in enumerate(zip(rows, tokens)):
            piece = "" if row.req.cancelled.is_set() else row.stream.push(tok)
            if piece:
                row.req.sink.put((row.req.tag, piece))
            if row.stream.done or row.req.cancelled.is_set():
                self._finish(row)
            else:
                keep.append(i)
        if not keep:
            self._reset()
            return
        if len(keep) < len(rows):
            self._select(keep)
        rows = self._rows
        feed = torch.tensor([[r.stream.generated[-1]] for r in rows])  # [B, 1]
        positions = torch.tensor([[r.pos] for r in rows])  # [B, 1]
        self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype)], dim=1)  # [B, S+1]
        self._cache, self._logits = self._decode_step(feed, positions)  # logits [B, V]
        for r in rows:
            r.pos += 1
        self.steps += 1

    def _model_step(self, ids: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor):
        out = self.lm.model(input_ids=ids, cache=cache, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
        return out.cache, out.logits[:, -1]

    def _decode_step(self, feed: torch.Tensor, positions: torch.Tensor):
        """One forward for every row: ids, positions [B, 1] -> (cache, logits [B, V])."""
        if self._compiled is None:
            cache, out = self.lm._forward(feed, self._cache, mask=self._mask, positions=positions)
            return cache, out[:, -1]
        dev = self.lm.device
        try:
            with self.lm._forward_lock, torch.no_grad():
                return self._compiled(feed.to(dev), self._cache, self._mask.to(dev), positions.to(dev))
        except Exception as exc:  # tracing fails before the step runs: the cache is untouched, go eager for good
            log.warning("compiled batched decoding failed (%s); decoding eagerly from now on", exc)
            self._compiled = None
            return self._decode_step(feed, positions)

    def _choose(self, samplings, generated, rngs) -> list[int]:
        """One token per row: greedy rows by argmax on the device; others through the backend's sampler."""
        from .hf import _choose

        if all(s.temperature <= 0 and s.repetition_penalty == 1.0 for s in samplings):
            return self._logits.float().argmax(dim=-1).tolist()
        logits = self._logits.float().cpu()
        return [int(_choose(logits[i : i + 1], [generated[i]], s, rngs[i])[0]) for i, s in enumerate(samplings)]

    def _finish(self, row: _Row) -> None:
        if row.req.stats is not None:
            row.req.stats.update(row.stream.stats())
        row.req.sink.put((row.req.tag, _DONE))

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; trim slots that are padding in every remaining row."""
        idx = torch.tensor(keep)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask[idx]
        self._logits = self._logits[idx.to(self._logits.device)]
        dev = idx.to(self.lm.device)
        for layer in self._cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[dev], layer.values[dev]
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-pad slots
        if lead:
            self._mask = self._mask[:, lead:]
            slots = self._mask.shape[1]
            for layer in self._cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > slots:
                    layer.keys, layer.values = layer.keys[:, :, -slots:], layer.values[:, :, -slots:]
                if hasattr(layer, "cumulative_length") and not torch.is_tensor(layer.cumulative_length):
                    layer.cumulative_length = slots

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._logits = [], None, None, None


def _merge(cache, mask: torch.Tensor, new_cache, new_len: int):
    """Append a batch-1 cache of ``new_len`` slots to a batched cache, left-padding whichever is shorter."""
    slots = max(mask.shape[1], new_len)
    for layer, extra in zip(cache.layers, new_cache.layers):
        if getattr(extra, "keys", None) is None or not extra.keys.numel():
            continue
        width = max(layer.keys.shape[-2], extra.keys.shape[-2])
        layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(extra.keys, width).to(layer.keys.dtype)])
        layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(extra.values, width).to(layer.values.dtype)])
        if hasattr(layer, "cumulative_length") and not torch.is_tensor(layer.cumulative_length):
            layer.cumulative_length = slots  # sliding layers: slots seen, as if the padded batch had been prefilled
    old = torch.nn.functional.pad(mask, (slots - mask.shape[1], 0))
    new = torch.cat([torch.zeros(1, slots - new_len, dtype=mask.dtype), torch.ones(1, new_len, dtype=mask.dtype)], 1)
    return cache, torch.cat([old, new])


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad [B, heads, n, d] on the left of the sequence axis to ``length``."""
    n = t.shape[-2]
    return t if n == length else torch.nn.functional.pad(t, (0, 0, length - n, 0))


class BatchedLM:
    """A `TransformersLM` whose generations all run through one `BatchScheduler`: the `LM` to serve many chats.

    ``generate`` and ``generate_batch`` go through the shared running batch; ``score``, ``count_tokens`` and the
    rest are the wrapped backend's own (they take the same forward lock, between steps).

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
        return self.scheduler.generate(prompt, stop, max_new_tokens, sampling, prefix, stats)

    def generate_batch(self, prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 64,
                       sampling: Sampling = Sampling(), prefix: str | None = None,
                       stats: list[dict] | None = None) -> Iterator[tuple[int, str]]:
        sink: queue.Queue = queue.Queue()
        reqs = [self.scheduler.submit(p, stop, max_new_tokens, sampling, prefix, sink, row,
                                      None if stats is None else stats[row]) for row, p in enumerate(prompts)]
        try:
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
