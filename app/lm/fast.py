"""The CUDA fast path for one stream: a static KV cache and a compiled one-token decode step.

Why: eager transformers spends most of a decode step in Python and kernel launches (an 8B model on an H200 decodes
~27 tok/s eager while its weights could be read ~260 times a second). With a *static* cache every decode step has the
same shapes and tensor addresses, so ``torch.compile(mode="reduce-overhead")`` captures the whole step once as a CUDA
graph and replays it: one launch per token. Laid out like gpt-fast's ``generate.py``: `prefill`, `decode_one_token`
(the compiled one), `generate`; but on transformers' own ``StaticCache`` and model code, not a port.

The prefix cache still works: a cached prefix's KV (a dynamic cache from `TransformersLM`'s LRU) is *copied* into the
static cache's first slots, and only the prompt's suffix is prefilled. Sliding-window layers (Gemma) keep a ring of
``window`` slots: a long prefix's last ``window - 1`` keys go to slots 1..window-1, exactly where the static layer's
own update would have left them.

Shapes: ids [1, L]; positions [1, L]; static keys/values [1, kv_heads, max_len, head_dim] (sliding layers:
[1, kv_heads, window, head_dim]); logits [1, V].
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch

from .base import LMError, Sampling
from .decoding import RowStream, choose_one, generator_for

log = logging.getLogger(__name__)


class FastPath:
    """Static-cache, compiled single-stream decoding over a `TransformersLM`'s model.

    Args:
        lm: the `TransformersLM` whose model, tokenizer, forward lock and prefix cache (its ``runner``) are used.
        max_len: static cache size in tokens (prompt + generated); longer requests take the ordinary path.
        compile: compile `decode_one_token` (True: inductor with CUDA graphs, ``mode="reduce-overhead"``; a string:
            that ``torch.compile`` backend, e.g. ``"eager"`` to check tracing on CPU). False runs it eagerly on the
            same static cache (CPU tests).
        compile_prefill: also compile the prefill forward, with dynamic shapes (no CUDA graphs: lengths vary).
    Example:
        >>> lm.fast = FastPath(lm).warmup()   # TransformersLM.generate now takes this path for single streams
        >>> enable_fast_path(lm)              # the same, where it applies (one CUDA device); `load_lm` calls it
    """

    def __init__(self, lm, max_len: int = 4096, compile: bool | str = True, compile_prefill: bool | str = False):
        from transformers import StaticCache

        self.lm, self.model = lm, lm.model
        self.max_len = min(max_len, lm.context_length)
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        self.device = lm.device
        # All compiled calls run on this one thread: CUDA-graph trees are per thread, and one static cache serves one
        # stream at a time anyway (a second concurrent request takes the ordinary path, see `try_generate`).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsb-fast-path")
        self._busy = threading.Lock()
        self._decode = self._decode_one_token
        self._forward_prefill = self._prefill_forward
        if compile:  # True: inductor + CUDA graphs; a string names another torch.compile backend ("eager" in tests)
            opts = {"mode": "reduce-overhead"} if compile is True else {"backend": compile}
            self._decode = torch.compile(self._decode_one_token, fullgraph=False, **opts)
        if compile_prefill:
            opts = {} if compile_prefill is True else {"backend": compile_prefill}
            self._forward_prefill = torch.compile(self._prefill_forward, dynamic=True, fullgraph=False, **opts)
        self.used = 0  # generations served (tests, benchmarks)

    # ------------------------------------------------------------------------------------------ the forwards
    def _prefill_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions [1, L] -> last position's logits [1, V]; writes L slots of the static cache."""
        return self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def _decode_one_token(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token, position [1, 1] -> logits [1, V]. The compiled step: same shapes and cache addresses every call."""
        return self.model(input_ids=token, position_ids=position, cache=self.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def prefill(self, ids: list[int], prefix_len: int) -> torch.Tensor:
        """Fill the static cache with ``ids`` (its first ``prefix_len`` from the prefix cache); last logits [V]."""
        lm = self.lm
        start = 0
        if prefix_len and lm.prefix_cache.capacity > 0:
            entry = lm.runner.cached_prefix(tuple(ids[:prefix_len]))  # dynamic cache of the prefix, computed once
            with torch.no_grad():
                self._load(entry.cache, prefix_len)
            start = prefix_len
            if prefix_len == len(ids):
                return entry.last_logits
        else:
            self._rewind(0)
        rest = torch.tensor([ids[start:]], device=self.device)  # [1, L - P]
        positions = torch.arange(start, len(ids), device=self.device)[None]  # [1, L - P]
        # no_grad, not inference_mode: the static cache's tensors stay ordinary tensors, which torch.compile and CUDA
        # graphs handle as transformers' own compiled generate does.
        with lm.runner.lock, torch.no_grad():
            return self._forward_prefill(rest, positions)[0].clone()

    def decode_one_token(self, token: int, position: int) -> torch.Tensor:
        """Logits [V] after feeding ``token`` at ``position``."""
        tok = torch.tensor([[token]], device=self.device)  # [1, 1]
        pos = torch.tensor([[position]], device=self.device)  # [1, 1]
        with self.lm.runner.lock, torch.no_grad():
            # clone: a CUDA graph's output buffer is overwritten by its next replay
            return self._decode(tok, pos)[0].clone()

    # ------------------------------------------------------------------------------- static cache bookkeeping
    def _rewind(self, length: int) -> None:
        """Declare the first ``length`` slots valid. Stale slots past them are never read: the causal mask hides
        every slot whose position is after the query's, so nothing needs zeroing."""
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                with torch.no_grad():
                    layer.cumulative_length.fill_(min(length, layer.max_cache_len))
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = length

    def _load(self, cache, length: int) -> None:
        """Copy a dynamic cache of ``length`` positions (batch 1) into the static cache's slots."""
        for static, dyn in zip(self.cache.layers, cache.layers):
            k, v = dyn.keys, dyn.values  # [1, H, n, D]: n = length, or min(length, window - 1) for sliding layers
            if not static.is_initialized:
                static.lazy_initialization(k, v)
            n, size = k.shape[-2], static.max_cache_len
            # Full layers: slots 0..n-1. A full sliding ring (length >= window): the last window-1 keys go to slots
            # 1..window-1; slot 0 is the one the next update rolls out.
            end = size if getattr(static, "is_sliding", False) and length >= size else n
            static.keys[:, :, end - n : end].copy_(k)
            static.values[:, :, end - n : end].copy_(v)
        self._rewind(length)

    # ------------------------------------------------------------------------------------------- generation
    def warmup(self, steps: int = 3) -> "FastPath":
        """Compile and capture now (a prefill and a few decode steps), not on the first user's request."""
        started = time.perf_counter()
        ids = [self.lm.pad_id] * 8

        def run():
            self.prefill(ids, 0)
            for i in range(steps):
                self.decode_one_token(ids[-1], len(ids) + i)

        with self._busy:
            self._worker.submit(run).result()
        log.info("fast path warmed up in %.1f s", time.perf_counter() - started)
        return self

    def try_generate(self, prompt: str, stop: Sequence[str], max_new_tokens: int, sampling: Sampling,
                     prefix: str | None, stats: dict | None) -> Iterator[str] | None:
        """A stream of pieces, or None when this path cannot take the request (busy, or longer than the cache)."""
        ids, prefix_len = self.lm.encode(prompt, prefix)
        if len(ids) + max_new_tokens > self.max_len or not self._busy.acquire(blocking=False):
            return None
        out: queue.Queue = queue.Queue()
        cancel = threading.Event()
        self._worker.submit(self._produce, ids, prefix_len, list(stop), max_new_tokens, sampling, out, stats, cancel)
        return self._consume(out, cancel)

    def _produce(self, ids, prefix_len, stops, max_new_tokens, sampling, out: queue.Queue, stats, cancel) -> None:
        try:
            self._run(ids, prefix_len, stops, max_new_tokens, sampling, out, stats, cancel)
        except Exception as exc:
            log.exception("fast path generation failed")
            out.put(exc if isinstance(exc, LMError) else LMError(f"the model failed while generating: {exc}"))
        finally:
            self._busy.release()
            out.put(None)

    @staticmethod
    def _consume(out: queue.Queue, cancel: threading.Event) -> Iterator[str]:
        try:
            while (item := out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()  # a consumer that stops early (client gone) stops the decode loop

    def _run(self, ids, prefix_len, stops, max_new_tokens, sampling, out, stats, cancel) -> None:
        """gpt-fast's ``generate``: prefill, then one compiled step per token, streaming text as it is safe."""
        self.used += 1
        row = RowStream(self.lm.tok, self.lm.eos_ids, ids[-1], stops, max_new_tokens, sampling.avoid,
                        sampling.not_first)
        rng = generator_for(sampling)
        logits = self.prefill(ids, prefix_len)  # [V]
        position = len(ids)
        while not row.done:
            token = choose_one(logits, row.generated, sampling, rng, row.banned())
            piece = row.push(token)
            if piece and out is not None:
                out.put(piece)
            if row.done or cancel.is_set():
                break
            logits = self.decode_one_token(token, position)  # [V]
            position += 1
        if stats is not None:
            stats.update(row.stats())


def enable_fast_path(lm, **kw) -> FastPath | None:
    """Attach a `FastPath` to ``lm`` when its model sits on one CUDA device; None (and no change) otherwise."""
    devices = set((getattr(lm.model, "hf_device_map", None) or {}).values())
    if lm.device.type != "cuda" or len(devices) > 1:
        return None
    try:
        lm.fast = FastPath(lm, **kw)
    except Exception as exc:  # an architecture without static-cache support: stay on the ordinary path
        log.warning("fast path unavailable for %s: %s", lm.name, exc)
        return None
    return lm.fast
