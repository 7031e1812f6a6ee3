"""Span entropy: how unsure an exit head is about where the answer starts and ends.

The 2021 prototype took entropies over every position (padding and question tokens
included) and compared raw values, so a threshold meant something different for every
context length and its exits fired only at layer 1 or 12. Here:

- the softmax runs over the *answer space* only (context tokens, plus [CLS] — the
  no-answer choice and the label of windows that do not hold the answer);
- the entropy is divided by log(number of valid positions), so it lies in [0, 1] and one
  threshold E_T means the same at every length (uniform → 1, one-hot → 0);
- start and end are combined by a stated rule (default: the larger of the two);
- for SQuAD 2.0 the no-answer decision must also be settled before an exit is allowed.

Everything is NumPy (float64 inside) so it runs unchanged in the edge runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from elma_utils.squad.postprocess import best_span

SPAN_RULES = ("max", "mean", "joint")
AGGREGATIONS = ("max", "min", "mean")


def answer_space(features_or_offsets: Any, include_cls: bool, length: int | None = None) -> np.ndarray:
    """Bool mask [N, L] of the positions an answer may start or end at.

    Context tokens are those whose character offsets are ≥ 0 (``QAFeatures.offsets``: -1
    outside the context); [CLS] (position 0) is added when ``include_cls``. Pass ``length``
    when the logits were computed on the first ``length`` columns only.
    """
    offsets = np.asarray(getattr(features_or_offsets, "offsets", features_or_offsets))
    if offsets.ndim == 3:
        offsets = offsets[..., 0]
    if offsets.ndim != 2:
        raise ValueError(f"offsets must be [N, L] or [N, L, 2], got shape {offsets.shape}")
    if length is not None:
        offsets = offsets[:, :length]
    mask = offsets >= 0
    if include_cls:
        mask[:, 0] = True
    return mask


def masked_normalised_entropy(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Entropy of softmax(logits) over the valid positions, divided by log(#valid) → [0, 1].

    Works on any leading shape (``[N, L]``, or ``[K, N, L]`` with a mask that broadcasts);
    reduces the last axis. Values at masked positions never matter (−1e4, NaN, anything).
    A row with one valid position is certain (0); a row with none is an error.
    """
    x = np.asarray(logits, dtype=np.float64)
    valid = _broadcast_mask(mask, x.shape)
    n_valid = valid.sum(axis=-1)
    if np.any(n_valid == 0):
        raise ValueError("a row has no valid position: the answer space mask is empty")
    x = np.where(valid, x, -np.inf)
    x = x - x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=-1, keepdims=True))
    log_p = np.where(valid, x - log_z, 0.0)
    entropy = -(np.exp(log_p) * log_p * valid).sum(axis=-1)
    norm = np.log(np.maximum(n_valid, 2))
    return np.clip(np.where(n_valid > 1, entropy / norm, 0.0), 0.0, 1.0)


def span_entropy(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    mask: np.ndarray,
    rule: str = "max",
    top_k: int = 20,
    max_answer_len: int = 30,
) -> np.ndarray:
    """Normalised uncertainty of the span (one value per row, in [0, 1]).

    Rules:
    - ``"max"`` (default): max(H(start), H(end)). Conservative: a question exits only
      when *both* ends are confident; one sharp end cannot hide a vague other end.
    - ``"mean"``: (H(start) + H(end)) / 2.
    - ``"joint"``: entropy of the span distribution p(s, e) ∝ exp(start_s + end_e) over
      the valid spans among the ``top_k`` starts × ``top_k`` ends (e ≥ s, at most
      ``max_answer_len`` tokens, or the null span (0, 0) when [CLS] is in the mask),
      divided by log(number of those spans). Rows with no valid candidate span get 1.
    """
    if rule not in SPAN_RULES:
        raise ValueError(f"unknown span entropy rule {rule!r}; choose one of {SPAN_RULES}")
    if rule == "joint":
        return _joint_span_entropy(start_logits, end_logits, mask, top_k, max_answer_len)
    h_start = masked_normalised_entropy(start_logits, mask)
    h_end = masked_normalised_entropy(end_logits, mask)
    return np.maximum(h_start, h_end) if rule == "max" else (h_start + h_end) / 2.0


def _broadcast_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    try:
        return np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(f"mask of shape {mask.shape} does not fit logits of shape {shape}") from None


def _joint_span_entropy(start, end, mask, top_k: int, max_answer_len: int) -> np.ndarray:
    start = np.asarray(start, dtype=np.float64)
    lead, seq = start.shape[:-1], start.shape[-1]
    valid = _broadcast_mask(mask, start.shape).reshape(-1, seq)
    s = np.where(valid, start.reshape(-1, seq), -np.inf)
    e = np.where(valid, np.asarray(end, dtype=np.float64).reshape(-1, seq), -np.inf)
    k = min(top_k, seq)
    s_idx, s_val = _top_k(s, k)
    e_idx, e_val = _top_k(e, k)
    scores = s_val[:, :, None] + e_val[:, None, :]
    ok = _valid_pairs(s_idx, e_idx, max_answer_len) & np.isfinite(scores)
    m = ok.sum(axis=(1, 2))
    flat = np.where(ok, scores, -np.inf).reshape(len(s), -1)
    top = np.where(m > 0, flat.max(axis=1), 0.0)[:, None]
    z = np.where(ok.reshape(len(s), -1), np.exp(flat - top), 0.0)
    p = z / np.maximum(z.sum(axis=1, keepdims=True), 1e-300)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    out = np.where(m > 1, h / np.log(np.maximum(m, 2)), np.where(m == 1, 0.0, 1.0))
    return np.clip(out, 0.0, 1.0).reshape(lead)


def _top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
    return idx, np.take_along_axis(x, idx, 1)


def _valid_pairs(s_idx: np.ndarray, e_idx: np.ndarray, max_answer_len: int) -> np.ndarray:
    """Context spans (no [CLS] inside, e ≥ s, not too long) and the null span (0, 0)."""
    si, ei = s_idx[:, :, None], e_idx[:, None, :]
    length = ei - si
    in_context = (si > 0) & (length >= 0) & (length < max_answer_len)
    return in_context | ((si == 0) & (ei == 0))


def no_answer_margin(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    mask: np.ndarray,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> np.ndarray:
    """Null score − best span score per window (higher: more likely unanswerable).

    For a question over several windows use ``question_no_answer_margin``, which combines
    windows as the post-processing does (lowest null − highest span score).
    """
    _, _, best, null = best_span(start_logits, end_logits, mask, n_best, max_answer_len)
    return null - best


def question_no_answer_margin(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    mask: np.ndarray,
    example_index: np.ndarray,
    num_examples: int | None = None,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> np.ndarray:
    """Per question: min null score over its windows − max span score (= ``null_score_diff``)."""
    _, _, best, null = best_span(start_logits, end_logits, mask, n_best, max_answer_len)
    return aggregate_by_example(null, example_index, "min", num_examples) - aggregate_by_example(
        best, example_index, "max", num_examples
    )


def settled_no_answer(diff: np.ndarray | float, threshold: float, margin: float) -> np.ndarray:
    """True where the no-answer decision is clear: |diff − threshold| ≥ margin.

    ``diff`` is null − best span score and ``threshold`` the SQuAD 2.0 null threshold;
    a question near the threshold could flip between "" and a span at a later layer, so
    it must not exit however confident its span is.
    """
    return np.abs(np.asarray(diff, dtype=np.float64) - threshold) >= margin


def exit_confidence(
    entropy: np.ndarray | float,
    threshold: float,
    null_diff: np.ndarray | float | None = None,
    null_threshold: float | None = None,
    no_answer_margin: float | None = None,
) -> np.ndarray:
    """May this question exit? entropy ≤ threshold and, for SQuAD 2.0, a settled no-answer call.

    With ``no_answer_margin=None`` only the entropy counts (SQuAD 1.1). Otherwise
    ``null_diff`` is required and the decision must be ``settled_no_answer``.
    """
    ok = np.asarray(entropy, dtype=np.float64) <= threshold
    if no_answer_margin is None:
        return ok
    if null_diff is None:
        raise ValueError("no_answer_margin is set but no null_diff (null − best span score) was given")
    return ok & settled_no_answer(
        null_diff, 0.0 if null_threshold is None else null_threshold, no_answer_margin
    )


def aggregate_by_example(
    values: np.ndarray, example_index: np.ndarray, how: str = "max", num_examples: int | None = None
) -> np.ndarray:
    """Combine per-window values [..., N] into per-question values [..., Q].

    ``"max"`` is the conservative choice for entropies (every window must be sure);
    ``"min"`` is what the null score needs. Questions without a window get NaN.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    values = np.asarray(values, dtype=np.float64)
    idx = np.asarray(example_index).astype(np.int64).ravel()
    if values.shape[-1] != idx.size:
        raise ValueError(f"values have {values.shape[-1]} windows but example_index has {idx.size}")
    q = int(num_examples if num_examples is not None else (idx.max() + 1 if idx.size else 0))
    if idx.size and (idx.min() < 0 or idx.max() >= q):
        raise ValueError(f"example_index must lie in 0..{q - 1}")
    flat = values.reshape(-1, idx.size)
    out = np.full((flat.shape[0], q), np.nan)
    if idx.size:
        order = np.argsort(idx, kind="stable")
        ids, starts = np.unique(idx[order], return_index=True)
        ufunc = {"max": np.maximum, "min": np.minimum, "mean": np.add}[how]
        red = ufunc.reduceat(flat[:, order], starts, axis=1)
        if how == "mean":
            red = red / np.diff(np.append(starts, idx.size))
        out[:, ids] = red
    return out.reshape(values.shape[:-1] + (q,))
