"""``bench.exit_policy_screen``: the features a policy sees, and a case where only span agreement
tells which questions a layer already answers — the learned policy finds it, the entropy
threshold cannot, and every policy stays within the budget it was tuned for."""

from __future__ import annotations

import numpy as np
import pytest

from elma_utils.bench import exit_policy_screen as eps


def test_features_follow_the_exits_layer_by_layer():
    entropy = np.array([[0.9], [0.5], [0.7], [0.2]])
    span = np.array([[[1, 2]], [[3, 4]], [[3, 4]], [[3, 4]]])
    f = eps.layer_features(entropy, span)
    assert f.shape == (4, 1, len(eps.FEATURES))
    col = {name: f[:, 0, i].tolist() for i, name in enumerate(eps.FEATURES)}
    assert col["min_entropy_so_far"] == [0.9, 0.5, 0.5, 0.2]
    assert col["span_agrees"] == [0.0, 0.0, 1.0, 1.0] and col["agreement_streak"] == [0.0, 0.0, 1.0, 2.0]
    assert col["entropy_change"] == pytest.approx([0.0, -0.4, 0.2, -0.5])


def test_first_exit_is_the_first_confident_layer_else_the_last():
    confident = np.array([[False, True, False], [True, True, False]])
    assert eps.first_exit(confident).tolist() == [1, 0, 2]


def _stats(n: int = 800, seed: int = 0):
    """3 layers. Half the questions are answered at layer 1 already, and exactly those keep their
    span at layer 2 — but the entropy is noise, so only agreement tells them apart at layer 2."""
    rng = np.random.default_rng(seed)
    early = rng.random(n) < 0.5
    f1 = np.ones((3, n))
    f1[0] = 0.0
    f1[1, ~early] = 0.0
    span = np.zeros((3, n, 2), dtype=int)
    span[0, :, 0] = np.where(early, 7, rng.integers(100, 200, n))  # early: layer 2 repeats layer 1
    span[1, :, 0] = 7
    span[2, :, 0] = 7
    entropy = rng.random((3, n))
    titles = [f"article {i % 40}" for i in range(n)]
    return {"f1": f1, "entropy": entropy, "span": span}, titles, early


def test_only_the_learned_policy_finds_the_questions_agreement_gives_away():
    stats, titles, early = _stats()
    r = eps.screen(stats, titles, np.array([1.0, 1.0, 1.0]), 0.0, max_f1_loss=1.0)
    for name in ("entropy", "patience", "learned"):
        assert r[name]["f1_loss"] <= 1.0 + 2.0, name  # held out: near the budget it was tuned for
    assert r["learned"]["avg_layers"] == pytest.approx(2 + (~early).mean(), abs=0.02)  # exits early ones at 2
    assert r["learned"]["f1_loss"] <= 1.5  # it may spend the budget, held out near it
    assert r["entropy"]["speedup_cost_model"] < 1.05 < r["learned"]["speedup_cost_model"]
    assert r["oracle_within_budget"]["speedup_upper_bound"] >= r["learned"]["speedup_cost_model"] - 1e-4


def test_the_command_refuses_a_directory_that_is_no_exits_artifact(tmp_path, capsys):
    with pytest.raises(SystemExit):
        eps.main(["--exits", str(tmp_path)])
    assert "is no exits artifact" in capsys.readouterr().err
