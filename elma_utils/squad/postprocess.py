"""Start/end logits of every window → one answer per question.

For each window the best span is searched among the top-k start and end tokens
(context tokens only, end ≥ start, at most ``max_answer_len`` tokens), as in the
reference BERT SQuAD code; the question's answer is the best span over its windows.
The no-answer score is the lowest [CLS] score (start₀ + end₀) over the windows; SQuAD
2.0 predicts "" when ``null_score - best_span_score`` exceeds a threshold tuned on
held-out data. Answers are cut from the original context through character offsets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from elma_utils.squad.features import QAFeatures


@dataclass
class SpanPrediction:
    """The answer to one question."""

    text: str  # "" when predicted unanswerable
    char_start: int  # -1 when no span
    char_end: int
    score: float  # start + end logit of the best span
    null_score_diff: float  # null score − best span score (higher: more likely unanswerable)
    no_answer: bool
    span_text: str = ""  # the best span's text, also when no_answer is True

    def to_dict(self) -> dict:
        return asdict(self)

    def text_if_answer(self) -> str:
        """The best span's text even when the no-answer decision won (for threshold tuning)."""
        return self.span_text


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    mask: np.ndarray,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(start token, end token, span score, null score) per window [N], vectorised.

    Top-k starts and ends among the positions ``mask`` allows (never [CLS] at 0), end ≥
    start, at most ``max_answer_len`` tokens. The null score is start[0] + end[0]. Works on
    a bare mask, so the edge runtime needs no ``QAFeatures``.
    """
    start = np.asarray(start_logits, dtype=np.float64)
    end = np.asarray(end_logits, dtype=np.float64)
    n, seq = start.shape
    ctx = np.broadcast_to(np.asarray(mask, dtype=bool), start.shape).copy()
    ctx[:, 0] = False
    k = min(n_best, seq)
    s_idx, s_val = _top_k(np.where(ctx, start, -np.inf), k)
    e_idx, e_val = _top_k(np.where(ctx, end, -np.inf), k)
    scores = s_val[:, :, None] + e_val[:, None, :]
    length = e_idx[:, None, :] - s_idx[:, :, None]
    scores = np.where((length >= 0) & (length < max_answer_len), scores, -np.inf).reshape(n, -1)
    flat = scores.argmax(axis=1)
    si, ei = np.unravel_index(flat, (k, k))
    rows = np.arange(n)
    return s_idx[rows, si], e_idx[rows, ei], scores[rows, flat], start[:, 0] + end[:, 0]


def _top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argpartition(-values, k - 1, axis=1)[:, :k]
    return idx, np.take_along_axis(values, idx, 1)


def best_spans_per_feature(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    features: QAFeatures,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``best_span`` over each window's context tokens (offsets ≥ 0)."""
    mask = features.offsets[:, : start_logits.shape[1], 0] >= 0
    return best_span(start_logits, end_logits, mask, n_best, max_answer_len)


def predict_answers(
    examples: list,
    features: QAFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    null_threshold: float | None = None,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> list[SpanPrediction]:
    """One SpanPrediction per example. ``null_threshold=None`` never predicts no-answer (v1.1)."""
    st, en, score, null = best_spans_per_feature(start_logits, end_logits, features, n_best, max_answer_len)
    best_feat = np.full(len(examples), -1)
    best_score = np.full(len(examples), -np.inf)
    min_null = np.full(len(examples), np.inf)
    for f, ex_i in enumerate(features.example_index):
        if score[f] > best_score[ex_i]:
            best_score[ex_i], best_feat[ex_i] = score[f], f
        min_null[ex_i] = min(min_null[ex_i], null[f])
    out = []
    for i, ex in enumerate(examples):
        f = best_feat[i]
        if f < 0 or not np.isfinite(best_score[i]):
            out.append(SpanPrediction("", -1, -1, float("-inf"), float("inf"), True, ""))
            continue
        c0, c1 = int(features.offsets[f, st[f], 0]), int(features.offsets[f, en[f], 1])
        diff = float(min_null[i] - best_score[i])
        no_ans = null_threshold is not None and diff > null_threshold
        span = ex.context[c0:c1]
        out.append(
            SpanPrediction("" if no_ans else span, c0, c1, float(best_score[i]), diff, bool(no_ans), span)
        )
    return out
