"""LM backends behind one interface (`LM`: generate / generate_batch / score). Heavy imports happen on first use.

Modules, leaves first (nothing imports upwards; tests/test_lm_imports.py checks there is no cycle):

    base          the interface, `Sampling`, `StopScanner`
    prefix_cache  the LRU of encoded prompt prefixes
    decoding      what every transformers decode loop shares: forward/prefill (`ModelRunner`), token choice, `RowStream`
    hf            `TransformersLM`: the plain backend (one call decodes alone)
    fast          the CUDA single-stream fast path (static cache + compiled step), on top of hf
    batching      continuous batching (`BatchedLM`): concurrent calls share forward passes, on top of hf
    tiny, embedded, remote   model builders and the HTTP backend
    this file     `load_lm`: builds the backend and attaches the fast path and batching
"""
from __future__ import annotations

import logging
import time

from .base import LM, LMError, Sampling, StopScanner, complete

log = logging.getLogger(__name__)

__all__ = ["LM", "LMError", "Sampling", "StopScanner", "complete", "load_lm"]

# Rows one running batch holds. The server admits `max_active` turns at once, and a turn may generate twice (a parser
# skill's query, then the reply) while another's scorer runs: room for twice that, and never fewer than this.
_MIN_BATCH = 16


def load_lm(settings, progress=None) -> LM:
    """The LM named by ``settings.model``.

    ``embedded:gemma-3-270m`` (the default) converts the packaged GGUF once into ``<data_dir>/models`` and loads that;
    ``tiny`` builds a random 4-layer model in code (tests, demos); anything else is a Hugging Face model id or a local
    folder, loaded with transformers (``device_map`` through accelerate on GPUs); ``openai:URL`` is an OpenAI-compatible
    completions server (vLLM, llama.cpp) reached over HTTP (`RemoteLM`, docs/scaling.md).

    A transformers model on one CUDA device gets the static-cache fast path for single streams. With
    ``settings.batching`` on (the default), the model is served through `BatchedLM`: ``generate`` calls from
    concurrent threads (chats) share one running batch, token for token the same greedy output as alone in float32
    (in bfloat16 an exact tie between two tokens' logits may break the other way in a padded row: docs/scaling.md).
    """
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    name = settings.model
    # ---- remote backend (app/lm/remote.py): "openai:URL[#model=NAME&context=N]" -------------------------------
    if name.startswith("openai:"):
        from .remote import RemoteLM

        return RemoteLM.from_spec(name)
    # ---- end remote backend --------------------------------------------------------------------------------------
    if name == "tiny":
        from .tiny import build_tiny_lm, default_corpus

        lm = build_tiny_lm(default_corpus(), prefix_cache_entries=settings.prefix_cache_entries,
                           checkpoint_mb=settings.checkpoint_mb)
    else:
        from .hf import TransformersLM

        path, tokenizer = name, None
        if name.startswith("embedded:"):
            from .embedded import ensure_checkpoint, load_tokenizer

            path = str(ensure_checkpoint(settings.models_dir, progress=progress))
            tokenizer = load_tokenizer(path)
        lm = TransformersLM.from_pretrained(path, device=settings.device, dtype=settings.dtype,
                                            prefix_cache_entries=settings.prefix_cache_entries, tokenizer=tokenizer,
                                            checkpoint_mb=settings.checkpoint_mb,
                                            pack_weights=settings.pack_weights)
        lm.name = name
        if lm.device.type == "cuda":
            from .fast import enable_fast_path

            enable_fast_path(lm)  # static KV cache + compiled decode step for a single stream
    if getattr(settings, "batching", True):  # Settings.batching (FSB_BATCHING, default on); getattr until it lands
        from .batching import BatchedLM

        lm = BatchedLM(lm, max_batch=max(_MIN_BATCH, getattr(settings, "max_active", 0) * 2))
    log.info("model %s loaded in %.1f s", name, time.perf_counter() - started)
    return lm
