"""Packed passes: a running batch's decode step and the prefills of the prompts joining it, in one forward pass.

Why: on a CPU a small model's forward pass costs nearly as much for one token as for forty, because it streams every
weight once (gemma-3-270m on 2 cores: ~37 ms for 1 token, ~55 ms for 32). A chat that joins a running batch used to
prefill in a pass of its own while every running row waited; packed, its prompt rides along with the rows' next tokens
and the weights are read once for both.

Layout of one packed pass (batch dimension 1, the model sees one sequence of T = B + sum(K_j) tokens):

    ids, positions   [1, T]   the B running rows' pending tokens, then joiner j's K_j prompt tokens
    keys, values     per layer: the batch's padded cache [B, kv_heads, S, head_dim] (its rows' new keys written in
                     place, as a plain decode step writes them) and each joiner's own cache [1, kv_heads, L_j, head_dim]
    attention        per part: the B decode queries against the batch cache under the mask the model itself builds
                     for a plain decode step; joiner j's K_j queries against its own cache, causal, and within the
                     sliding window on the layers that have one
    logits           rows 0..B-1 (each row's next token), then each joiner's last prompt token (its first token)

The linear layers, norms and the output layer see the T tokens as one sequence, so a row's numbers are those of a
[B, 1] decode step and a joiner's those of its own [1, K_j] prefill up to the order of floating-point sums.

Only models whose attention layers hand ``cache.update``'s result straight to transformers' attention interface and
take the dict of masks per layer type (Gemma 3, the embedded default), on the CPU, are packed (`supports`); others
prefill a joining chat alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_MODEL_TYPES = ("gemma3_text",)  # checked end to end (tests/test_batched_serving.py); others prefill alone


@dataclass
class Joiner:
    """A prompt that prefills inside a packed pass: ``ids`` (the whole prompt), its start ``cache`` (batch 1, holding
    ``ids[:done]``, forked for it), and ``cut``: where to keep a conversation checkpoint afterwards (or None)."""

    ids: list[int]
    done: int
    cache: object
    cut: int | None = None

    @property
    def fed(self) -> int:
        return len(self.ids) - self.done


class _Parts:
    """One layer's keys (or values) in a packed pass: the batch's tensor (or None), each joiner's, and how many tokens
    each joiner feeds (its last ones)."""

    __slots__ = ("batch", "joiners", "fed")

    def __init__(self, batch, joiners, fed):
        self.batch, self.joiners, self.fed = batch, joiners, fed


class _Masks:
    """One layer type's masks in a packed pass: the batch's decode mask (as the model builds it; may be None) and the
    sliding window of that layer type (None: full attention) for the joiners' masks."""

    __slots__ = ("batch", "window")

    def __init__(self, batch, window):
        self.batch, self.window = batch, window


class PackedCache:
    """The cache a packed pass sees: each layer's update goes to the batch's cache (the first ``rows`` tokens, one
    per row) and to each joiner's (its tokens), and hands both on to the attention (`_packed_attention`)."""

    def __init__(self, batch, joiners: list[Joiner], rows: int):
        self.batch, self.joiners, self.rows = batch, joiners, rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        b = self.rows
        if b:  # [1, kv, T, d] -> [B, kv, 1, d]: row i's new key is token i of the packed sequence
            k, v = self.batch.layers[layer_idx].update(key_states[0, :, :b].transpose(0, 1).unsqueeze(2),
                                                      value_states[0, :, :b].transpose(0, 1).unsqueeze(2))
        else:
            k = v = None
        start = b
        for j in self.joiners:
            end = start + j.fed
            jk, jv = j.cache.layers[layer_idx].update(key_states[:, :, start:end], value_states[:, :, start:end])
            keys.append(jk)
            values.append(jv)
            start = end
        fed = [j.fed for j in self.joiners]
        return _Parts(k, keys, fed), _Parts(v, values, fed)


def supports(model) -> bool:
    """Whether ``model`` can run packed passes: its type is one checked end to end, with sdpa attention, on the CPU
    (where a pass's fixed cost is what packing saves; on a GPU it has not been run here, so GPUs keep the body-only
    prefill of a joining chat)."""
    cfg = getattr(model, "config", None)
    try:
        on_cpu = next(model.parameters()).device.type == "cpu"
    except (AttributeError, StopIteration):
        return False
    return (on_cpu and getattr(cfg, "model_type", None) in _MODEL_TYPES
            and getattr(cfg, "_attn_implementation", None) == "sdpa")


def batch_masks(model, cache, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, _Masks]:
    """The masks of a packed pass per layer type, built before it: the batch's are exactly those the model builds for
    a plain decode step of ids [B, 1] on ``cache`` with the 2-D ``mask`` [B, S + 1] (None without a batch)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    full = sliding = None
    if cache is not None:
        embeds = torch.empty(mask.shape[0], 1, cfg.hidden_size, dtype=model.dtype, device=mask.device)
        kwargs = dict(config=cfg, inputs_embeds=embeds, attention_mask=mask, cache=cache, position_ids=positions)
        full = create_causal_mask(**kwargs)
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
            sliding = create_sliding_window_causal_mask(**kwargs)
    return {"full_attention": _Masks(full, None), "sliding_attention": _Masks(sliding, window)}


@functools.cache
def install() -> bool:
    """Let transformers' "sdpa" attention take packed passes: a layer whose cache update handed it `_Parts` gets
    `_packed_attention`; every other call (any model, any thread) goes to the function registered before, unchanged.
    (Switching the model's attention implementation for the pass instead would be seen by threads that read it
    outside the forward lock, such as the scorer building its masks.) False where this transformers has no such
    registry: joining chats then prefill alone."""
    try:
        from transformers import AttentionInterface

        plain = AttentionInterface()["sdpa"]

        def sdpa_or_packed(module, query, key, value, attention_mask, **kwargs):
            if isinstance(key, _Parts):
                return _packed_attention(plain, module, query, key, value, attention_mask, **kwargs)
            return plain(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register("sdpa", sdpa_or_packed)
    except (ImportError, AttributeError, KeyError, TypeError):
        return False
    return True


def _packed_attention(sdpa, module, query: torch.Tensor, key: _Parts, value: _Parts, attention_mask: _Masks,
                      **kwargs):
    """Attention of a packed pass, each part by ``sdpa`` (transformers' function): query [1, heads, T, d]; returns
    ([1, T, heads, d], None) like transformers' own."""
    kwargs.pop("is_causal", None)
    outs = []
    b = 0
    if key.batch is not None:
        b = key.batch.shape[0]
        q = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
        out, _ = sdpa(module, q, key.batch, value.batch, attention_mask.batch, is_causal=False,
                      **kwargs)  # [B, 1, heads, d]
        outs.append(out.reshape(1, b, *out.shape[2:]))
    start = b
    for k, v, fed in zip(key.joiners, value.joiners, key.fed):
        q = query[:, :, start : start + fed]
        mask = _joiner_mask(fed, k.shape[-2], attention_mask.window, q.device)
        out, _ = sdpa(module, q, k, v, mask, is_causal=False, **kwargs)  # [1, fed, heads, d]
        outs.append(out)
        start += fed
    return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]), None


def _joiner_mask(fed: int, length: int, window: int | None, device) -> torch.Tensor | None:
    """[1, 1, fed, length] (True: attend) for a joiner's last ``fed`` tokens over its ``length`` keys, which end at
    the last of them with no gaps: causal, and within ``window`` positions where the layer slides. None: all."""
    if fed == 1 and (window is None or length <= window):
        return None
    q = torch.arange(length - fed, length, device=device)[:, None]  # key index of each query's own token
    k = torch.arange(length, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed[None, None]
