"""The oracle exit bound: exact on cases small enough to enumerate, and never beaten by a policy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from elma_utils.early_exit import EntropyPolicy, simulate_exits
from elma_utils.early_exit.oracle import oracle_exit_bound, oracle_option_bound


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


def brute_force_options(f1: np.ndarray, cost: np.ndarray, need: float) -> float:
    """The cheapest choice of one option per question (per-question costs) keeping summed F1 ≥ need."""
    m, n = f1.shape
    best = np.inf
    for picks in itertools.product(range(m), repeat=n):
        if f1[list(picks), range(n)].sum() >= need - 1e-9:
            best = min(best, cost[list(picks), range(n)].sum())
    return float(best)


@pytest.mark.parametrize("seed", range(6))
def test_the_option_bound_brackets_the_exact_optimum_with_per_question_costs(seed):
    """Options with their own cost per question (layers at full width, layers after a skim):
    the achievable assignment meets the budget and the bound is never below the optimum."""
    rng = np.random.default_rng(seed)
    f1 = rng.integers(0, 2, size=(5, 6)).astype(float)
    f1[-1] = 1.0  # the full model (last option) answers everything
    cost = rng.uniform(0.5, 5.0, size=(5, 6))
    cost[-1] = 6.0
    r = oracle_option_bound(f1, cost, reference_f1=100.0, max_f1_loss=34.0)
    best = brute_force_options(f1, cost, need=6 * 0.66)
    assert r["reachable"] and r["f1"] >= 66.0 - 1e-6
    exact = 36.0 / best
    assert r["speedup_achieved"] <= exact + 1e-4 and exact <= r["speedup_upper_bound"] + 1e-4  # 4 decimals
    picked = r["options"] - 1
    assert cost[picked, range(6)].sum() == pytest.approx(36.0 / r["speedup_achieved"], rel=1e-3)


def test_shared_costs_give_the_exit_bound():
    rng = np.random.default_rng(3)
    f1 = rng.random((4, 50))
    cost = np.cumsum([1.0, 2.0, 2.0, 3.0])
    exit_bound = oracle_exit_bound(f1, max_f1_loss=2.0, layer_latency_ms=[1.0, 2.0, 2.0, 3.0])
    options = oracle_option_bound(f1, np.repeat(cost[:, None], 50, axis=1), 100 * f1[-1].mean(), 2.0)
    for key in ("f1", "speedup_achieved", "speedup_upper_bound"):
        assert options[key] == exit_bound[key]
    assert (options["options"] == exit_bound["exit_layers"]).all()


def test_an_unreachable_budget_says_so():
    r = oracle_option_bound(np.zeros((2, 3)), np.ones((2, 3)), reference_f1=50.0, max_f1_loss=1.0)
    assert not r["reachable"] and r["speedup_upper_bound"] is None and r["best_f1"] == 0.0
