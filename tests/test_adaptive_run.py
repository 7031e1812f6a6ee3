"""The one-command adaptive measurement (``bench.adaptive_run``) on a tiny exits artifact the
test builds itself, the skim layer choice on hand-made calibrations, and the entropy predictor
fitted on the skimmed runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from elma_utils.bench import adaptive_run
from elma_utils.early_exit.predictor import EntropyExitPredictor
from elma_utils.early_exit.skim import SkimHead
from elma_utils.export.bundle import BundleError, check_predictor_skim

# ---------------------------------------------------------------- layer choice (hand-made)


def _cal(speedups: list[float], within: bool) -> dict:
    return {"both": {"settings": [{"tuning_speedup": s, "tuning_f1": 80.0} for s in speedups],
                     "within_target_on_tuning_halves": within}}  # fmt: skip


def test_the_skim_layer_is_the_fastest_within_budget_on_the_tuning_halves():
    cals = {
        1: {"1.1": _cal([3.0, 3.0], False), "2.0": _cal([3.0, 3.0], True)},  # fastest, over budget once
        2: {"1.1": _cal([2.0, 1.8], True), "2.0": _cal([1.6, 1.6], True)},  # mean 1.75
        3: {"1.1": _cal([1.7, 1.8], True), "2.0": _cal([1.8, 1.7], True)},  # mean 1.75: tie, later
    }
    layer, why = adaptive_run.choose_layer(cals)
    assert layer == 2 and why["chosen_layer"] == 2
    assert why["candidates"]["2"]["tuning_speedup"] == pytest.approx(1.75)
    assert not why["candidates"]["1"]["within_target_on_tuning_halves"]
    assert "within the F1 budget" in why["why"]
    layer, why = adaptive_run.choose_layer({1: cals[1]})  # nothing within: the fastest, said so
    assert layer == 1 and "no layer met the F1 budget" in why["why"]


def test_the_bundle_setting_keeps_more_and_averages_e_t():
    cal = {"both": {"settings": [{"tau": 0.3, "E_T": 0.2}, {"tau": 0.1, "E_T": 0.4}]},
           "width": {"settings": [{"tau": 0.5}, {"tau": 0.5}]}}  # fmt: skip
    assert adaptive_run.bundle_setting(cal, [0.1, 0.3]) == {"tau": 0.1, "E_T": pytest.approx(0.3)}
    cal["both"]["settings"] = [{"tau": None, "E_T": None}] * 2  # depth and width do not pay together
    assert adaptive_run.bundle_setting(cal, [0.1, 0.3]) == {"tau": 0.5, "E_T": None}


# ---------------------------------------------------------------- entropy predictor with skimming


def _layerwise(entropy, kept_share=None):
    out = {"entropy": np.asarray(entropy, dtype=float), "f1": np.ones_like(np.asarray(entropy, dtype=float))}
    if kept_share is not None:
        out["kept_share"] = np.asarray(kept_share, dtype=float)
    return out


def test_predictor_from_skimmed_stats_records_the_keep_rule_and_refuses_the_other_runtime():
    head = SkimHead(np.ones(4, np.float32), 0.0, layer=1, block=8, tau=0.2)
    h1 = np.linspace(0.0, 1.0, 40)
    entropy = np.stack([h1, h1 / 2, h1 / 4])
    exits = np.where(h1 < 0.5, 2, 4)  # 4 = no exit (K + 1)
    skimmed = _layerwise(entropy, kept_share=np.full(40, 0.4))
    pred = EntropyExitPredictor.from_layerwise(skimmed, exits, threshold=0.3, skim=head, bins=4)
    assert pred.skim == head.settings() and pred.threshold == 0.3 and pred.layer == 1
    assert pred.predict(0.1) == 2 and pred.predict(0.9) == 4
    again = EntropyExitPredictor.from_dict(json.loads(json.dumps(pred.to_dict())))
    assert again.skim == head.settings()
    half = EntropyExitPredictor.from_layerwise(skimmed, exits, skim=head, rows=np.arange(20), bins=4)
    assert half.counts.sum() == 20  # only the rows asked for
    with pytest.raises(ValueError, match="full-width"):
        EntropyExitPredictor.from_layerwise(_layerwise(entropy), exits, skim=head)
    with pytest.raises(ValueError, match="skimmed runtime"):
        EntropyExitPredictor.from_layerwise(skimmed, exits)
    plain = EntropyExitPredictor.from_layerwise(_layerwise(entropy), exits, bins=4)
    assert plain.skim is None and EntropyExitPredictor.from_dict(plain.to_dict()).skim is None
    # the bundle (write_bundle, EdgeModel.load) refuses a table of another runtime
    check_predictor_skim({"predictor": pred.to_dict()}, {"file": "skim.npz", **head.settings()})
    check_predictor_skim({"predictor": plain.to_dict()}, None)
    check_predictor_skim({}, head.settings())  # no table, nothing to check
    for table, skim in (
        (plain, head.settings()),
        (pred, None),
        (pred, head.with_settings(tau=0.3).settings()),
    ):
        with pytest.raises(BundleError, match="entropy predictor was fitted on a runtime with skim"):
            check_predictor_skim({"predictor": table.to_dict()}, skim)


# ---------------------------------------------------------------- the whole command, tiny model


@pytest.fixture(scope="module")
def tiny_exits(minilm_tokenizer, tmp_path_factory):
    """A 3-layer tiny BERT saved as a full-model artifact and an exits artifact (random weights)."""
    from qa_fixtures import save_tiny_exits

    return save_tiny_exits(tmp_path_factory.mktemp("adaptive-run"), minilm_tokenizer)


def test_adaptive_run_from_an_exits_artifact_to_the_benchmark_json(tiny_exits, tmp_path, monkeypatch, capsys):
    from elma_utils.bench import adaptive
    from elma_utils.edge.runtime import EdgeModel

    monkeypatch.setenv("ELMA_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--exits", str(tiny_exits), "--out-dir", str(tmp_path / "reports"), "--layers", "1,2",
            "--taus", "0.05,0.3", "--limit", "5", "--max-windows", "60", "--warmup", "1"]  # fmt: skip
    assert adaptive_run.main(argv) == 0
    printed = capsys.readouterr().out
    assert "expected ≈" in printed and "dev-v1.1: speed-up" in printed and "dev-v2.0: speed-up" in printed
    out = tmp_path / "reports" / "metrics" / "bench_adaptive.json"
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m elma_utils.bench.adaptive_run --exits")
    assert result["produced_by"]["command"] == result["command"] and "commit" in result["produced_by"]
    assert result["bench_command"].startswith("python -m elma_utils.bench.adaptive --bundle")
    run = result["adaptive_run"]
    layer = run["skim_layer"]["chosen_layer"]
    assert layer in (1, 2) and set(run["skim_layer"]["candidates"]) == {"1", "2"}
    assert set(run["calibration_held_out"]["1"]) == {"1.1", "2.0"}
    assert set(run["calibration_held_out"]["2"]["2.0"]) == {"depth", "width", "both"}
    assert run["bundle_setting"]["tau"] in (0.05, 0.3) and run["entropy_predictor"]["questions"] > 0
    for name in ("dev-v1.1", "dev-v2.0"):
        dev = result["dev_sets"][name]
        assert dev["questions"] == 5 and dev["skim"]["layer"] == layer
        assert dev["f1_loss"] == pytest.approx(dev["full_f1"] - dev["f1"])
        assert (tmp_path / "reports" / "predictions" / f"adaptive-predictions-{name}.json").is_file()
        assert (tmp_path / "reports" / "figures" / f"bench_adaptive_{name}.png").is_file()
    bundle = tiny_exits / "adaptive" / "edge" / "int8"
    edge = EdgeModel.load(bundle)
    assert edge.manifest["precision"] == "int8" and edge.dynamic_length and edge.skim.layer == layer
    assert edge.thresholds["predictor"]["skim"] == edge.skim.settings()
    assert edge.skim.tau == run["bundle_setting"]["tau"]
    settings = json.loads((tiny_exits / "adaptive" / f"bench-settings-L{layer}-5.json").read_text())
    assert set(settings) == {"1.1", "2.0"} and len(settings["1.1"]["both"]) == 2

    # what notebook 04 records, and the statistics notebook 05 tunes the deployed bundle's E_T on
    record = adaptive_run.deployment_record(result)
    assert record["bundle"] == str(bundle) and record["skim_layer"] == layer
    assert record["setting"] == run["bundle_setting"]
    v11 = record["dev_sets"]["dev-v1.1"]
    assert v11["both"]["speedup"] == result["dev_sets"]["dev-v1.1"]["speedup"]
    assert v11["width_only"]["f1_loss"] == result["dev_sets"]["dev-v1.1"]["width_only"]["f1_loss"]
    assert v11["depth_only"]["kept_token_share"] == 1.0
    from elma_utils.early_exit.experiment import layerwise_dev_stats
    from elma_utils.early_exit.skim_model import skim_layerwise_dev_stats
    from elma_utils.export.deployed_bundle import bundle_skim, edge_layerwise_stats

    assert bundle_skim(bundle).settings() == edge.skim.settings()
    skimmed = edge_layerwise_stats(tiny_exits, bundle, "1.1", 5)
    expected = skim_layerwise_dev_stats(tiny_exits, edge.skim, "1.1", [edge.skim.tau], 5)[edge.skim.tau]
    assert set(skimmed) == set(expected) and "kept_share" in skimmed
    for key in ("entropy", "f1", "kept_share"):
        np.testing.assert_array_equal(skimmed[key], expected[key])
    plain = layerwise_dev_stats(tiny_exits, "1.1", 5)
    from elma_utils.export.bundle import full_compute_copy

    depth_only = full_compute_copy(bundle, tmp_path / "depth-only")
    assert bundle_skim(depth_only) is None
    np.testing.assert_array_equal(edge_layerwise_stats(tiny_exits, depth_only, "1.1", 5)["f1"], plain["f1"])

    # resumable: a second run trains, exports and (with --skip-existing) benchmarks nothing again
    heads = {s: (tiny_exits / "adaptive" / f"L{s}" / "skim.npz").stat().st_mtime_ns for s in (1, 2)}
    manifest = (bundle / "manifest.json").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran again")

    monkeypatch.setattr(adaptive, "main", refuse)
    assert adaptive_run.main(argv + ["--skip-existing"]) == 0
    assert {s: (tiny_exits / "adaptive" / f"L{s}" / "skim.npz").stat().st_mtime_ns for s in (1, 2)} == heads
    assert (bundle / "manifest.json").stat().st_mtime_ns == manifest
    assert json.loads(out.read_text())["dev_sets"] == result["dev_sets"]

    # called from a notebook: the json names the notebook, not the kernel's command line
    again = adaptive_run.run(tiny_exits, tmp_path / "reports", layers=[1, 2], taus=[0.05, 0.3], limit=5,
                             skip_existing=True, max_windows=60, command="notebooks/04.ipynb (ELMA_PROFILE=x)")  # fmt: skip
    assert again["command"] == again["produced_by"]["command"] == "notebooks/04.ipynb (ELMA_PROFILE=x)"
    assert again["dev_sets"] == result["dev_sets"]
