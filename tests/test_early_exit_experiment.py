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


def test_the_exits_command_trains_resumably_and_refuses_what_it_cannot_start_from(
    minilm_tokenizer, tmp_path, monkeypatch, capsys
):
    """``python -m elma_utils.early_exit.experiment``: joint_distill from named exits on a tiny
    artifact, checkpointed (the checkpoint is gone once the artifact is written); errors first."""
    import json

    from qa_fixtures import save_tiny_exits

    from elma_utils.early_exit import experiment

    monkeypatch.setenv("ELMA_CACHE_DIR", str(tmp_path / "cache"))
    start = save_tiny_exits(tmp_path / "models", minilm_tokenizer, train_examples=24)
    full = tmp_path / "models" / "tiny"
    out = tmp_path / "models" / "tiny-exits-jd"
    with pytest.raises(SystemExit):
        experiment.main(["--full", str(tmp_path), "--out", str(out)])
    assert "is no full-model artifact" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # joint_distill starts from <full>-exits-distill, which is missing
        experiment.main(["--full", str(full), "--out", str(out)])
    assert "no exits to start from" in capsys.readouterr().err
    argv = ["--full", str(full), "--init-exits", str(start), "--out", str(out), "--epochs", "1",
            "--checkpoint-every", "2"]  # fmt: skip
    assert experiment.main(argv) == 0
    assert "joint_distill, 1 epochs" in capsys.readouterr().out
    ecfg = json.loads((out / "exits.json").read_text())
    assert ecfg["mode"] == "joint_distill" and ecfg["init_exits"] == str(start) and ecfg["epochs"] == 1.0
    assert ecfg["train"]["steps"] % 2 == 0 and ecfg["train"]["resumed_from_step"] == 0
    assert not (out / experiment.CHECKPOINT_DIR).exists()
    multi, *_ = experiment.load_exits(out)
    assert multi.num_exits == 3
