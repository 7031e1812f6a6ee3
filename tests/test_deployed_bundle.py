"""Which bundle notebook 05 deploys: the adaptive one notebook 04 recorded, else the export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from elma_utils import reporting
from elma_utils.early_exit.skim import SkimHead
from elma_utils.export.deployed_bundle import deployed_bundle, depth_only_bundle, edge_layer_costs, main


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMA_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    return tmp_path / "reports", tmp_path / "artifacts" / "tiny-smoke"


def _record(reports, adaptive):
    reporting.save_metrics(
        "04_edge_export_and_benchmark", {"profile": "smoke", "adaptive": adaptive}, reports
    )


def test_without_notebook_04_the_error_says_to_run_it(places):
    reports, model = places
    with pytest.raises(FileNotFoundError, match="04_edge_export_and_benchmark.ipynb first"):
        deployed_bundle(model, "int8", reports)


def test_without_adaptive_width_the_depth_only_export_is_deployed(places, tmp_path):
    reports, model = places
    _record(reports, None)
    assert deployed_bundle(model, "int8", reports) == tmp_path / "artifacts" / "tiny-smoke-edge" / "int8"
    assert depth_only_bundle(model, "float16") == tmp_path / "artifacts" / "tiny-smoke-edge" / "float16"


def test_the_recorded_adaptive_bundle_is_deployed_for_int8_only(places, tmp_path):
    reports, model = places
    adaptive = tmp_path / "artifacts" / "tiny-smoke-exits-distill" / "adaptive" / "edge" / "int8"
    adaptive.mkdir(parents=True)
    (adaptive / "manifest.json").write_text(json.dumps({"skim": {"layer": 1}}))
    _record(reports, {"bundle": str(adaptive), "skim_layer": 1})
    assert deployed_bundle(model, "int8", reports) == adaptive
    assert deployed_bundle(model, "float32", reports) == depth_only_bundle(model, "float32")


def test_a_recorded_bundle_that_is_gone_is_one_clear_error(places, tmp_path):
    reports, model = places
    _record(reports, {"bundle": str(tmp_path / "gone" / "int8"), "skim_layer": 1})
    with pytest.raises(FileNotFoundError, match="adaptive bundle notebook 04 recorded is missing: run"):
        deployed_bundle(model, "int8", reports)


def _bundle(path, skim_layer=None):
    path.mkdir(parents=True)
    manifest = {}
    if skim_layer is not None:
        SkimHead(w=np.zeros(4), b=0.0, layer=skim_layer, tau=0.6).save(path / "skim.npz")
        manifest["skim"] = {"file": "skim.npz", "layer": skim_layer, "tau": 0.6}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_a_depth_only_bundle_prices_every_question_at_full_width(tmp_path):
    cost = edge_layer_costs(_bundle(tmp_path / "b"), {"kept_share": np.array([0.5, 0.2])}, [2.0, 3.0, 4.0])
    assert cost.tolist() == [2.0, 3.0, 4.0]


def test_a_skimming_bundle_prices_the_layers_after_its_head_at_the_kept_share(tmp_path):
    """Layer 1 at full width for both questions, layers 2-3 at 50 % and 20 % of their time."""
    cost = edge_layer_costs(
        _bundle(tmp_path / "b", skim_layer=1), {"kept_share": np.array([0.5, 0.2])}, [2.0, 3.0, 4.0]
    )
    assert cost.shape == (3, 2)
    np.testing.assert_allclose(cost, [[2.0, 2.0], [1.5, 0.6], [2.0, 0.8]])


def test_the_command_prints_the_bundle_a_profile_deploys(places, tmp_path, monkeypatch, capsys):
    reports, _ = places
    monkeypatch.setenv("ELMA_REPORTS_DIR", str(reports))
    assert main(["--profile", "smoke"]) == 2  # notebook 04 has not run
    assert "04_edge_export_and_benchmark.ipynb first" in capsys.readouterr().err
    adaptive = _bundle(
        tmp_path / "artifacts" / "tiny-bert-smoke-exits-distill" / "adaptive" / "edge" / "int8", 1
    )
    _record(reports, {"bundle": str(adaptive), "skim_layer": 1})
    assert main(["--profile", "smoke"]) == 0
    assert capsys.readouterr().out.strip() == str(adaptive)
    assert main(["--profile", "smoke", "--precision", "float16"]) == 2  # the depth-only export is not there
    assert "tiny-bert-smoke-edge/float16 has no manifest.json" in capsys.readouterr().err
    assert main(["--profile", "nope"]) == 2 and "unknown profile 'nope'" in capsys.readouterr().err
