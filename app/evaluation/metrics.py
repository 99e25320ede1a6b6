"""The Few-Shot Bot paper's metrics, as plain functions over strings and sets.

Every function returns a fraction in [0, 1]; reports multiply by 100 to print them beside the paper's figures.

- `unigram_f1`: ParlAI's F1 — normalise (lower case, drop punctuation and the articles a/an/the), then the harmonic mean
  of precision and recall of the shared words, counted with multiplicity. Also knowledge F1 (reply vs the knowledge).
- `corpus_bleu`: BLEU-4 over a corpus (Papineni et al. 2002, as multi-bleu.perl): clipped n-gram counts summed over all
  sentences, geometric mean of the four precisions, one brevity penalty; no smoothing.
- `exact_match`: normalised strings equal.
- `set_f1`: F1 of two sets (KG triples, KB entities, dialogue-state slots).
- `joint_goal_accuracy`: the share of turns whose predicted state equals the gold state as a whole.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Hashable, Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_BLEU_TOKENS = re.compile(r"\w+|[^\w\s]")


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, no articles, single spaces (ParlAI's ``normalize_answer``)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def unigram_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 between two texts after `normalize`; 0 when either side has no words."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after `normalize`, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def set_f1(predicted: Iterable[Hashable], gold: Iterable[Hashable]) -> float:
    """F1 of two sets; 1.0 when both are empty (nothing to find, nothing claimed)."""
    p, g = set(predicted), set(gold)
    if not p and not g:
        return 1.0
    hit = len(p & g)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(p), hit / len(g)
    return 2 * precision * recall / (precision + recall)


def joint_goal_accuracy(predicted: Sequence[Iterable[Hashable]], gold: Sequence[Iterable[Hashable]]) -> float:
    """Share of turns whose whole predicted state (a set of slot=value pairs) equals the gold one."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predicted states for {len(gold)} gold states")
    if not gold:
        return 0.0
    return sum(set(p) == set(g) for p, g in zip(predicted, gold)) / len(gold)


def bleu_tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, the tokenisation BLEU is counted over."""
    return _BLEU_TOKENS.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus-level BLEU with one reference per prediction; 0 when any n-gram order has no match."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    matched, total = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        p, r = bleu_tokens(pred), bleu_tokens(ref)
        pred_len, ref_len = pred_len + len(p), ref_len + len(r)
        for n in range(1, max_n + 1):
            pn, rn = _ngrams(p, n), _ngrams(r, n)
            matched[n - 1] += sum((pn & rn).values())
            total[n - 1] += max(len(p) - n + 1, 0)
    if pred_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def parse_state(text: str) -> frozenset[tuple[str, str]]:
    """``"hotel-area=east, hotel-stars=4"`` (commas, semicolons or tabs between pairs) as a set of (slot, value);
    ``"none"`` or text without any ``=`` is the empty state."""
    pairs = set()
    for part in re.split(r"[,;\t\n]", text):
        if "=" in part:
            slot, value = part.split("=", 1)
            slot, value = " ".join(slot.lower().split()), " ".join(value.lower().split())
            if slot and value:
                pairs.add((slot, value))
    return frozenset(pairs)
