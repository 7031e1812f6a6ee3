"""Early exit on SQuAD 2.0: each exit gets its own no-answer threshold, and a question may
leave only when its no-answer call is settled.

The 2021 prototype used one null threshold and un-normalised entropies for every layer; but
an exit's null margin (null score − best span score) lives on its own scale, so each exit
layer k gets its own threshold t_k, tuned for F1 on held-out questions like the official
script's ``best_f1_thresh``. A question exits at layer k when its span entropy (which
includes the [CLS] no-answer position) is ≤ E_T *and* its null margin is at least
``margin`` away from t_k — the call "answer or no answer" would not flip on a small change.

Everything here works on the per-layer statistics of ``layerwise_question_stats`` computed
with ``null_threshold=None`` (every layer always answers a span), so any t_k can be applied
afterwards without re-running the model: F1 = [question impossible] where the margin says
no-answer, else the span's F1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from elma_utils.early_exit.calibration import choose_threshold, sweep_thresholds
from elma_utils.early_exit.policies import EntropyPolicy, simulate_exits

DEFAULT_MARGINS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


def f1_with_null_thresholds(
    span_f1: np.ndarray, null_diff: np.ndarray, impossible: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Per-layer per-question F1 [K, Q] (0..1) when layer k says no-answer iff null_diff > t_k."""
    no_answer = np.asarray(null_diff) > np.asarray(thresholds, dtype=np.float64)[:, None]
    return np.where(no_answer, np.asarray(impossible, dtype=np.float64)[None, :], span_f1)


def best_null_thresholds(span_f1: np.ndarray, null_diff: np.ndarray, impossible: np.ndarray) -> np.ndarray:
    """For every layer, the null threshold with the best mean F1 (ties: the smallest).

    Candidates are the observed margins (and "below all of them": always no-answer), scanned in one pass:
    raising t past a question's margin turns it from "no answer" into its span's F1. The
    threshold sits midway between neighbouring margins, so margins around it are symmetric."""
    f1 = np.asarray(span_f1, dtype=np.float64)
    diff = np.asarray(null_diff, dtype=np.float64)
    imp = np.asarray(impossible, dtype=np.float64)
    out = np.empty(f1.shape[0])
    for k in range(f1.shape[0]):
        order = np.argsort(diff[k], kind="stable")
        gain = f1[k, order] - imp[order]  # change when question `order[i]` switches to answering
        totals = imp.sum() + np.concatenate([[0.0], np.cumsum(gain)])
        sorted_diff = diff[k, order]
        tied = np.concatenate([[False], sorted_diff[1:] == sorted_diff[:-1], [False]])
        totals[tied] = -np.inf  # a threshold cannot split equal margins
        best = int(np.argmax(totals))  # the `best` smallest margins answer
        if best == 0:  # always "no answer": just below the smallest margin (finite, JSON-safe)
            out[k] = float(sorted_diff[0]) - 1.0
        elif best == len(order):  # always answer: just above the largest
            out[k] = float(sorted_diff[-1]) + 1.0
        else:  # midway between the last answered and the first unanswered margin
            out[k] = float(sorted_diff[best - 1] + sorted_diff[best]) / 2
    return out


def sweep_squad2(
    stats: dict[str, np.ndarray],
    impossible: np.ndarray,
    null_thresholds: np.ndarray,
    margins: tuple[float, ...] = DEFAULT_MARGINS,
    layer_latency_ms: np.ndarray | None = None,
) -> dict[float, Any]:
    """{margin: ThresholdSweep over E_T} with per-layer null thresholds applied."""
    f1 = f1_with_null_thresholds(stats["f1"], stats["null_diff"], impossible, null_thresholds)
    shifted = _shifted(stats["null_diff"], null_thresholds)
    return {
        m: sweep_thresholds(
            f1,
            stats["entropy"],
            layer_latency_ms,
            per_layer_null_diff=shifted,
            null_threshold=0.0,
            no_answer_margin=m,
        )
        for m in margins
    }


def _shifted(null_diff: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """null_diff − t_k, with ±inf thresholds turned into large finite margins of the right sign."""
    with np.errstate(invalid="ignore"):
        d = np.asarray(null_diff, dtype=np.float64) - np.asarray(thresholds, dtype=np.float64)[:, None]
    return np.clip(np.nan_to_num(d, nan=0.0, posinf=1e9, neginf=-1e9), -1e9, 1e9)


def choose_squad2(sweeps: dict[float, Any], max_f1_loss: float = 1.0) -> tuple[float, Any]:
    """(margin, SweepPoint): the cheapest E_T × margin within ``max_f1_loss`` of full depth."""
    best = None
    for margin, sweep in sweeps.items():
        try:
            point = choose_threshold(sweep, max_f1_loss)
        except ValueError:
            continue
        if best is None or (point.expected_latency, -point.f1) < (best[1].expected_latency, -best[1].f1):
            best = (margin, point)
    if best is None:
        raise ValueError(f"no E_T and margin keep SQuAD 2.0 F1 within {max_f1_loss} of full depth")
    return best


def held_out_folds(titles: list[str], seed: int = 0) -> list[np.ndarray]:
    """Masks of the questions each fold's settings apply to: fold 0 is tuned on half A of the
    articles and applied to the rest, fold 1 the other way round."""
    unique = sorted(set(titles))
    half = set(np.random.default_rng(seed).permutation(unique)[: len(unique) // 2].tolist())
    in_a = np.array([t in half for t in titles])
    return [~in_a, in_a]


def cross_fitted_squad2_exit(
    stats: dict[str, np.ndarray],
    titles: list[str],
    impossible: np.ndarray,
    max_f1_loss: float = 1.0,
    margins: tuple[float, ...] = DEFAULT_MARGINS,
    seed: int = 0,
    layer_latency_ms: np.ndarray | None = None,
) -> dict[str, Any]:
    """Tune t_k, E_T and the margin on one half of the articles, score the other half, swap.

    Returns held-out F1 of early exit and of full depth (the last layer with its own tuned
    t_K), per-layer held-out F1, average exit layer, share not settled, the chosen settings."""
    f1_span, diff, entropy = (np.asarray(stats[k]) for k in ("f1", "null_diff", "entropy"))
    imp = np.asarray(impossible, dtype=bool)
    k_layers, n = f1_span.shape
    in_a = ~held_out_folds(titles, seed)[0]
    exit_layer = np.zeros(n, dtype=int)
    got = np.zeros(n)
    full = np.zeros(n)
    per_layer = np.zeros((k_layers, n))
    chosen = []
    setting_index = np.zeros(n, dtype=int)
    for fold, tune in enumerate((in_a, ~in_a)):
        test = ~tune
        setting_index[test] = fold
        t_k = best_null_thresholds(f1_span[:, tune], diff[:, tune], imp[tune])
        sub = {"f1": f1_span[:, tune], "null_diff": diff[:, tune], "entropy": entropy[:, tune]}
        margin, point = choose_squad2(
            sweep_squad2(sub, imp[tune], t_k, margins, layer_latency_ms), max_f1_loss
        )
        f1_test = f1_with_null_thresholds(f1_span[:, test], diff[:, test], imp[test], t_k)
        shifted = _shifted(diff[:, test], t_k)
        policy = EntropyPolicy(point.value, no_answer_margin=margin, null_threshold=0.0)
        layers = simulate_exits(entropy[:, test], None, policy, shifted)
        exit_layer[test] = layers
        used = np.minimum(layers, k_layers)
        got[test] = f1_test[used - 1, np.arange(test.sum())]
        full[test] = f1_test[-1]
        per_layer[:, test] = f1_test
        chosen.append({"E_T": point.value, "margin": margin, "null_thresholds": t_k.tolist()})
    used = np.minimum(exit_layer, k_layers)
    return {
        "f1": float(100 * got.mean()),
        "full_depth_f1": float(100 * full.mean()),
        "f1_loss": float(100 * (full.mean() - got.mean())),
        "per_layer_f1": (100 * per_layer.mean(axis=1)).round(2).tolist(),
        "avg_exit_layer": float(used.mean()),
        "share_not_settled": float(np.mean(exit_layer > k_layers)),
        "exit_layer_histogram": np.bincount(exit_layer, minlength=k_layers + 2)[1:].tolist(),
        "has_ans_f1": float(100 * got[~imp].mean()) if (~imp).any() else None,
        "no_ans_f1": float(100 * got[imp].mean()) if imp.any() else None,
        "settings": chosen,
        "setting_index": setting_index,  # per question: which of ``settings`` was applied (held out)
        "exit_layers": exit_layer,
    }
