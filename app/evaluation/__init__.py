"""Evaluation of skills against dialogue data shaped like ``shared/data/fsb``: the paper's metrics and the runners."""
from .metrics import corpus_bleu, exact_match, joint_goal_accuracy, parse_state, set_f1, unigram_f1
from .skill_eval import PAPER, EvalError, EvalResult, Sample, evaluate, read_records, samples_for

__all__ = ["PAPER", "EvalError", "EvalResult", "Sample", "corpus_bleu", "evaluate", "exact_match",
           "joint_goal_accuracy", "parse_state", "read_records", "samples_for", "set_f1", "unigram_f1"]
