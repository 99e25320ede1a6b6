"""What every transformers decode loop shares: the forward pass, prefill over the prefix cache, token choice, and one
row's text state. The plain loop (`hf.py`), the CUDA fast path (`fast.py`) and the continuous-batching scheduler
(`batching.py`) all build on these, so they decide and cut text the same way and agree token for token.

A leaf module: it imports nothing from ``app.lm`` but `base`, `packed` and `prefix_cache`.

Shapes: ids [B, L]; mask [B, past + L] (1 = real token); logits [B, V] (``keep=1``) or [B, L, V] (``keep=0``).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from . import packed
from .base import Sampling, StopScanner
from .prefix_cache import CachedPrefix, PrefixCache, compact, fork_cache

# logits_to_keep for a pass that needs no logits at all (its output layer is skipped)
_NO_LOGITS = torch.zeros(0, dtype=torch.long)

# A conversation checkpoint is kept only when it saves the next turn at least this many tokens of prefill (each one
# costs a copy of the cache now and up to ~10 MB of keys and values while it is kept).
CHECKPOINT_MIN_TOKENS = 16


class ModelRunner:
    """One model's forward passes, serialised by one lock, and its prefix KV cache.

    Every decode loop on the model (plain, fast path, batch scheduler) and every scoring call goes through one runner,
    so two threads never run the model at once and all of them share the cached prefixes.

    Args:
        model: a loaded ``AutoModelForCausalLM`` in eval mode.
        prefix_cache: the LRU of encoded prefixes.
        pack: pack a bfloat16 CPU model's linear weights for oneDNN where that is faster here (`pack_linears`);
            this changes the model's linear layers in place.
    """

    def __init__(self, model, prefix_cache: PrefixCache, pack: bool = True):
        self.model = model
        self.pack = pack
        self.prefix_cache = prefix_cache
        self.lock = threading.Lock()
        # A bfloat16 copy of a float32 model that runs the decode steps (`bfloat16_decoder`, `use_decoder`), or None.
        self.decoder = None
        # Decode steps of at most this many tokens (rows x length) run on ATen's own kernels instead of oneDNN's
        # (`native_kernel_tokens`): timed now, at load, not during the first reply. Where the linear layers' weights
        # are packed for oneDNN (`pack_linears`), only a one-row product stays on ATen's kernel.
        self.native_tokens = self._kernels(model, pack)
        # Whether a token id holds a line break (set by the backend that owns the tokenizer); None: no checkpoints.
        self.line_break: Callable[[int], bool] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def forward(self, ids: torch.Tensor, cache=None, mask=None, positions=None, keep: int = 1, decode: bool = False):
        """(cache, logits) after feeding ``ids`` [B, L] on ``cache``; logits of the last ``keep`` positions (0: all).

        ``decode`` marks a generation's decode step (one new token per row, or a few drafted ones to verify): it runs
        on the bfloat16 decoder when there is one and, for few tokens, around oneDNN. Prefill and scoring never do,
        so scores do not depend on how many rows are scored together. The cache is cast to the dtype of the model
        that runs.
        """
        with self.lock, torch.inference_mode():
            model, kernels = self.model, contextlib.nullcontext()
            if decode:
                model = self.decoder or self.model
                if ids.numel() <= self.native_tokens:
                    kernels = onednn(enabled=False)
            with kernels:
                out = model(
                    input_ids=ids.to(self.device),
                    cache=cast_cache(cache, model.dtype),
                    attention_mask=None if mask is None else mask.to(self.device),
                    position_ids=None if positions is None else positions.to(self.device),
                    use_cache=True,
                    logits_to_keep=keep,
                )
        return out.cache, out.logits

    def use_decoder(self, decoder) -> None:
        """Run decode steps on ``decoder`` (None: on the model itself), with the kernel choice timed for it."""
        self.decoder = decoder
        self.native_tokens = self._kernels(decoder if decoder is not None else self.model, self.pack)

    @staticmethod
    def _kernels(model, pack: bool) -> int:
        packed = pack_linears(model) if pack else None
        return packed if packed is not None else native_kernel_tokens(model)

    def for_decoding(self, cache):
        """``cache`` in the dtype decode steps run in (a joining row's, before it is merged into a running batch)."""
        return cast_cache(cache, (self.decoder or self.model).dtype)

    def cached_prefix(self, ids: tuple[int, ...]) -> CachedPrefix:
        """The prefix cache's entry for ``ids``, encoding it (batch 1) on a miss."""
        entry = self.prefix_cache.get(ids)
        if entry is None:
            cache, logits = self.forward(torch.tensor([ids]))
            entry = CachedPrefix(ids, cache, logits[0, -1])
            self.prefix_cache.put(entry)
        return entry

    def prefill(self, ids: list[int], prefix_len: int, head: bool = True):
        """A private KV cache after ``ids`` (batch 1) and the last position's logits [V], reusing what is cached.

        It starts from the longest conversation checkpoint that ``ids`` begin with (the previous turn's prompt up to its
        last lines), else from the cached prefix ``ids[:prefix_len]``. On the way it stores a new checkpoint where
        ``ids`` start their last two lines (`checkpoint_at`): the next turn of the same conversation repeats that text
        and prefills only what follows it. A checkpoint is found by its token ids alone, so one that the next prompt
        does not repeat exactly (other knowledge, a shorter history window) is simply never used.

        ``head=False`` runs the model's body only and returns ``(cache, None)``: no output layer at all, for a caller
        that feeds the next token itself (`BatchScheduler` joins a running batch that way: the output layer is most
        of a small model's weights, read once per forward pass). Checkpoints stored then keep no logits: a prefill of
        exactly such a checkpoint's tokens starts from a shorter one and feeds at least the last token.
        """
        start = self._start(ids, prefix_len, head)
        done = len(start.ids) if start is not None else 0
        cache = start.fork() if start is not None else None
        logits = start.last_logits if start is not None and head else None
        last = 1 if head else _NO_LOGITS  # logits_to_keep of a plain pass: the last position's, or none
        cut = self.checkpoint_at(ids, done)
        if cut is not None and cut < len(ids) and _can_record(cache):
            # One forward over the rest; the checkpoint is the cache cut back to ``cut`` (sliding-window layers record
            # their whole past for the pass, so the window that ends at ``cut`` is still there to keep).
            for layer in cache.layers:
                if getattr(layer, "is_sliding", False):
                    layer.activate_past_recording()
            keep = torch.tensor([cut - done - 1, len(ids) - done - 1]) if head else _NO_LOGITS
            cache, out = self.forward(torch.tensor([ids[done:]]), cache, keep=keep)
            checkpoint = _cut_back(cache, len(ids) - cut, cut)
            self.prefix_cache.put_checkpoint(CachedPrefix(tuple(ids[:cut]), checkpoint, out[0, 0] if head else None))
            return cache, out[0, -1] if head else None
        if cut is not None:  # no cache to start from (or layers that cannot record): two forwards
            cache, out = self.forward(torch.tensor([ids[done:cut]]), cache, keep=last)
            logits, done = out[0, -1] if head else None, cut
            self.prefix_cache.put_checkpoint(CachedPrefix(tuple(ids[:cut]), compact(fork_cache(cache)), logits))
        if done < len(ids):
            cache, out = self.forward(torch.tensor([ids[done:]]), cache, keep=last)
            logits = out[0, -1] if head else None
        return cache, logits

    def _start(self, ids: list[int], prefix_len: int, head: bool) -> CachedPrefix | None:
        """What a prefill of ``ids`` starts from: the longest conversation checkpoint they begin with, else the cached
        prefix ``ids[:prefix_len]`` (encoded on a miss), else nothing. ``head``: the last position's logits are
        needed, so a checkpoint of all of ``ids`` that kept none gives way to a shorter one (the last token is fed)."""
        start = None
        if self.prefix_cache.checkpoint_bytes > 0:
            start = self.prefix_cache.longest_checkpoint(ids, longer_than=prefix_len)
            if start is not None and head and start.last_logits is None and len(start.ids) == len(ids):
                start = self.prefix_cache.longest_checkpoint(ids[:-1], longer_than=prefix_len)  # feeds the last one
        if start is None and prefix_len and self.prefix_cache.capacity > 0:
            start = self.cached_prefix(tuple(ids[:prefix_len]))
        return start

    # ------------------------------------------------------------------------- prefills packed into decode steps
    def can_pack(self) -> bool:
        """Whether prompts joining a running batch may prefill inside its decode steps (`packed_step`): the model
        decodes itself (no bfloat16 copy, whose numbers would then be the prefill's) and is of a packable kind."""
        return self.decoder is None and packed.supports(self.model) and packed.install()

    def plan_prefill(self, ids: list[int], prefix_len: int) -> packed.Joiner | None:
        """``ids`` ready to prefill inside a packed pass: its start cache forked (as `prefill` starts), at least its
        last token left to feed, sliding layers recording when a conversation checkpoint is due (`finish_prefill`
        keeps it). None where the whole prompt is its cached prefix: `prefill` then takes it from the cache."""
        if prefix_len >= len(ids):
            return None
        start = self._start(ids[:-1], prefix_len, head=False)
        if start is None:
            done, cache = 0, DynamicCache(config=self.model.config)
        else:
            done, cache = len(start.ids), start.fork()
        cut = self.checkpoint_at(ids, done)
        if cut is not None and not _can_record(cache):
            cut = None
        if cut is not None:
            for layer in cache.layers:
                if getattr(layer, "is_sliding", False):
                    layer.activate_past_recording()
        return packed.Joiner(list(ids), done, cache, cut)

    def finish_prefill(self, joiner: packed.Joiner) -> None:
        """After its packed pass: keep ``joiner``'s conversation checkpoint (without logits, as a body-only prefill
        keeps it) and bring its sliding layers back to their window."""
        if joiner.cut is not None:
            ids, cut = joiner.ids, joiner.cut
            checkpoint = _cut_back(joiner.cache, len(ids) - cut, cut)
            self.prefix_cache.put_checkpoint(CachedPrefix(tuple(ids[:cut]), checkpoint, None))

    def packed_step(self, feed: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None,
                    joiners: list[packed.Joiner], scoring: Sequence[tuple[list[packed.Joiner], Callable]] = ()):
        """One forward for a running batch's pending tokens (``feed``, ``positions`` [B, 1] on ``cache`` with ``mask``
        [B, S + 1]; B may be 0, with ``cache`` and ``mask`` None) and the prompts of ``joiners`` (`app.lm.packed`).

        ``scoring``: texts scored in the same pass (`TransformersLM.score_prefixes`), each a list of joiners (a
        cached prompt and the tokens fed after it) and a function that gets their fed tokens' hidden states [N, H],
        called under the forward lock (the output layer and the log-probabilities are the scorer's own).
        Returns (the batch's cache, logits [B + len(joiners), V]: each row's next token, then each joiner's first)."""
        rows = feed.shape[0]
        every = list(joiners) + [j for group, _ in scoring for j in group]
        ids = torch.cat([feed.reshape(-1)] + [torch.tensor(j.ids[j.done:]) for j in every])[None]
        pos = torch.cat([positions.reshape(-1)] + [torch.arange(j.done, len(j.ids)) for j in every])[None]
        keep, end = list(range(rows)), rows
        for j in joiners:
            end += j.fed
            keep.append(end - 1)
        spans = []
        for group, _ in scoring:
            spans.append((end, end + sum(j.fed for j in group)))
            end = spans[-1][1]
        with self.lock, torch.inference_mode():
            model, dev = self.model, self.device
            for j in every:
                j.cache = cast_cache(j.cache, model.dtype)
            masks = packed.batch_masks(model, cache, None if mask is None else mask.to(dev),
                                       None if cache is None else positions.to(dev))
            kernels = onednn(enabled=False) if ids.numel() <= self.native_tokens else contextlib.nullcontext()
            with kernels:
                if not scoring:
                    out = model(input_ids=ids.to(dev), cache=packed.PackedCache(cache, joiners, rows),
                                attention_mask=masks, position_ids=pos.to(dev), use_cache=True,
                                logits_to_keep=torch.tensor(keep, device=dev))
                    return cache, out.logits[0]
                hidden = model.get_decoder()(input_ids=ids.to(dev), cache=packed.PackedCache(cache, every, rows),
                                             attention_mask=masks, position_ids=pos.to(dev),
                                             use_cache=True).last_hidden_state[0]  # [T, H]
                logits = _head(model, hidden[torch.tensor(keep, device=dev)]) if keep else None
                for (_, score), (a, b) in zip(scoring, spans):
                    score(hidden[a:b])
        return cache, logits

    def checkpoint_at(self, ids: Sequence[int], done: int) -> int | None:
        """Where to keep a conversation checkpoint in ``ids`` (already encoded up to ``done``): just after the line
        break that starts the last two lines, which in a chat prompt are the user's new message and the reply's cue
        ("User: …" / "Assistant:"), in a parser's the message and the output's cue. None when checkpoints are off, the
        backend does not say which tokens break lines, or the new stretch is shorter than `CHECKPOINT_MIN_TOKENS`."""
        if self.prefix_cache.checkpoint_bytes <= 0 or self.line_break is None:
            return None
        breaks = [j for j in range(done, len(ids)) if self.line_break(ids[j])]
        if len(breaks) < 2:
            return None
        cut = breaks[-2] + 1
        return cut if cut - done >= CHECKPOINT_MIN_TOKENS else None


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits for hidden states [N, H], as its own forward computes them (the output layer, then
    the final soft cap where the model has one)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _can_record(cache) -> bool:
    """Whether every sliding-window layer of ``cache`` can keep its whole past for one pass (`_cut_back` needs it)."""
    return cache is not None and all(hasattr(layer, "activate_past_recording") for layer in cache.layers
                                     if getattr(layer, "is_sliding", False))


def _cut_back(cache, drop: int, length: int):
    """A stored copy of ``cache`` without its last ``drop`` positions (``length`` positions then), and ``cache`` itself
    back to normal: its sliding-window layers recorded their whole past for the pass (`_can_record`); both keep only
    their window (the last ``sliding_window - 1`` slots) from here on."""
    kept = fork_cache(cache)
    for mine, live in zip(kept.layers, cache.layers):
        keys, values = live.keys[:, :, : live.keys.shape[-2] - drop], live.values[:, :, : live.values.shape[-2] - drop]
        if getattr(live, "is_sliding", False):
            window = live.sliding_window - 1
            keys, values = keys[:, :, -window:], values[:, :, -window:]
            mine.cumulative_length, mine.record_past = length, False
            live.keys, live.values = live.keys[:, :, -window:], live.values[:, :, -window:]
            live.record_past = False
        mine.keys, mine.values = keys.clone(), values.clone()
    return kept


# ------------------------------------------------------------------------------------------ kernel choice
@contextlib.contextmanager
def onednn(enabled: bool):
    """Turn oneDNN (mkldnn) kernels on or off for the block, then restore the setting.

    The setting is process-wide: callers hold the model's forward lock, so no other forward of this model runs
    meanwhile; another thread's float32 work does not use oneDNN's matrix products anyway, and for any op the
    setting only picks which kernel computes it, never what it computes.
    """
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


def native_kernel_tokens(model, candidates: Sequence[int] = (1, 2, 3, 4), repeats: int = 3) -> int:
    """The most tokens (rows x length) of a decode step for which ATen's own bfloat16 matrix products beat oneDNN's
    on this CPU, timed on the model's output layer (its largest matrix); 0 when oneDNN wins or does not apply.

    Why: on a CPU with AVX512-BF16, oneDNN's bfloat16 product for one row reads the weights at about a third of the
    speed ATen's own vector kernel does (gemma-3-270m's 262k x 640 output layer: 24.8 against 9.3 ms; a whole decode
    step 56 against 29 ms on 2 cores of an AMD EPYC), while for many rows (a prefill, a scoring pass, a batch of 4 or
    more) oneDNN is far faster (300 prompt tokens: 0.30 against 1.6 s). So a one- or two-row decode step goes around
    oneDNN and everything larger goes through it. Float32 weights, GPUs and builds without oneDNN are untouched.
    """
    weight = _output_weight(model)
    if (weight is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or not torch.backends.mkldnn.is_available()):
        return 0
    best = 0
    for tokens in candidates:
        x = torch.randn(tokens, weight.shape[1]).to(torch.bfloat16)
        if _best_ms(x, weight, False, repeats) < 0.9 * _best_ms(x, weight, True, repeats):
            best = tokens
        else:
            break
    return best


class PackedLinear(torch.nn.Linear):
    """A bfloat16 ``nn.Linear`` that also holds its weight in oneDNN's blocked layout (`pack_linears`).

    With oneDNN on, products run on the packed copy (``torch.ops.mkldnn._linear_pointwise``, the op inductor's weight
    freezing emits); with oneDNN off (`ModelRunner.forward` turns it off for decode steps of at most ``native_tokens``
    tokens) they run on ATen's own vector kernel with the plain weight, which stays in place (tied to the input
    embeddings for the output layer). So, as before packing, prefill and scoring use one kernel whatever the number
    of rows, and scores do not depend on how many rows are scored together.
    """

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch._C._get_mkldnn_enabled() or x.dtype != self.weight.dtype or not x.numel():
            return torch.nn.functional.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        y = _packed_product(x.reshape(rows, x.shape[-1]), self.packed, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def pack_linears(model, rows_hint: int = 8, repeats: int = 3, force: bool = False) -> int | None:
    """Pack the weights of a bfloat16 CPU ``model``'s linear layers for oneDNN (`PackedLinear`), where that pays.

    Why: oneDNN lays a plain weight out in its blocked format on every product, which for a few rows costs more than
    the product: gemma-3-270m's 262k x 640 output layer on 2 cores of an AMD EPYC with AVX512-BF16, 4 rows, 21.0 ms
    plain against 9.9 ms packed (8 rows: 23.7 against 12.5); a batched decode step of 4 rows 64 against 51 ms. One
    row stays on ATen's vector kernel (9.1 ms against 12.6 packed). The packed copies cost the linear weights' size
    again in memory (gemma-3-270m: about 0.5 GB).

    Returns the tokens up to which decode steps should go around oneDNN (`ModelRunner.native_tokens`: the most rows
    for which ATen's kernel on the plain weight beats the packed product by 10%, here 1), or None when nothing was
    packed: not bfloat16 on a CPU, no oneDNN, or the packed product not clearly faster than the plain one on the
    output layer (timed at load, about a second). ``force`` skips the timing and returns 1.
    """
    weight = _output_weight(model)
    op = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if (weight is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or not torch.backends.mkldnn.is_available() or op is None):
        return None
    native = 1
    if not force:
        try:
            with torch.inference_mode():
                packed = op(weight.detach(), rows_hint)
                x = torch.randn(4, weight.shape[1]).to(torch.bfloat16)
                packed_ms = [_best_ms_fn(lambda: _packed_product(x[:n], packed, None), repeats) for n in (1, 2, 3, 4)]
                del packed
        except RuntimeError:  # a build whose oneDNN lacks the op for this dtype
            return None
        if packed_ms[-1] > 0.8 * _best_ms(x, weight, True, repeats):
            return None
        native = 0
        for n in (1, 2, 3, 4):
            if _best_ms(x[:n], weight, False, repeats) >= 0.9 * packed_ms[n - 1]:
                break
            native = n
    with torch.inference_mode():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16:
                module.packed = op(module.weight.detach(), rows_hint)
                module.__class__ = PackedLinear
    return native


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def bfloat16_decoder(model, max_parameters: float = 2e9):
    """A bfloat16 copy of a float32 CPU ``model`` for decode steps, or None where it would not pay.

    Why: a decode step reads every weight once for one token per row, so it is bound by memory traffic, and
    bfloat16 weights are half of float32's. Prefill and scoring (many tokens at once) are bound by arithmetic, which
    is slow in bfloat16 on a CPU without AVX512-BF16 or AMX, so they stay on the float32 model. The copy is made only
    when one output-layer product of one row is clearly faster in bfloat16 here (gemma-3-270m's 262k x 640 output
    layer, AVX2 emulated on an EPYC: 9 against 53 ms), and only for models up to ``max_parameters`` (the copy costs
    half the model's memory again). The KV caches are cast between the two (`cast_cache`).
    """
    import copy

    weight = _output_weight(model)
    if (weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or sum(p.numel() for p in model.parameters()) > max_parameters):
        return None
    x = torch.randn(1, weight.shape[1])
    float32_ms = _best_ms(x, weight, enabled=True)
    small = weight.to(torch.bfloat16)
    bfloat16_ms = _best_ms(x.to(torch.bfloat16), small, enabled=False)
    if bfloat16_ms > 0.7 * float32_ms:
        return None
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def cast_cache(cache, dtype: torch.dtype):
    """``cache`` with its keys and values in ``dtype`` (its layers rebound, as transformers' own updates do)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return cache
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dtype != dtype and t.is_floating_point():
                setattr(layer, name, t.to(dtype))
    return cache


def _output_weight(model) -> torch.Tensor | None:
    head = model.get_output_embeddings()
    return getattr(head, "weight", None)


def _best_ms(x: torch.Tensor, weight: torch.Tensor, enabled: bool, repeats: int = 3) -> float:
    """The fastest of ``repeats`` products x @ weight.T in ms, with oneDNN on or off (a first call warms up)."""
    with onednn(enabled), torch.inference_mode():
        return _best_ms_fn(lambda: torch.nn.functional.linear(x, weight), repeats)


def _best_ms_fn(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls of ``fn`` in ms (a first call warms up)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times[1:]) * 1000


# ------------------------------------------------------------------------------------------------ token choice
def is_greedy(s: Sampling) -> bool:
    """True when the next token is the argmax of the raw logits (no penalty, no banned copies, no sampling)."""
    return s.temperature <= 0 and s.repetition_penalty == 1.0 and not s.avoid and not s.not_first


@functools.lru_cache(maxsize=256)
def first_word_tokens(tok, texts: tuple[str, ...]) -> frozenset[int]:
    """The tokens that open each text's first word, with and without a leading space (an output's first token after
    a cue such as "Assistant:" usually carries the space), in the text's own case and capitalised."""
    out = set()
    for text in texts:
        words = text.split()
        if not words:
            continue
        word = words[0]
        for form in {word, word[:1].upper() + word[1:]}:
            for spelled in (form, " " + form):
                ids = tok(spelled, add_special_tokens=False).input_ids
                if ids:
                    out.add(ids[0])
    return frozenset(out)


# A generation may not repeat this many tokens in a row from a text in `Sampling.avoid`: the first AVOID_NGRAM - 1
# tokens of a copy are allowed ("i hope you" again), the one that would complete the run is not.
AVOID_NGRAM = 6


@functools.lru_cache(maxsize=256)
def _ngram_table(tok, texts: tuple[str, ...], n: int) -> dict[tuple[int, ...], frozenset[int]]:
    """(n - 1 tokens) -> the tokens that follow them somewhere in ``texts`` (each tokenized as it would follow a
    speaker label, with and without a leading space). Only tokens that start a word are kept: a copy is cut at a
    word boundary ("the maple" + another word), never inside a word ("the maple gue" + "ouses")."""
    table: dict[tuple[int, ...], set[int]] = {}
    for text in texts:
        for variant in {text, " " + text.lstrip()}:
            ids = tok.encode(variant, add_special_tokens=False)
            for i in range(len(ids) - n + 1):
                if _starts_word(tok, ids[i + n - 1]):
                    table.setdefault(tuple(ids[i : i + n - 1]), set()).add(ids[i + n - 1])
    return {k: frozenset(v) for k, v in table.items()}


def _starts_word(tok, token: int) -> bool:
    """Whether ``token`` begins a new word: its piece starts with a space marker (SentencePiece's or byte-level
    BPE's), a space, or is punctuation."""
    piece = tok.convert_ids_to_tokens(token) or ""
    return piece[:1] in ("\u2581", "\u0120", " ") or not piece[:1].isalnum()


def banned_next(table: dict[tuple[int, ...], frozenset[int]], generated: Sequence[int], n: int = AVOID_NGRAM):
    """The tokens that would complete a run of ``n`` copied tokens after ``generated``."""
    if not table or len(generated) < n - 1:
        return ()
    return table.get(tuple(generated[len(generated) - n + 1 :]), ())


def generator_for(s: Sampling) -> torch.Generator | None:
    """A private random generator for a seeded request (so concurrent requests never share randomness)."""
    return None if s.seed is None else torch.Generator().manual_seed(s.seed)


def choose(logits: torch.Tensor, generated: Sequence[Sequence[int]], s: Sampling, rng=None,
           banned: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Next token per row from logits [B, V] (CPU, float): ``banned`` tokens per row (`RowStream.banned`) ruled out,
    repetition penalty on generated tokens, then greedy or sampled (temperature, top-k, top-p). Returns [B]."""
    if banned and any(banned):
        logits = logits.clone()
        for row, ids in enumerate(banned):
            if ids:
                logits[row, list(ids)] = float("-inf")
    if s.repetition_penalty != 1.0:
        logits = logits.clone()
        for row, toks in enumerate(generated):
            if toks:
                idx = torch.tensor(sorted(set(toks)))
                vals = logits[row, idx]
                logits[row, idx] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)[:, 0]


def choose_one(logits: torch.Tensor, generated: list[int], s: Sampling, rng=None,
               banned: Sequence[int] = ()) -> int:
    """`choose` for one row's logits [V] (any device): greedy by argmax where it stands, else on the CPU."""
    if is_greedy(s):
        return int(logits.float().argmax())
    return int(choose(logits.float().cpu()[None], [generated], s, rng, [banned])[0])


# ---------------------------------------------------------------------------------------------- a row's text
def decode_text(tok, anchor: int, generated: list[int]) -> str:
    """The text of ``generated``, decoded after the prompt's last token ``anchor`` so that a leading space survives."""
    if not generated:
        return ""
    head = tok.decode([anchor], skip_special_tokens=True)
    full = tok.decode([anchor] + generated, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tok.decode(generated, skip_special_tokens=True)


class RowStream:
    """One generation's text state: tokens so far, the stop scanner, and why it finished.

    ``push(token)`` returns the new text that is safe to show; ``done`` turns true on EOS, a stop string, or the
    token limit. Every decode loop uses it, so their outputs match token for token.
    """

    def __init__(self, tok, eos_ids: set[int], anchor: int, stops: Sequence[str], max_new_tokens: int,
                 avoid: Sequence[str] = (), not_first: Sequence[str] = ()):
        self.tok, self.eos_ids, self.anchor, self.max_new_tokens = tok, eos_ids, anchor, max_new_tokens
        self.generated: list[int] = []
        texts = tuple(t for t in avoid if t and t.strip())
        self._avoid = _ngram_table(tok, texts, AVOID_NGRAM) if texts else {}
        self._first = first_word_tokens(tok, tuple(not_first)) if not_first else frozenset()
        self.scanner = StopScanner(stops)
        self.finish = "length"
        self.done = max_new_tokens <= 0

    def banned(self) -> tuple[int, ...] | frozenset[int]:
        """The next tokens that would copy `AVOID_NGRAM` tokens in a row from a text of ``avoid``, and at the start
        the tokens that would open the output with the first word of a text of ``not_first``."""
        banned = banned_next(self._avoid, self.generated)
        if self._first and not self.generated:
            return frozenset(banned) | self._first
        return banned

    def push(self, token: int) -> str:
        if token in self.eos_ids:
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
        return decode_text(self.tok, self.anchor, self.generated)

    def stats(self) -> dict:
        return {"tokens": len(self.generated), "finish": self.finish}


def left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad a [B, heads, n, head_dim] cache tensor on the left of its sequence axis to ``length``."""
    n = t.shape[-2]
    return t if n == length else torch.nn.functional.pad(t, (0, 0, length - n, 0))
