"""A bounded LRU of encoded prompt prefixes, keyed by their token ids, and a byte-bounded pool of conversation
checkpoints beside it.

Prefixes are the constant heads of prompts (a skill's examples): looked up by their exact ids. Checkpoints are the
KV of a whole prompt up to the start of its last lines (`ModelRunner.prefill` stores them): the next turn of the same
conversation repeats that text, so its prompt is looked up by the longest checkpoint its ids start with.

An entry holds the KV cache after the prefix and the logits of its last position (so a prompt that *is* the prefix
needs no forward pass at all). Entries are never mutated: `fork()` hands out a cache whose layers are shallow copies.
transformers' dynamic cache layers grow by ``torch.cat`` into new tensors (they rebind ``keys``/``values``, never write
in place), so a fork shares the prefix tensors without copying them and the stored entry stays intact.
"""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class CachedPrefix:
    ids: tuple[int, ...]
    cache: object  # transformers.DynamicCache, batch size 1
    last_logits: torch.Tensor | None  # [vocab]; None for a scoring checkpoint
    # A scoring checkpoint (`TransformersLM.score_prefixes`): (n, the summed log-probability of the scored text's
    # first n tokens, its n-th token). ``ids`` end one token short of those n: the pass that scored them fed all but
    # the last. None for a prefix or a prefill checkpoint.
    scored: tuple[int, float, int] | None = None

    def fork(self, batch: int = 1):
        """A private cache positioned after the prefix, for ``batch`` rows."""
        return fork_cache(self.cache, batch)


def fork_cache(cache, batch: int = 1):
    """Shallow-copy a batch-1 dynamic cache so further steps leave the original untouched; expand rows as views."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    if batch > 1:
        for layer in forked.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
                layer.values = layer.values.expand(batch, *layer.values.shape[1:])
    return forked


def cache_bytes(cache) -> int:
    """Bytes held by a dynamic cache's keys and values (as stored: views count their own elements only)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def compact(cache):
    """``cache`` with every layer's keys and values in tensors of their own size: a sliding-window layer keeps a view
    of the window into the whole sequence it was cut from, which would keep that sequence alive in a stored entry."""
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
                setattr(layer, name, t.clone())
    return cache


class PrefixCache:
    """Thread-safe LRU of `CachedPrefix` entries, at most ``capacity`` of them, and an LRU of conversation checkpoints
    holding at most ``checkpoint_bytes`` of keys and values (0: none kept)."""

    def __init__(self, capacity: int = 32, checkpoint_bytes: int = 0):
        self.capacity = capacity
        self.checkpoint_bytes = checkpoint_bytes
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()
        self._checkpoints: OrderedDict[tuple[int, ...], tuple[CachedPrefix, int]] = OrderedDict()
        self._checkpoint_held = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.checkpoint_hits = 0
        self.checkpoint_misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ids: tuple[int, ...]) -> CachedPrefix | None:
        with self._lock:
            entry = self._entries.get(ids)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(ids)
            self.hits += 1
            return entry

    def put(self, entry: CachedPrefix) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[entry.ids] = entry
            self._entries.move_to_end(entry.ids)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def put_checkpoint(self, entry: CachedPrefix) -> None:
        """Keep a conversation checkpoint, dropping the least recently used ones beyond ``checkpoint_bytes``."""
        size = cache_bytes(entry.cache)
        if size > self.checkpoint_bytes:
            return
        with self._lock:
            old = self._checkpoints.pop(entry.ids, None)
            if old is not None:
                self._checkpoint_held -= old[1]
            self._checkpoints[entry.ids] = (entry, size)
            self._checkpoint_held += size
            while self._checkpoint_held > self.checkpoint_bytes:
                _, (_, dropped) = self._checkpoints.popitem(last=False)
                self._checkpoint_held -= dropped

    def longest_checkpoint(self, ids: Sequence[int], longer_than: int = 0,
                           scoring: bool = False) -> CachedPrefix | None:
        """The longest checkpoint whose ids start ``ids`` (and are longer than ``longer_than`` tokens), or None.

        ``scoring`` picks the kind: scoring checkpoints (`CachedPrefix.scored`; their KV may come from a bfloat16
        scoring pass and they keep no logits) or prefill ones; a caller never gets the other kind."""
        if not self._checkpoints:
            return None
        ids = tuple(ids)
        with self._lock:
            best = None
            for key, (entry, _) in self._checkpoints.items():
                n = len(key)
                if (longer_than < n <= len(ids) and (best is None or n > len(best.ids))
                        and (entry.scored is not None) == scoring and ids[:n] == key):
                    best = entry
            if best is None:
                self.checkpoint_misses += 1
                return None
            self._checkpoints.move_to_end(best.ids)
            self.checkpoint_hits += 1
            return best

    @property
    def checkpoint_held(self) -> int:
        """Bytes the checkpoints hold now."""
        return self._checkpoint_held

    def clear_checkpoints(self) -> int:
        """Drop every conversation checkpoint (the constant prefixes stay); returns how many were dropped. A
        benchmark calls this between phases that replay the same conversations, so that no phase scores or prefills
        text an earlier phase already did."""
        with self._lock:
            n = len(self._checkpoints)
            self._checkpoints.clear()
            self._checkpoint_held = 0
            return n

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._checkpoints.clear()
            self._checkpoint_held = 0
