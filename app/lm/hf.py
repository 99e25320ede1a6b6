"""The transformers backend: any causal LM (GPT-J, Llama, Gemma, ...) as a base model, no chat template.

One decode loop serves single and batched generation. Why not ``model.generate``: we need the prefix KV cache shared
across calls, per-row stop strings with a held-back partial match, a repetition penalty over generated tokens only, and
a forward lock per step (`ModelRunner`) so that concurrent callers never run the model at once.

This module knows nothing of the CUDA fast path (`fast.py`) or the continuous-batching scheduler (`batching.py`): both
build on it and on the shared pieces in `decoding.py`, and `load_lm` attaches them. Serving many chats goes through
`BatchedLM`, where concurrent generations share forward passes; this class alone decodes each call on its own.

Shapes: ``ids`` [B, L] token ids; ``mask`` [B, past + L] (1 = real token); logits [B, V].
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch

from . import packed
from .base import LMError, Sampling, fast_bf16
from .decoding import ModelRunner, RowStream, bfloat16_decoder, choose, generator_for, is_greedy, left_pad
from .lookup import lookup_decode
from .prefix_cache import CachedPrefix, PrefixCache, fork_cache

log = logging.getLogger(__name__)

# Rows scored together in one forward pass are capped by this many (row x token) logits, to bound memory with large
# vocabularies (gemma: 262k entries, about 1 MB of fp32 logits per position).
_SCORE_LOGITS_BUDGET = 256


def resolve_dtype(dtype: str, cuda: bool, cpuinfo: str | None = None) -> torch.dtype:
    """The weights' dtype for ``FSB_DTYPE``: ``auto`` is bfloat16 on a GPU and on a CPU with fast bfloat16 products
    (`app.lm.base.fast_bf16`: AMX or AVX512-BF16), float32 on any other CPU.

    Raises:
        ValueError: an unknown name, with the allowed ones.
    """
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if fast_bf16(cpuinfo, cuda=cuda) else torch.float32
    if dtype not in names:
        raise ValueError(f"FSB_DTYPE must be auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


class TransformersLM:
    """A transformers causal LM behind the `LM` interface.

    Args:
        model: a loaded ``AutoModelForCausalLM``.
        tokenizer: its tokenizer.
        name: a display name (the model id or path).
        prefix_cache_entries: size of the prefix KV cache LRU (0 disables reuse).
        checkpoint_mb: memory for conversation checkpoints, the KV of recent prompts up to their last two lines that
            the next turn of a conversation starts from (`ModelRunner.prefill`); 0 keeps none.
        pack_weights: on a CPU, pack a bfloat16 model's linear weights for oneDNN where that is measurably faster
            (`decoding.pack_linears`: batched decode steps, scoring); False leaves the model as loaded.
    Example:
        >>> lm = TransformersLM.from_pretrained("EleutherAI/gpt-j-6b", device="cuda")
        >>> "".join(lm.generate("User: hi\\nAssistant:", stop=["\\n"]))
    """

    def __init__(self, model, tokenizer, name: str = "model", prefix_cache_entries: int = 32,
                 checkpoint_mb: int = 0, pack_weights: bool = True):
        self.model = model.eval()
        self.tok = tokenizer
        self.name = name
        self.prefix_cache = PrefixCache(prefix_cache_entries, checkpoint_bytes=checkpoint_mb * 2**20)
        # the forward lock and prefill every loop shares
        self.runner = ModelRunner(self.model, self.prefix_cache, pack=pack_weights)
        # Set by a `BatchScheduler` serving this model: runs a scoring pass inside the running batch's next step
        # (returns False when no batch is running; the pass then runs alone). See `_score_packed`.
        self.score_via = None
        self._line_breaks: dict[int, bool] = {}
        self.runner.line_break = self.line_break
        self.fast = None  # an attached single-stream fast path (`fast.FastPath`), set by `load_lm` on CUDA
        cfg = model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        eos = getattr(model.generation_config, "eos_token_id", None) or cfg.eos_token_id or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self._sliding = bool(getattr(cfg, "sliding_window", None)) and "sliding_attention" in (
            getattr(cfg, "layer_types", None) or ["sliding_attention"]
        )

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str = "auto", dtype: str = "auto", prefix_cache_entries: int = 32,
        tokenizer=None, checkpoint_mb: int = 0, pack_weights: bool = True, **kw
    ) -> "TransformersLM":
        """Load a model id or local folder; ``device="auto"`` spreads it over GPUs with accelerate when there are any."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available() and device != "cpu"
        torch_dtype = resolve_dtype(dtype, cuda)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name_or_path, **kw)
        if cuda:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype,
                                                         device_map="auto" if device == "auto" else device, **kw)
        else:  # no device_map on CPU: accelerate's dispatch costs seconds there and buys nothing
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kw)
        lm = cls(model, tokenizer, name=str(name_or_path), prefix_cache_entries=prefix_cache_entries,
                 checkpoint_mb=checkpoint_mb, pack_weights=pack_weights)
        if dtype == "auto" and not cuda and torch_dtype == torch.float32:
            # float32 for prefill and scoring on a CPU without fast bfloat16 products; decode steps in bfloat16 where
            # that is measurably faster here (`decoding.bfloat16_decoder`)
            lm.runner.use_decoder(bfloat16_decoder(model))
        return lm

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # ------------------------------------------------------------------------------------------ tokenising
    def line_break(self, token_id: int) -> bool:
        """Whether the token's text holds a line break (remembered per id)."""
        known = self._line_breaks.get(token_id)
        if known is None:
            known = self._line_breaks[token_id] = "\n" in self.tok.decode([token_id])
        return known

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def encode(self, prompt: str, prefix: str | None = None) -> tuple[list[int], int]:
        """Token ids of ``prompt`` and the length of its prefix part (0 when there is none)."""
        if prefix and prompt.startswith(prefix):
            head = self.tok(prefix, add_special_tokens=True).input_ids
            tail = self.tok(prompt[len(prefix):], add_special_tokens=False).input_ids
            return head + tail, len(head)
        return self.tok(prompt, add_special_tokens=True).input_ids, 0

    # ----------------------------------------------------------------------------------------- generation
    def generate(
        self,
        prompt: str,
        stop: Sequence[str] = (),
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        prefix: str | None = None,
        stats: dict | None = None,
    ) -> Iterator[str]:
        """Stream the continuation of ``prompt`` as text pieces, cut at the first stop string.

        ``stats``, when given, is filled with ``tokens`` (generated) and ``finish`` ("stop", "eos" or "length").
        An attached fast path (``self.fast``, anything with ``try_generate``) takes the call when it is free.
        """
        pieces = None if self.fast is None else self.fast.try_generate(prompt, stop, max_new_tokens, sampling,
                                                                       prefix, stats)
        if pieces is not None:
            yield from pieces
            return
        for _, piece in self.generate_batch([prompt], stop, max_new_tokens, sampling, prefix,
                                            stats=None if stats is None else [stats]):
            yield piece

    def generate_lookup(self, prompt: str, stop: Sequence[str] = (), max_new_tokens: int = 64,
                        sampling: Sampling = Sampling(), prefix: str | None = None,
                        stats: dict | None = None) -> Iterator[str]:
        """`generate` by prompt-lookup decoding (`lookup.lookup_decode`): the same greedy text in fewer forward
        passes when the output copies its prompt (parsers). Sampling, a repetition penalty or an attached fast path
        take `generate` instead."""
        if not is_greedy(sampling) or self.fast is not None:
            yield from self.generate(prompt, stop, max_new_tokens, sampling, prefix, stats)
            return
        shared = prefix if prefix and prompt.startswith(prefix) else None
        try:
            ids, prefix_len = self.encode(prompt, shared)
            yield from lookup_decode(self, ids, prefix_len, list(stop), max_new_tokens, stats)
        except LMError:
            raise
        except Exception as exc:
            log.exception("generation failed")
            raise LMError(f"the model failed while generating: {exc}") from exc

    def generate_batch(
        self,
        prompts: Sequence[str],
        stop: Sequence[str] = (),
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        prefix: str | None = None,
        stats: list[dict] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Stream ``(row, piece)`` for several prompts decoded together; each row stops on its own.

        Rows share the KV cache of ``prefix`` when every prompt starts with it; the rest of each prompt is left-padded.
        """
        if not prompts:
            return
        try:
            if len(prompts) > 1 and self._sliding and not self._pad_free(prompts, prefix):
                # Sliding-window layers (Gemma) count cache slots, not positions: pads between a shared prefix and a
                # row would push real tokens out of the window. Such rows are decoded one after another instead.
                for row, prompt in enumerate(prompts):
                    row_stats = None if stats is None else [stats[row]]
                    for _, piece in self._decode([prompt], list(stop), max_new_tokens, sampling, prefix, row_stats):
                        yield row, piece
                return
            yield from self._decode(list(prompts), list(stop), max_new_tokens, sampling, prefix, stats)
        except LMError:
            raise
        except Exception as exc:  # a model failure mid-stream becomes a domain error the edges can report
            log.exception("generation failed")
            raise LMError(f"the model failed while generating: {exc}") from exc

    def _decode(self, prompts, stops, max_new_tokens, sampling, prefix, stats=None) -> Iterator[tuple[int, str]]:
        shared = prefix if prefix and all(p.startswith(prefix) for p in prompts) else None
        encoded = [self.encode(p, shared) for p in prompts]
        B = len(prompts)
        if B == 1:
            cache, logits = self.runner.prefill(*encoded[0])
            logits, mask, next_pos = logits[None], None, torch.tensor([len(encoded[0][0])])
        else:
            cache, logits, mask, next_pos = self._prefill_batch(encoded)
        rows = [RowStream(self.tok, self.eos_ids, ids[-1], stops, max_new_tokens, sampling.avoid,
                           sampling.not_first)
                for ids, _ in encoded]
        rng = generator_for(sampling)
        while not all(r.done for r in rows):
            next_ids = choose(logits.float().cpu(), [r.generated for r in rows], sampling, rng,
                              [r.banned() for r in rows])
            for i, row in enumerate(rows):
                piece = "" if row.done else row.push(int(next_ids[i]))
                if piece:
                    yield i, piece
            if all(r.done for r in rows):
                break
            # Finished rows keep being fed (their tokens are ignored): the batch keeps its shape.
            feed = torch.tensor([[int(t)] for t in next_ids])
            if mask is not None:
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            cache, out = self.runner.forward(feed, cache, mask=mask, positions=next_pos[:, None], decode=True)
            next_pos = next_pos + 1
            logits = out[:, -1]
        for row, slot in zip(rows, stats or []):
            slot.update(row.stats())

    def _pad_free(self, prompts: Sequence[str], prefix: str | None) -> bool:
        """True when a padded batch needs no pads after the prefix (all remainders have one length)."""
        shared = prefix if prefix and all(p.startswith(prefix) for p in prompts) else None
        if not shared:
            return True  # left pads before everything keep every row's window intact
        return len({len(self.encode(p, shared)[0]) for p in prompts}) == 1

    def _prefill_batch(self, encoded: list[tuple[list[int], int]]):
        """Shared cached prefix + left-padded remainders: [prefix][pad..][rest] with the pads masked out."""
        prefix_len = encoded[0][1]
        if prefix_len and all(p == prefix_len for _, p in encoded) and self.prefix_cache.capacity > 0:
            entry = self.runner.cached_prefix(tuple(encoded[0][0][:prefix_len]))
            cache = entry.fork(batch=len(encoded))
            rests = [ids[prefix_len:] for ids, _ in encoded]
        else:
            prefix_len, cache = 0, None
            rests = [ids for ids, _ in encoded]
        if not all(rests):
            raise LMError("in a batch, every prompt must extend the shared prefix")
        width = max(len(r) for r in rests)
        rows = [[self.pad_id] * (width - len(r)) + r for r in rests]
        rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests])
        mask = torch.cat([torch.ones(len(rows), prefix_len, dtype=torch.long), rest_mask], dim=1)
        positions = (prefix_len + rest_mask.cumsum(1) - 1).clamp(min=0)
        cache, logits = self.runner.forward(torch.tensor(rows), cache, mask=mask, positions=positions)
        return cache, logits[:, -1], mask, positions[:, -1] + 1

    # --------------------------------------------------------------------------------------------- scoring
    def score(self, context: str, continuations: Sequence[str], prefix: str | None = None) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens after ``context``.

        The context is encoded once (its prefix from the cache); the continuations run together as right-padded rows
        over that shared cache. Right padding needs no mask: a real token only attends to tokens before it.
        """
        ids, prefix_len = self.encode(context, prefix)
        cache, last_logits = self.runner.prefill(ids, prefix_len)
        conts = [self.tok(c, add_special_tokens=False).input_ids for c in continuations]
        first = torch.log_softmax(last_logits.float(), dim=-1).cpu()
        scores = [0.0] * len(conts)
        order = [i for i in range(len(conts)) if conts[i]]
        start = 0
        while start < len(order):
            width = max(len(conts[i]) for i in order[start:])
            step = max(1, _SCORE_LOGITS_BUDGET // width)
            chunk = order[start : start + step]
            start += step
            for i in chunk:
                scores[i] = float(first[conts[i][0]])
            width = max(len(conts[i]) for i in chunk)
            if width == 1:
                continue
            rows = torch.tensor([conts[i][:-1] + [self.pad_id] * (width - len(conts[i])) for i in chunk])
            _, logits = self.runner.forward(rows, fork_cache(cache, len(chunk)), keep=0)
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # [b, width-1, V]
            for r, i in enumerate(chunk):
                targets = torch.tensor(conts[i][1:])
                scores[i] += float(logp[r, torch.arange(len(targets)), targets].sum())
        return scores


    # ------------------------------------------------------------------ score_prefixes (the selector's fast path)
    # One continuation (a dialogue history) under many cached prefixes (each skill's selector shots), in ONE forward
    # pass. The prefixes' KV caches are stacked, each LEFT-padded to the longest, with a hand-built 4D mask per layer
    # type. Left pads keep every row's real tokens contiguous with its continuation, so distances in cache slots equal
    # distances in positions and Gemma's sliding-window layers (which count slots) see exactly what they would see
    # unbatched; sliding layers keep only their last ``window - 1`` slots, so their padded length is computed per type.
    def score_prefixes(self, prefixes: Sequence[str], continuation: str, low_precision: bool = False,
                       checkpoint: bool = False) -> list[float]:
        """log P(continuation | prefix_i) for every prefix, in one batched pass over the prefixes' cached KV.

        Each prefix is encoded with the BOS token and kept in the prefix cache; the continuation is encoded once without
        special tokens (``encode(prefix) + encode(continuation)``, as everywhere in this backend).

        Args:
            prefixes: the constant heads, e.g. one selector prompt per skill.
            continuation: the text scored after each of them.
            low_precision: run the batched pass's matrix products in bfloat16 (a cached bf16 copy of the output
                layer): about 2-3x faster on CPUs with AMX and on GPUs, scores within a few hundredths of a nat.
                The default is exact (equal to scoring each prefix + continuation in one plain forward pass).
            checkpoint: keep each row's KV and score in the conversation checkpoints, and start from the longest
                checkpoint the row's text begins with: a dialogue history scored again one turn later (the same lines
                and a few new ones) costs only its new tokens. Rows that start from different points are scored in
                one pass per starting point.
        Returns:
            one summed log-probability per prefix, in order.
        Raises:
            LMError: the model failed or uses an attention kernel that takes no explicit mask.
        """
        if not prefixes:
            return []
        cont = self.tok(continuation, add_special_tokens=False).input_ids
        if not cont:
            return [0.0] * len(prefixes)
        try:
            entries = [self.runner.cached_prefix(tuple(self.tok(p, add_special_tokens=True).input_ids))
                       for p in prefixes]
            keep = checkpoint and self.prefix_cache.checkpoint_bytes > 0 and len(cont) > 1
            out = [0.0] * len(entries)
            groups: dict[int, list[tuple[int, CachedPrefix, float]]] = {}  # tokens already scored -> rows
            for i, e in enumerate(entries):
                hit = self._scored_checkpoint(e, cont) if keep else None
                if hit is None:
                    groups.setdefault(0, []).append((i, e, 0.0))
                elif hit.scored[0] == len(cont):
                    out[i] = hit.scored[1]
                else:
                    groups.setdefault(hit.scored[0], []).append((i, hit, hit.scored[1]))
            for done, rows in groups.items():
                starts = [e for _, e, _ in rows]
                if done == 0:
                    # The first token is predicted by each prefix's stored last logits: no forward needed.
                    known = torch.stack([e.last_logits.float() for e in starts]).log_softmax(-1)[:, cont[0]].cpu()
                    fed = cont
                else:
                    known, fed = torch.tensor([lp for _, _, lp in rows]), cont[done - 1 :]
                if len(fed) == 1:
                    sums = known
                else:
                    rest, caches = self._scoring_pass(starts, fed, low_precision, keep)
                    sums = known + rest
                    if keep:
                        self._keep_scored(starts, caches, fed, cont, sums)
                for (i, _, _), v in zip(rows, sums.tolist()):
                    out[i] = v
            return out
        except LMError:
            raise
        except Exception as exc:
            log.exception("scoring failed")
            raise LMError(f"the model failed while scoring: {exc}") from exc

    def _scored_checkpoint(self, prefix: CachedPrefix, cont: list[int]) -> CachedPrefix | None:
        """The longest scoring checkpoint for ``prefix`` + ``cont``: its ids start them and it scored the same first
        tokens of ``cont``. None if there is none (or the longest match is another kind of checkpoint)."""
        hit = self.prefix_cache.longest_checkpoint(prefix.ids + tuple(cont), longer_than=len(prefix.ids),
                                                   scoring=True)
        if hit is None or len(hit.ids) - len(prefix.ids) + 1 != hit.scored[0]:
            return None
        n, _, last = hit.scored
        return hit if n <= len(cont) and cont[n - 1] == last else None

    def _scoring_pass(self, starts: list[CachedPrefix], fed: list[int], low_precision: bool, caches: bool):
        """Sum of log P(fed[1:]) per row, feeding fed[:-1] after each start; returns the sums [B] and (``caches``)
        each row's cache after the pass.

        Where the model can run packed passes (`ModelRunner.can_pack`: Gemma 3 on the CPU, the embedded default), each
        row is scored against its own cache inside a packed pass (`app.lm.packed`), and that pass is the serving
        batch's next decode step when a batch is running (`score_via`, set by the `BatchScheduler`): the running
        chats' tokens ride along instead of waiting for the scoring pass. A row attends to its own cache only, so
        its scores are those it gets alone (on the embedded model: bit for bit, with or without a batch, in the runs
        measured). Elsewhere the rows' caches are stacked, left-padded, into one batched pass (`_score_stacked`)."""
        if self.runner.can_pack() and (not low_precision or self.model.dtype == torch.bfloat16):
            return _score_packed(self, starts, fed, low_precision)
        rest, cache = _score_stacked(self, starts, fed, low_precision)
        return rest, (_rows_of(starts, cache, len(fed) - 1) if caches else None)

    def _keep_scored(self, starts: list[CachedPrefix], caches: list, fed: list[int], cont: list[int],
                     sums: torch.Tensor) -> None:
        """Store each row of a scoring pass (its cache after the pass) as a checkpoint of its own."""
        for row, (start, own) in enumerate(zip(starts, caches)):
            ids = start.ids + tuple(fed[:-1])
            self.prefix_cache.put_checkpoint(
                CachedPrefix(ids, own, None, scored=(len(cont), float(sums[row]), cont[-1])))


def _rows_of(starts: list[CachedPrefix], cache, L: int) -> list:
    """Each row of a stacked scoring pass's cache as a batch-1 cache of its own (its real slots, no padding)."""
    out = []
    for row, start in enumerate(starts):
        own = fork_cache(start.cache)
        for layer, stacked, before in zip(own.layers, cache.layers, start.cache.layers):
            n = min(stacked.keys.shape[-2], before.keys.shape[-2] + L)  # this row's real slots after the pass
            layer.keys = stacked.keys[row : row + 1, :, -n:, :].clone()
            layer.values = stacked.values[row : row + 1, :, -n:, :].clone()
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = len(start.ids) + L
        out.append(own)
    return out


def _score_packed(lm: "TransformersLM", starts: list[CachedPrefix], fed: list[int], low_precision: bool):
    """`_score_stacked` with each row against its own cache in a packed pass (`ModelRunner.packed_step`): the
    running batch's next step when the serving scheduler takes it (``lm.score_via``), else a pass of its own.
    Returns the sums [B] and each row's cache after the pass (its prompt and ``fed[:-1]``)."""
    joiners = [packed.Joiner(list(s.ids) + list(fed[:-1]), len(s.ids), s.fork()) for s in starts]
    weight, bias, cap = _scoring_head(lm, low_precision)
    targets = torch.tensor(list(fed[1:]) * len(starts), device=lm.device)
    out: list[torch.Tensor] = []

    def score(hidden: torch.Tensor) -> None:  # [B * (len(fed) - 1), H], under the forward lock
        out.append(_token_logprobs(lm, hidden.to(weight.dtype), targets, weight, bias, cap))

    via = getattr(lm, "score_via", None)
    if via is None or not via(joiners, score):
        empty = torch.empty(0, 1, dtype=torch.long)
        lm.runner.packed_step(empty, empty, None, None, [], scoring=[(joiners, score)])
    return out[0].view(len(starts), -1).sum(1), [j.cache for j in joiners]


def _score_stacked(lm: "TransformersLM", entries: list[CachedPrefix], cont: list[int], low_precision: bool):
    """Sum of log P(cont[1:]) per row, feeding cont[:-1] after each entry's stacked, left-padded cache.

    Returns the sums [B] and the stacked cache after the pass (rows left-padded to the longest)."""

    model, cfg = lm.model, lm.model.config
    impl = getattr(cfg, "_attn_implementation", "eager")
    if impl not in ("sdpa", "eager"):
        raise LMError(f"score_prefixes needs sdpa or eager attention, not {impl!r}")
    B, L = len(entries), len(cont) - 1
    lens = torch.tensor([len(e.ids) for e in entries])  # P_i: real prefix lengths
    q_pos = lens[:, None] + torch.arange(L)[None, :]  # [B, L] positions of the fed tokens
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    cache = fork_cache(entries[0].cache)
    masks: dict[str, torch.Tensor] = {}
    for idx, layer in enumerate(cache.layers):
        kvs = [(e.cache.layers[idx].keys, e.cache.layers[idx].values) for e in entries]
        real = [k.shape[-2] for k, _ in kvs]  # c_i: slots this layer keeps (min(P_i, window-1) when sliding)
        K = max(real)
        layer.keys = torch.cat([left_pad(k, K) for k, _ in kvs])  # [B, heads, K, head_dim]
        layer.values = torch.cat([left_pad(v, K) for _, v in kvs])
        kind = layer_types[idx]
        if kind in masks:
            if masks[kind].shape[-1] != K + L:
                raise LMError(f"layer {idx}: cache length differs from other {kind} layers")
            continue
        # Position held by each slot: cached slots end at P_i - 1, then the L fed tokens; pads get -1 (never seen).
        slot = torch.arange(K)[None, :]
        pad = K - torch.tensor(real)[:, None]
        cached_pos = torch.where(slot >= pad, lens[:, None] - K + slot, torch.full_like(slot, -1))
        kv_pos = torch.cat([cached_pos, q_pos], dim=1)  # [B, K + L]
        allowed = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])
        if kind == "sliding_attention" and window:
            allowed &= q_pos[:, :, None] - kv_pos[:, None, :] < window
        allowed = allowed[:, None]  # [B, 1, L, K + L]
        if impl == "eager":
            allowed = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, torch.finfo(model.dtype).min)
        masks[kind] = allowed.to(lm.device)
    mask = masks if len(masks) > 1 else next(iter(masks.values()))
    ids = torch.tensor([cont[:-1]] * B, device=lm.device)
    weight, bias, cap = _scoring_head(lm, low_precision)
    autocast = torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=low_precision)
    with lm.runner.lock, torch.inference_mode(), autocast:
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=q_pos.to(lm.device),
                                     cache=cache, use_cache=True).last_hidden_state  # [B, L, H]
        flat, targets = hidden.reshape(B * L, -1).to(weight.dtype), torch.tensor(cont[1:] * B, device=lm.device)
        out = _token_logprobs(lm, flat, targets, weight, bias, cap)
    return out.view(B, L).sum(1), cache


def _scoring_head(lm: "TransformersLM", low_precision: bool):
    """The output layer a scoring pass uses: (weight, bias, final soft cap); in bfloat16 when ``low_precision`` (a
    copy kept on the LM, 2 bytes x vocab x hidden, made once; the weight itself in a bfloat16 model)."""
    head = lm.model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if low_precision:
        if getattr(lm, "_bf16_head", None) is None:
            lm._bf16_head = weight.detach().to(torch.bfloat16)
        weight, bias = lm._bf16_head, None if bias is None else bias.to(torch.bfloat16)
    return weight, bias, getattr(lm.model.config, "final_logit_softcapping", None)


def _token_logprobs(lm, flat: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias, cap) -> torch.Tensor:
    """log P(target) at each of the N positions of ``flat`` [N, H] under the output layer ``weight`` [V, H]. Returns [N].

    Logits only for `_SCORE_LOGITS_BUDGET` positions at a time (a 262k vocabulary is ~1 MB of float32 per position),
    into two buffers kept on the LM (made once, under the runner's lock like every caller): fresh allocations of that
    size come from the kernel every time (glibc maps anything over 32 MB), and zeroing ~0.7 GB of new pages per pass
    cost more system time than the products themselves (0.3-3.8 s of a 0.6-3 s selector pass, 2 cores).
    """
    n_pos, vocab = flat.shape[0], weight.shape[0]
    budget = _SCORE_LOGITS_BUDGET
    bufs = getattr(lm, "_score_bufs", None)
    if bufs is None or bufs[0].dtype != weight.dtype or bufs[0].shape[1] != vocab or bufs[0].device != flat.device:
        # filled once so that every page is mapped now (the warm-up's first pass), not during a user's turn
        raw = torch.zeros(budget, vocab, dtype=weight.dtype, device=flat.device)
        wide = raw if weight.dtype == torch.float32 else torch.zeros(budget, vocab, device=flat.device)
        bufs = lm._score_bufs = (raw, wide)
    raw, wide = bufs
    out = torch.empty(n_pos)
    for start in range(0, n_pos, budget):
        h = flat[start : start + budget]
        n = h.shape[0]
        torch.mm(h, weight.t(), out=raw[:n])
        logits = wide[:n]
        if wide is not raw:  # bfloat16 products, normalised in float32 (a float32 model's logits are already there)
            logits.copy_(raw[:n])
        if bias is not None:
            logits.add_(bias.float())
        if cap:
            logits.div_(cap).tanh_().mul_(cap)
        # one fused pass in place (max, sum of exponentials, subtraction) instead of four over ~1 MB per position
        torch.log_softmax(logits, dim=-1, out=logits)
        out[start : start + n] = logits.gather(1, targets[start : start + n, None])[:, 0].cpu()
    return out


# ------------------------------------------------------------------ end of score_prefixes
