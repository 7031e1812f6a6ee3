"""Logits → answers: span search, windows, the no-answer rule; worked by hand."""

from __future__ import annotations

import numpy as np

from elma_utils.squad.data import SquadExample
from elma_utils.squad.features import QAFeatures
from elma_utils.squad.postprocess import predict_answers

CONTEXT = "Denver Broncos beat the Carolina Panthers."
# context tokens (positions 3..8 of a 10-token row: [CLS] q q [SEP] ctx... [SEP])
TOKEN_SPANS = [(0, 6), (7, 14), (15, 19), (20, 23), (24, 32), (33, 41)]


def _features(n_windows: int = 1) -> QAFeatures:
    L = 10
    offsets = np.full((n_windows, L, 2), -1, np.int32)
    offsets[:, 3:9] = TOKEN_SPANS
    return QAFeatures(
        token_ids=np.ones((n_windows, L), np.int32),
        lengths=np.full(n_windows, 10, np.int32),
        context_start=np.full(n_windows, 3, np.int32),
        offsets=offsets,
        start_positions=np.zeros(n_windows, np.int32),
        end_positions=np.zeros(n_windows, np.int32),
        example_index=np.zeros(n_windows, np.int32),
    )


EX = SquadExample("q1", "Who won?", CONTEXT, (), False, "t", "t#0")


def _logits(start_at: int, end_at: int, cls: float = 0.0, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    s = np.full((n, 10), -5.0, np.float32)
    e = np.full((n, 10), -5.0, np.float32)
    s[:, 0] = e[:, 0] = cls
    s[:, start_at] = 4.0
    e[:, end_at] = 3.0
    return s, e


def test_best_span_is_cut_from_the_context():
    s, e = _logits(3, 4)
    [p] = predict_answers([EX], _features(), s, e)
    assert p.text == "Denver Broncos" and (p.char_start, p.char_end) == (0, 14)
    assert p.score == 7.0 and p.null_score_diff == -7.0 and not p.no_answer


def test_end_before_start_and_question_tokens_are_never_chosen():
    s, e = _logits(6, 4)
    s[0, 1] = 50.0  # a question token: not in the answer space
    e[0, 7] = 2.5  # best valid end after start 6 is token 7 (Carolina)
    [p] = predict_answers([EX], _features(), s, e)
    assert p.text == "the Carolina"


def test_max_answer_len():
    s, e = _logits(3, 8)
    e[0, 5] = 1.0
    [p] = predict_answers([EX], _features(), s, e, max_answer_len=3)
    assert p.text == "Denver Broncos beat"


def test_no_answer_threshold_and_null_score():
    s, e = _logits(3, 4, cls=5.0)  # null = 10 > span 7
    [p] = predict_answers([EX], _features(), s, e)
    assert p.text == "Denver Broncos" and p.null_score_diff == 3.0  # v1.1: never empty
    [p] = predict_answers([EX], _features(), s, e, null_threshold=2.0)
    assert p.text == "" and p.no_answer and p.span_text == "Denver Broncos"
    [p] = predict_answers([EX], _features(), s, e, null_threshold=3.5)
    assert p.text == "Denver Broncos"


def test_best_window_wins_and_null_is_the_minimum_over_windows():
    s, e = _logits(3, 4, cls=1.0, n=2)
    s[1], e[1] = -5.0, -5.0
    s[1, 0], e[1, 0] = -1.0, -1.0  # second window: null -2
    s[1, 7], e[1, 8] = 9.0, 9.0  # and a better span "Carolina Panthers"
    [p] = predict_answers([EX], _features(2), s, e)
    assert p.text == "Carolina Panthers"
    assert p.score == 18.0 and p.null_score_diff == -20.0
