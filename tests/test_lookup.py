"""Prompt-lookup decoding (app/lm/lookup.py): the greedy text of the plain loop, in fewer forward passes when the
output copies its prompt; on the tiny real Gemma-3 model, whose sliding-window layers (16 slots) make every cut past the
window go through the cache's past recording."""
from __future__ import annotations

import pytest

from app.lm import Sampling
from app.lm.batching import BatchedLM
from app.lm.lookup import draft

GREEDY = Sampling(temperature=0.0)
PROMPTS = [
    "User: hello there how are you\nAssistant: hello there how are you\nUser: hello there how",
    "Dialogue:\nUser: i need a cheap hotel in the north\nState: hotel-area=north, hotel-pricerange=cheap\n\n"
    "Dialogue:\nUser: a cheap hotel in the north with parking\nState:",
    "the cat sat on the mat . the dog sat on the log . the cat sat on",
]


def test_draft_takes_the_latest_match_of_the_longest_ngram():
    assert draft([5, 6, 7, 1, 2, 5, 6], 3) == [7, 1, 2]
    assert draft([1, 2, 9, 1, 2, 8, 3, 1, 2], 2) == [8, 3]  # the latest occurrence, not the first
    assert draft([4, 5, 6, 7], 4) == []  # no repeated n-gram
    assert draft([3, 9, 3], 2) == []  # a single repeated token is not enough (MIN_NGRAM)
    assert draft([3, 9, 3], 2, min_ngram=1) == [9, 3]
    assert draft([1, 2, 1, 2], 0) == []


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("prefix_chars", [0, 20])
def test_lookup_gives_the_plain_loops_greedy_text(tiny_lm, prompt, prefix_chars):
    prefix = prompt[:prefix_chars] or None
    plain = "".join(tiny_lm.generate(prompt, stop=["\nUser:"], max_new_tokens=60, sampling=GREEDY, prefix=prefix))
    stats: dict = {}
    fast = "".join(tiny_lm.generate_lookup(prompt, stop=["\nUser:"], max_new_tokens=60, sampling=GREEDY,
                                           prefix=prefix, stats=stats))
    assert fast == plain
    assert stats["tokens"] > 0 and stats["finish"] in ("stop", "eos", "length")
    assert stats["accepted"] <= stats["drafted"]


def test_lookup_saves_forward_passes_past_the_sliding_window(tiny_lm):
    # a long repetitive prompt: well past the 16-slot window, and full of n-grams the output repeats
    prompt = " ".join(["one two three four five six"] * 12)
    stats: dict = {}
    out = "".join(tiny_lm.generate_lookup(prompt, max_new_tokens=48, sampling=GREEDY, stats=stats))
    assert out == "".join(tiny_lm.generate(prompt, max_new_tokens=48, sampling=GREEDY))
    assert stats["accepted"] > 0
    assert stats["forward_passes"] < stats["tokens"]  # some passes verified more than one token


def test_sampling_or_a_penalty_takes_the_ordinary_loop(tiny_lm):
    prompt = PROMPTS[0]
    for sampling in (Sampling(temperature=0.7, seed=3), Sampling(temperature=0.0, repetition_penalty=1.2)):
        stats: dict = {}
        got = "".join(tiny_lm.generate_lookup(prompt, max_new_tokens=20, sampling=sampling, stats=stats))
        assert got == "".join(tiny_lm.generate(prompt, max_new_tokens=20, sampling=sampling))
        assert "forward_passes" not in stats  # the plain loop filled them


def test_batched_lm_looks_up_when_alone(tiny_lm):
    served = BatchedLM(tiny_lm, max_batch=4)
    try:
        stats: dict = {}
        got = "".join(served.generate_lookup(PROMPTS[1], stop=["\n"], max_new_tokens=30, sampling=GREEDY,
                                             stats=stats))
        assert got == "".join(tiny_lm.generate(PROMPTS[1], stop=["\n"], max_new_tokens=30, sampling=GREEDY))
        assert "forward_passes" in stats  # nothing else was running: the lookup loop took it
    finally:
        served.close()
