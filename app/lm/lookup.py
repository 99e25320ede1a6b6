"""Prompt-lookup decoding: greedy generation that verifies several guessed tokens in one forward pass.

Why: a parser's output is mostly copied from its prompt (a dialogue state repeats the slot names of the examples and the
values the user typed; a KG path repeats the entities of the conversation), and on a CPU one forward pass over ten
tokens costs little more than over one (the weights are read once either way). So after each chosen token we look for
the last few tokens earlier in the prompt or the output (an n-gram match, newest first) and take the tokens that
followed there as a *draft*; one forward pass feeds the chosen token and the draft; the model's own argmax at each
position says how much of the draft it would have produced itself. Those tokens are accepted, the first disagreement
is replaced by the model's token, and the rejected tail is cut from the KV cache (`Cache.crop`; sliding-window layers,
Gemma's, keep their past while recording so the cut can be undone). The output is the greedy output (Saxena 2023,
"prompt lookup decoding"; transformers' ``prompt_lookup_num_tokens``), with no draft model. In float32 it is the
same text token for token; in bfloat16 an exact tie between two logits may break the other way in the wider pass
(15 of 16 KG paths identical in one A/B), which changes a parser's output no more than batching does.

Only greedy decoding without a repetition penalty qualifies (`decoding.is_greedy`): the accepted tokens must be the
ones the model would choose one at a time. Anything else, and a backend without this loop, takes the ordinary path.

Shapes: ids [1, L]; positions [1, L]; logits [1, L, V] (every fed position's prediction).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .decoding import RowStream

DRAFT_TOKENS = 8  # most draft tokens verified per forward pass
NGRAM = 3  # longest n-gram matched; shorter ones are tried when it does not occur, down to MIN_NGRAM
MIN_NGRAM = 2  # a lone matching token predicts too little to be worth the wider pass


def draft(seq: Sequence[int], max_tokens: int, ngram: int = NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of ``seq``'s last n-gram (n from
    ``ngram`` down to ``min_ngram``), or ``[]``. The match nearest the end wins: recent text predicts the next text
    best.

    >>> draft([5, 6, 7, 1, 2, 5, 6], 3)
    [7, 1, 2]
    """
    if max_tokens <= 0:
        return []
    n_seq = len(seq)
    for n in range(min(ngram, n_seq - 1), min_ngram - 1, -1):
        tail = list(seq[n_seq - n:])
        for start in range(n_seq - n - 1, -1, -1):  # an occurrence ending before the tail itself
            if seq[start] == tail[0] and list(seq[start:start + n]) == tail:
                follow = list(seq[start + n:start + n + max_tokens])
                if follow:
                    return follow
    return []


def lookup_decode(lm, ids: list[int], prefix_len: int, stops: Sequence[str], max_new_tokens: int,
                  stats: dict | None = None, draft_tokens: int = DRAFT_TOKENS) -> Iterator[str]:
    """Greedy pieces of the continuation of ``ids`` (its first ``prefix_len`` tokens from ``lm``'s prefix cache).

    ``lm`` is a `TransformersLM` (its runner, tokenizer and EOS ids). ``stats`` gets ``tokens`` and ``finish`` as in
    every loop, plus ``forward_passes`` and ``drafted`` / ``accepted`` (draft tokens offered / kept).
    """
    runner = lm.runner
    cache, logits = runner.prefill(ids, prefix_len)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()  # sliding-window layers keep what a crop may need to restore
    row = RowStream(lm.tok, lm.eos_ids, ids[-1], stops, max_new_tokens)
    seq = list(ids)
    token = int(logits.float().argmax())
    passes, drafted, accepted = 1, 0, 0
    width = draft_tokens // 2  # the draft's length adapts: doubled after a full accept, the kept run + 1 otherwise
    while True:
        piece = row.push(token)
        if piece:
            yield piece
        if row.done:
            break
        seq.append(token)
        # the last generated token's successor is free (it comes with this pass), so a draft fills the rest
        guess = draft(seq, min(width, max_new_tokens - len(row.generated) - 1))
        feed = [token] + guess
        start = len(seq) - 1
        positions = torch.arange(start, start + len(feed))[None]
        cache, out = runner.forward(torch.tensor([feed]), cache, positions=positions, keep=0, decode=True)
        passes += 1
        predicted = out[0].float().argmax(-1).tolist()  # predicted[i]: the greedy token after feed[i]
        kept = 0
        for i, t in enumerate(guess):
            if predicted[i] != t:
                break
            piece = row.push(t)
            if piece:
                yield piece
            kept += 1
            if row.done:
                break
            seq.append(t)
        drafted, accepted = drafted + len(guess), accepted + kept
        if row.done:
            break
        cache.crop(-(len(guess) - kept) if kept < len(guess) else 0)  # 0 still trims a recording window
        if guess:
            width = min(draft_tokens, width * 2) if kept == len(guess) else max(1, kept + 1)
        token = predicted[kept]
    if stats is not None:
        stats.update(row.stats())
        stats.update(forward_passes=passes, drafted=drafted, accepted=accepted)
