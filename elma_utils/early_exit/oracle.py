"""How fast could early exit be at all? An oracle bound from per-layer answers.

An exit policy only sees confidences; an oracle sees every layer's F1 for every question
and picks, per question, the layer that buys the most speed for the least F1. No policy can
beat it, so when the oracle cannot reach a speed-up target within an F1 budget, the target
is out of reach for that model, whatever the threshold or policy.

The oracle solves: choose one exit layer per question to minimise the summed cost
(cumulative layer latency) subject to mean F1 ≥ reference − ``max_f1_loss``. This is a
multiple-choice knapsack; its Lagrangian dual gives a *lower* bound on the cost (hence an
upper bound on the speed-up) and the primal pick at the dual optimum gives an achievable
oracle assignment (a lower bound on the best oracle speed-up). Both are reported.

``oracle_option_bound`` solves the same problem over any options per question with their own
costs: the layers at full width and the layers after skimming at each keep threshold, each
priced per question (adaptive width), so the bound covers depth and width together.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def oracle_exit_bound(
    per_layer_f1: np.ndarray,
    max_f1_loss: float = 1.0,
    layer_latency_ms: np.ndarray | None = None,
    embeddings_ms: float = 0.0,
    reference_f1: float | None = None,
    iterations: int = 100,
) -> dict[str, Any]:
    """Best possible exits for a model whose per-question F1 per layer is ``per_layer_f1`` [K, N].

    ``per_layer_f1`` holds F1 in 0..1; ``reference_f1`` is in percent (default: the same
    model at full depth, the last row). Costs are cumulative: exiting at layer k costs
    ``embeddings_ms`` + the first k layer latencies (every layer costs 1 when no latencies
    are given). Returns the oracle's average exit layer, F1 (percent), share of questions per
    layer, and the speed-up over full depth: ``speedup_upper_bound`` (no exit policy on this
    model can do better) and ``speedup_achieved`` (an oracle assignment that meets the F1
    budget). When not even the best layer per question keeps the budget, ``reachable`` is
    False and the speed-ups are None.
    """
    f1 = np.asarray(per_layer_f1, dtype=np.float64)
    if f1.ndim != 2 or f1.shape[0] < 1 or f1.shape[1] < 1:
        raise ValueError(f"per_layer_f1 must be [K, N] with K, N ≥ 1, got shape {f1.shape}")
    if np.isnan(f1).any() or f1.min() < 0.0 or f1.max() > 1.0 + 1e-9:
        raise ValueError("per_layer_f1 must hold per-question F1 in 0..1 (not percent), without NaN")
    if not max_f1_loss >= 0:
        raise ValueError(f"max_f1_loss must be ≥ 0, got {max_f1_loss}")
    k_layers, n = f1.shape
    if layer_latency_ms is None:
        layer_cost = np.ones(k_layers)
    else:
        layer_cost = np.asarray(layer_latency_ms, dtype=np.float64)
        if layer_cost.shape != (k_layers,) or (layer_cost < 0).any() or not np.isfinite(layer_cost).all():
            raise ValueError(f"layer_latency_ms must be {k_layers} finite values ≥ 0, got {layer_cost!r}")
    cost = float(embeddings_ms) + np.cumsum(layer_cost)  # [K]
    reference = 100.0 * f1[-1].mean() if reference_f1 is None else float(reference_f1)
    out = oracle_option_bound(
        f1, np.broadcast_to(cost[:, None], f1.shape), reference, max_f1_loss, iterations=iterations
    )
    out["cost_unit"] = "layers" if layer_latency_ms is None else "ms"
    if out["reachable"]:
        layers = out.pop("options") - 1
        out["avg_exit_layer"] = round(float(layers.mean() + 1), 4)
        out["layer_share"] = (np.bincount(layers, minlength=k_layers) / n).round(4).tolist()
        out["exit_layers"] = layers + 1
    return out


def oracle_option_bound(
    f1: np.ndarray,
    cost: np.ndarray,
    reference_f1: float,
    max_f1_loss: float = 1.0,
    full_cost: np.ndarray | None = None,
    iterations: int = 100,
) -> dict[str, Any]:
    """The oracle over any options per question: F1 ``f1`` [M, N] (0..1) and cost ``cost`` [M, N]
    of answering question n with option m (an exit layer at full width, or a layer after
    skimming at some tau, ...). Mean F1 must stay ≥ ``reference_f1`` (percent) − ``max_f1_loss``.
    ``full_cost`` [N] defaults to the last option's (the full model). Returns ``reachable``,
    ``f1``, ``speedup_achieved`` / ``speedup_upper_bound`` (see the module note) and ``options``
    [N], the 1-based option the achievable assignment picks per question."""
    f1, cost = np.asarray(f1, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    if cost.shape != f1.shape:
        raise ValueError(f"cost {cost.shape} and f1 {f1.shape} must both be [M, N]")
    if not max_f1_loss >= 0:
        raise ValueError(f"max_f1_loss must be ≥ 0, got {max_f1_loss}")
    m_options, n = f1.shape
    full = np.asarray(cost[-1] if full_cost is None else full_cost, dtype=np.float64)
    need = n * (float(reference_f1) - max_f1_loss) / 100.0  # summed F1 the choices must keep
    cols = np.arange(n)

    def pick(lam: float) -> np.ndarray:
        # per question: the option with the least cost − λ·F1; ties go to the later option (more F1)
        return m_options - 1 - np.argmin((cost - lam * f1)[::-1], axis=0)

    def dual(lam: float) -> float:
        return float((cost - lam * f1).min(axis=0).sum() + lam * need)

    best_possible = f1.max(axis=0).sum()
    if best_possible < need - 1e-9:  # not even the best option per question keeps the budget
        return {
            "reference_f1": round(float(reference_f1), 4),
            "max_f1_loss": float(max_f1_loss),
            "reachable": False,
            "best_f1": round(100.0 * float(best_possible) / n, 4),
            "speedup_achieved": None,
            "speedup_upper_bound": None,
        }
    lo, hi = 0.0, 1.0
    while f1[pick(hi), cols].sum() < need - 1e-9:  # grow λ until the pick is feasible
        hi *= 2.0
        if hi > 1e12:
            break
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if f1[pick(mid), cols].sum() >= need - 1e-9:
            hi = mid
        else:
            lo = mid
    chosen = _fill_budget(pick(hi), pick(lo), f1, cost, need)
    achieved_cost = float(cost[chosen, cols].sum())
    # the dual is concave in λ: its maximum over the bracket is a lower bound on any feasible cost
    grid = np.linspace(lo, hi, 33)
    lower_cost = max(max(dual(x) for x in grid), float(cost.min(axis=0).sum()))
    full_cost_sum = float(full.sum())
    return {
        "reference_f1": round(float(reference_f1), 4),
        "max_f1_loss": float(max_f1_loss),
        "reachable": True,
        "f1": round(100.0 * float(f1[chosen, cols].mean()), 4),
        "speedup_achieved": round(full_cost_sum / achieved_cost, 4),
        "speedup_upper_bound": round(full_cost_sum / min(lower_cost, achieved_cost), 4),
        "options": chosen + 1,
    }


def _fill_budget(feasible: np.ndarray, cheaper: np.ndarray, f1: np.ndarray, cost: np.ndarray, need: float):
    """Spend the F1 slack left at the dual optimum.

    Questions tied at λ (the same trade-off) all move together in a Lagrangian pick; here they
    move one at a time to their cheaper choice, fewest F1 lost per unit of cost saved first,
    while the summed F1 stays ≥ ``need``.
    """
    cols = np.arange(f1.shape[1])
    layers = feasible.copy()
    slack = f1[layers, cols].sum() - need
    moves = np.nonzero(cheaper != feasible)[0]
    saved = cost[feasible[moves], moves] - cost[cheaper[moves], moves]
    lost = f1[feasible[moves], moves] - f1[cheaper[moves], moves]
    for i in np.argsort(lost / np.maximum(saved, 1e-12), kind="stable"):
        q = moves[i]
        if saved[i] > 0 and lost[i] <= slack + 1e-9:
            layers[q] = cheaper[q]
            slack -= lost[i]
    return layers
