"""Cross-fitted threshold choice and the evenly spread dev subset, on data worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from elma_utils.early_exit.experiment import cross_fitted_exit, dev_questions


def test_cross_fitted_threshold_exits_easy_questions_at_layer_one():
    n, k = 40, 3
    easy = np.arange(n) % 2 == 0
    f1 = np.ones((k, n))
    f1[0, ~easy] = 0.0  # layer 1 is wrong on the hard half
    f1[1, ~easy] = 0.0
    entropy = np.full((k, n), 0.9)
    entropy[0, easy] = 0.1  # ...and uncertain there
    entropy[2] = 0.05
    titles = [f"article{i // 10}" for i in range(n)]  # 4 articles, each half easy
    r = cross_fitted_exit({"f1": f1, "entropy": entropy}, titles, max_f1_loss=1.0)
    assert all(0.1 <= t < 0.9 for t in r["thresholds"])
    assert (r["exit_layers"][easy] == 1).all() and (r["exit_layers"][~easy] == 3).all()
    assert r["f1"] == 100.0 and r["f1_loss"] == 0.0
    assert r["avg_exit_layer"] == 2.0 and r["exit_layer_histogram"] == [20, 0, 20, 0]


def test_dev_questions_are_spread_over_every_article():
    ds, examples = dev_questions("1.1", 96)
    assert abs(len(examples) - 96) <= 48  # at least one per article, otherwise in proportion
    assert len({e.title for e in examples}) == len({e.title for e in ds.examples}) == 48
    _, everything = dev_questions("1.1", None)
    assert len(everything) == 10570


def test_cross_fitted_exit_against_a_stronger_reference_reports_the_miss():
    """An edge model 2 points below the server at every depth cannot meet a 1-point target:
    the best-F1 threshold is used and the result says the target was missed."""
    import numpy as np

    from elma_utils.early_exit.experiment import cross_fitted_exit

    rng = np.random.default_rng(0)
    n = 400
    f1 = np.stack([np.full(n, 0.5), np.full(n, 0.78)])
    entropy = np.stack([rng.random(n), np.full(n, 0.1)])
    titles = [f"t{i % 10}" for i in range(n)]
    r = cross_fitted_exit({"f1": f1, "entropy": entropy}, titles, 1.0, reference_f1=np.full(n, 0.80))
    assert r["within_target_on_tuning_halves"] is False
    assert r["reference_f1"] == 80.0 and r["f1"] == 78.0 and r["f1_loss"] == pytest.approx(2.0)
    ok = cross_fitted_exit({"f1": f1, "entropy": entropy}, titles, 1.0)
    assert ok["within_target_on_tuning_halves"] is True and ok["reference_f1"] == 78.0
