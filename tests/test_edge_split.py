"""Choosing how many layers the edge keeps, from per-layer F1/entropy and measured costs."""

from __future__ import annotations

import numpy as np
import pytest

from elma_utils.early_exit.edge_split import choose_edge_depth, evaluate_edge_depth


def _stats(n: int = 600, seed: int = 1):
    """4 layers; layer 2 settles the easy 60 %, the rest only the server (or layer 4) gets right."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n) < 0.6
    f1 = np.zeros((4, n))
    f1[1:, easy] = 1.0
    f1[3, ~easy] = 1.0
    entropy = np.full((4, n), 0.9)
    entropy[1:, easy] = 0.1
    entropy[3] = 0.1
    titles = [f"t{i % 30}" for i in range(n)]
    return f1, entropy, np.ones(n), titles, easy


def test_the_fastest_depth_within_target_is_chosen():
    """With 10 ms layers and 18 ms offloads: k=1 offloads everyone (1+10+18 = 29 ms), k=4 runs
    the hard 40 % to the end (≈ 29 ms), k=2 lets the easy 60 % exit and offloads the rest."""
    f1, entropy, server, titles, easy = _stats()
    r = choose_edge_depth(f1, entropy, server, titles, np.full(4, 10.0), 1.0, offload_ms=18.0)
    assert r["within_target"] and r["best"]["k"] == 2
    best = r["best"]
    assert best["f1"] == pytest.approx(100.0)
    assert best["share_offloaded"] == pytest.approx((~easy).mean(), abs=1e-9)
    # expected: embeddings 1 + 2 layers (20 ms) for all + 18 ms offload for the hard ones
    assert best["expected_ms"] == pytest.approx(1 + 20 + 18 * (~easy).mean())
    assert best["speedup"] == pytest.approx(41 / best["expected_ms"])
    by_k = {row["k"]: row for row in r["rows"]}
    assert sorted(by_k) == [1, 2, 3, 4]
    assert by_k[1]["share_offloaded"] == 1.0 and by_k[1]["expected_ms"] == pytest.approx(29.0)
    assert by_k[4]["share_offloaded"] == 0.0


def test_keeping_every_layer_wins_when_offloads_are_dear():
    f1, entropy, server, titles, _ = _stats()
    r = choose_edge_depth(f1, entropy, server, titles, np.full(4, 10.0), 1.0, offload_ms=500.0)
    assert r["best"]["k"] == 4 and r["best"]["share_offloaded"] == 0.0


def test_single_depth_reports_held_out_numbers():
    f1, entropy, server, titles, easy = _stats()
    row = evaluate_edge_depth(3, f1, entropy, server, titles, np.full(4, 10.0), 0.0, 5.0, 40.0)
    assert row.k == 3 and len(row.thresholds) == 2
    assert row.avg_edge_layers == pytest.approx(2 * easy.mean() + 3 * (~easy).mean())


def test_per_question_costs_equal_to_the_shared_ones_give_the_same_result():
    f1, entropy, server, titles, _ = _stats()
    shared = evaluate_edge_depth(3, f1, entropy, server, titles, np.full(4, 10.0), 1.0, 18.0, 41.0)
    each = evaluate_edge_depth(
        3, f1, entropy, server, titles, np.full((4, len(titles)), 10.0), 1.0, 18.0, 41.0
    )
    assert each == shared


def test_per_question_costs_price_what_each_question_runs():
    """A skimmed edge: layers 3-4 cost half for every question, so k=4 (no offloads) gets cheaper
    than at full width by 10 ms for the hard 40 % (who run layers 3 and 4) and 5 ms for the rest."""
    f1, entropy, server, titles, easy = _stats()
    n = len(titles)
    cost = np.full((4, n), 10.0)
    cost[2:] = 5.0
    full = evaluate_edge_depth(4, f1, entropy, server, titles, np.full(4, 10.0), 1.0, 500.0, 41.0)
    skim = evaluate_edge_depth(4, f1, entropy, server, titles, cost, 1.0, 500.0, 41.0)
    assert skim.share_offloaded == full.share_offloaded == 0.0
    assert full.expected_ms == pytest.approx(1 + 20 * easy.mean() + 40 * (~easy).mean())
    assert skim.expected_ms == pytest.approx(1 + 20 * easy.mean() + 30 * (~easy).mean())
    assert skim.speedup == pytest.approx(41.0 / skim.expected_ms)
