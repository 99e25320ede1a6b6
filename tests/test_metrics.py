"""The paper's metrics against values worked out by hand."""
from __future__ import annotations

import math

import pytest

from app.evaluation.metrics import (corpus_bleu, exact_match, joint_goal_accuracy, normalize, parse_state, set_f1,
                                    unigram_f1)


def test_normalize_drops_case_punctuation_and_articles():
    assert normalize("The cat, an owl & a DOG!") == "cat owl dog"


def test_unigram_f1():
    # pred words after normalising: cat sat on mat (4); gold: cat sat (2); shared 2 -> P 1/2, R 1 -> F1 2/3
    assert unigram_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert unigram_f1("Hello, world!", "hello world") == 1.0
    # multiplicity counts: pred "no no no" vs gold "no": shared 1 -> P 1/3, R 1 -> F1 1/2
    assert unigram_f1("no no no", "no") == pytest.approx(0.5)
    assert unigram_f1("", "anything") == 0.0
    assert unigram_f1("the", "a") == 0.0  # nothing left after the articles go


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("eiffel", "eiffel tower") == 0.0


def test_corpus_bleu_by_hand():
    # the cat sat on the mat / the cat sat on a mat: clipped precisions 5/6, 3/5, 2/4, 1/3; equal lengths, no penalty
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx((1 / 12) ** 0.25)
    assert corpus_bleu(["the cat sat on a mat"], ["the cat sat on a mat"]) == pytest.approx(1.0)
    # every n-gram matches but the prediction is 4 tokens for 6: brevity penalty exp(1 - 6/4)
    assert corpus_bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-0.5))
    assert corpus_bleu(["cat sat on mat"], ["a dog ran off"]) == 0.0


def test_corpus_bleu_pools_counts_over_sentences():
    # sentence 1 matches fully (4 tokens); sentence 2 shares nothing above unigrams; 1-grams 5/8, 2-grams 3/6,
    # 3-grams 2/4, 4-grams 1/2; lengths 8 vs 8
    preds, refs = ["a b c d", "x y z w"], ["a b c d", "x q r s"]
    expected = (5 / 8 * 3 / 6 * 2 / 4 * 1 / 2) ** 0.25
    assert corpus_bleu(preds, refs) == pytest.approx(expected)
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


def test_set_f1():
    assert set_f1({1, 2, 3}, {2, 3, 4, 5}) == pytest.approx(4 / 7)  # P 2/3, R 1/2
    assert set_f1(set(), set()) == 1.0
    assert set_f1({1}, set()) == 0.0


def test_parse_state():
    assert parse_state("hotel-area=east, hotel-stars=4") == {("hotel-area", "east"), ("hotel-stars", "4")}
    assert parse_state("hotel-area=east\thotel-name=the  Gonville hotel") == {("hotel-area", "east"),
                                                                             ("hotel-name", "the gonville hotel")}
    assert parse_state("none") == frozenset()


def test_joint_goal_accuracy():
    pred = [parse_state("a=1, b=2"), parse_state("a=1"), parse_state("none")]
    gold = [parse_state("b=2, a=1"), parse_state("a=2"), parse_state("none")]
    assert joint_goal_accuracy(pred, gold) == pytest.approx(2 / 3)  # order does not matter; empty equals empty
    with pytest.raises(ValueError):
        joint_goal_accuracy(pred, gold[:1])
