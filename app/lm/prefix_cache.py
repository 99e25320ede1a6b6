"""A bounded LRU of encoded prompt prefixes, keyed by their token ids.

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

import torch


@dataclass
class CachedPrefix:
    ids: tuple[int, ...]
    cache: object  # transformers.DynamicCache, batch size 1
    last_logits: torch.Tensor  # [vocab]

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


class PrefixCache:
    """Thread-safe LRU of `CachedPrefix` entries, at most ``capacity`` of them."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

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

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
