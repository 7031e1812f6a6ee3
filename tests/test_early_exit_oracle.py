"""The oracle exit bound: exact on cases small enough to enumerate, and never beaten by a policy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from elma_utils.early_exit import EntropyPolicy, simulate_exits
from elma_utils.early_exit.oracle import oracle_exit_bound


def brute_force_best_cost(f1: np.ndarray, cost: np.ndarray, need: float) -> float:
    """The cheapest assignment of one layer per question that keeps summed F1 ≥ need."""
    k, n = f1.shape
    best = np.inf
    for layers in itertools.product(range(k), repeat=n):
        if f1[list(layers), range(n)].sum() >= need - 1e-9:
            best = min(best, cost[list(layers)].sum())
    return float(best)


def test_every_question_right_at_layer_one_gives_the_full_speed_up():
    f1 = np.ones((4, 5))
    r = oracle_exit_bound(f1, max_f1_loss=0.0)
    assert r["avg_exit_layer"] == 1.0
    assert r["speedup_achieved"] == pytest.approx(4.0)
    assert r["speedup_upper_bound"] == pytest.approx(4.0)
    assert r["f1"] == 100.0


def test_the_loss_budget_buys_exactly_the_questions_it_can_afford():
    # 4 questions, 3 layers; each is right only at the last layer. A budget of 25 F1 points
    # lets exactly one question leave at layer 1 (it scores 0 there).
    f1 = np.zeros((3, 4))
    f1[2] = 1.0
    r = oracle_exit_bound(f1, max_f1_loss=25.0)
    assert r["layer_share"] == [0.25, 0.0, 0.75]
    assert r["f1"] == pytest.approx(75.0)
    assert r["speedup_achieved"] == pytest.approx(12 / 10)


@pytest.mark.parametrize("seed", range(6))
def test_bounds_bracket_the_true_optimum(seed):
    rng = np.random.default_rng(seed)
    k, n = 3, 6
    f1 = np.clip(np.cumsum(rng.uniform(0, 0.5, (k, n)), axis=0), 0, 1).round(2)
    latency = rng.uniform(1, 3, k)
    r = oracle_exit_bound(f1, max_f1_loss=5.0, layer_latency_ms=latency, embeddings_ms=0.5)
    cost = 0.5 + np.cumsum(latency)
    need = n * (100 * f1[-1].mean() - 5.0) / 100
    best = brute_force_best_cost(f1, cost, need)
    full = n * cost[-1]
    assert r["speedup_achieved"] <= full / best + 1e-3  # an assignment cannot beat the optimum
    assert r["speedup_upper_bound"] >= full / best - 1e-3  # the bound is never below it
    layers = r["exit_layers"] - 1
    assert f1[layers, np.arange(n)].sum() >= need - 1e-9  # the achieved assignment keeps the F1 budget


def test_no_entropy_threshold_beats_the_oracle():
    rng = np.random.default_rng(7)
    k, n = 6, 400
    f1 = np.clip(np.cumsum(rng.uniform(0, 0.3, (k, n)), axis=0), 0, 1)
    entropy = np.clip(1 - f1 + rng.normal(0, 0.2, (k, n)), 0, 1)
    bound = oracle_exit_bound(f1, max_f1_loss=1.0)["speedup_upper_bound"]
    reference = 100 * f1[-1].mean()
    for t in np.linspace(0, 1, 41):
        exits = simulate_exits(entropy, None, EntropyPolicy(float(t)))
        layers = np.minimum(exits, k) - 1
        if 100 * f1[layers, np.arange(n)].mean() >= reference - 1.0:
            assert k / (layers.mean() + 1) <= bound + 1e-9


def test_a_target_out_of_reach_is_reported_and_percent_input_refused():
    f1 = np.array([[0.0, 0.5, 0.0], [0.25, 0.5, 0.0]])
    r = oracle_exit_bound(f1, max_f1_loss=1.0, reference_f1=50.0)
    assert r["reachable"] is False and r["best_f1"] == 25.0 and r["speedup_upper_bound"] is None
    assert oracle_exit_bound(f1, max_f1_loss=1.0)["reachable"] is True
    with pytest.raises(ValueError, match="0..1"):
        oracle_exit_bound(np.full((2, 3), 80.0))
