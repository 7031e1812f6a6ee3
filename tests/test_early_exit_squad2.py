"""SQuAD 2.0 early exit: per-layer null thresholds and settled no-answer calls."""

from __future__ import annotations

import numpy as np
import pytest

from elma_utils.early_exit.policies import EntropyPolicy
from elma_utils.early_exit.squad2 import (
    best_null_thresholds,
    choose_squad2,
    cross_fitted_squad2_exit,
    f1_with_null_thresholds,
    sweep_squad2,
)


def test_f1_with_null_thresholds_applies_each_layers_threshold():
    span_f1 = np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.0]])
    null_diff = np.array([[-1.0, 2.0, 3.0], [-1.0, 2.0, 3.0]])
    impossible = np.array([False, False, True])
    got = f1_with_null_thresholds(span_f1, null_diff, impossible, np.array([1.0, 2.5]))
    # layer 1: q2 (2.0 > 1) and q3 say no-answer; layer 2 (t=2.5): only q3
    np.testing.assert_allclose(got, [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def test_best_null_threshold_maximises_f1_and_handles_ties():
    span_f1 = np.array([[1.0, 1.0, 0.0, 0.0, 0.8]])
    null_diff = np.array([[-3.0, -2.0, 1.0, 1.0, 0.5]])
    impossible = np.array([False, False, True, True, False])
    t = best_null_thresholds(span_f1, null_diff, impossible)
    assert t[0] == pytest.approx(0.75)  # answer q1, q2, q5 (≤ 0.5); q3, q4 (1.0) → no answer
    f1 = f1_with_null_thresholds(span_f1, null_diff, impossible, t)
    assert f1.mean() == pytest.approx((1 + 1 + 1 + 1 + 0.8) / 5)
    # all impossible: −inf (always no answer) is best
    assert best_null_thresholds(np.zeros((1, 3)), np.zeros((1, 3)), np.ones(3, bool))[0] == -1.0  # below all
    assert best_null_thresholds(np.ones((1, 3)), np.zeros((1, 3)), np.zeros(3, bool))[0] == 1.0  # above all
    # equal margins cannot be split: answering both (0.9 + 0) beats neither (0 + 1)? no → tie-aware
    t2 = best_null_thresholds(np.array([[0.9, 0.0]]), np.array([[1.0, 1.0]]), np.array([False, True]))
    assert t2[0] in (0.0, 2.0)
    assert f1_with_null_thresholds(
        np.array([[0.9, 0.0]]), np.array([[1.0, 1.0]]), np.array([False, True]), t2
    ).mean() == pytest.approx(0.5)


def _synthetic(n: int = 400, seed: int = 0):
    """Layer 1 knows the easy half (low entropy, clear margins); layer 2 knows everything."""
    rng = np.random.default_rng(seed)
    impossible = rng.random(n) < 0.5
    easy = rng.random(n) < 0.5
    sign = np.where(impossible, 1.0, -1.0)
    null_diff = np.stack([sign * np.where(easy, 5.0, rng.normal(0, 0.3, n)), sign * 5.0])
    span_f1 = np.stack([np.where(easy, 1.0, rng.random(n) * 0.5), np.ones(n)]) * (~impossible)
    entropy = np.stack([np.where(easy, 0.1, 0.8), np.full(n, 0.1)])
    titles = [f"a{i % 20}" for i in range(n)]
    return {"f1": span_f1, "null_diff": null_diff, "entropy": entropy}, titles, impossible, easy


def test_cross_fitted_squad2_exit_lets_the_easy_half_leave_at_layer_one():
    stats, titles, impossible, easy = _synthetic()
    r = cross_fitted_squad2_exit(stats, titles, impossible, max_f1_loss=1.0)
    assert r["full_depth_f1"] == pytest.approx(100.0)
    assert r["f1_loss"] <= 1.0 + 1e-9
    exits = r["exit_layers"]
    assert (exits[easy] == 1).mean() > 0.95 and (exits[~easy] == 1).mean() < 0.05
    assert r["avg_exit_layer"] == pytest.approx(1 + (~easy).mean(), abs=0.05)
    assert len(r["settings"]) == 2 and all(len(s["null_thresholds"]) == 2 for s in r["settings"])
    assert set(r["setting_index"].tolist()) == {0, 1}


def test_unsettled_no_answer_calls_do_not_exit():
    """Low entropy alone is not enough: a margin near the threshold keeps the question."""
    stats, _, impossible, easy = _synthetic()
    stats["entropy"][0] = 0.1  # layer 1 claims to be sure about everything
    t_k = best_null_thresholds(stats["f1"], stats["null_diff"], impossible)
    sweeps = sweep_squad2(stats, impossible, t_k, margins=(0.0, 2.0))
    margin, point = choose_squad2(sweeps, max_f1_loss=1.0)
    assert margin == 2.0  # margin 0 would let the unsettled hard half out at layer 1
    assert point.f1 >= sweeps[2.0].reference_f1 - 1.0
    layers = sweeps[2.0].exit_layers[point.index]
    assert (layers[easy] == 1).all() and (layers[~easy] == 2).mean() > 0.95


def test_choose_squad2_says_when_nothing_qualifies():
    stats, _, impossible, _ = _synthetic()
    t_k = best_null_thresholds(stats["f1"], stats["null_diff"], impossible)
    with pytest.raises(ValueError, match="SQuAD 2.0 F1 within -1"):
        choose_squad2(
            sweep_squad2(stats, impossible, t_k, margins=(0.0,)), max_f1_loss=-1
        )  # F1 above full depth


def test_per_layer_null_thresholds_in_the_policy_match_the_replay():
    """The runtime's decide() and the sweep's simulate_exits agree with per-layer thresholds."""
    from elma_utils.early_exit.policies import LayerOutput, null_threshold_at, simulate_exits

    policy = EntropyPolicy(0.5, no_answer_margin=1.0, null_threshold=[3.0, -2.0])
    assert policy.null_threshold == (3.0, -2.0) and null_threshold_at(policy.null_threshold, 2) == -2.0
    entropy = np.array([[0.1, 0.1, 0.9], [0.1, 0.1, 0.1]])
    null_diff = np.array([[2.5, 0.0, 0.0], [0.0, -1.5, 0.0]])  # q1 unsettled at layer 1 (|2.5−3| < 1)
    replay = simulate_exits(entropy, None, policy, null_diff)
    live = []
    for q in range(3):
        history = []
        for k in range(2):
            history.append(
                LayerOutput(k + 1, None, None, float(entropy[k, q]), (0, 1), null_diff=null_diff[k, q])
            )
            if policy.decide(history) is not None:
                live.append(k + 1)
                break
        else:
            live.append(3)
    assert replay.tolist() == live == [2, 1, 2]
    with pytest.raises(ValueError, match="layer 3"):
        null_threshold_at([1.0, 2.0], 3)
