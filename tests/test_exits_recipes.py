"""``bench.exits_recipes``: two exits artifacts (a reference and a copy) on the same dev
questions — the copy scores exactly what the reference does, the calibrated points and the
oracle bounds hold their promises, and the command refuses what it cannot measure."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from qa_fixtures import save_tiny_exits

from elma_utils.bench import exits_recipes as er
from elma_utils.early_exit.skim import SkimHead


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, minilm_tokenizer):
    root = tmp_path_factory.mktemp("recipes")
    ref = save_tiny_exits(root / "models", minilm_tokenizer)
    SkimHead(np.random.default_rng(1).normal(size=64).astype(np.float32) / 8, -1.0, layer=1, block=8).save(
        ref / "adaptive" / "L1" / "skim.npz"
    )
    copy = root / "copy-exits"
    shutil.copytree(ref, copy, ignore=shutil.ignore_patterns("*.npz", "latency.json"))
    shutil.copy(ref / "adaptive" / "L1" / "skim.npz", copy / "adaptive" / "L1" / "skim.npz")
    return ref, copy


def test_the_command_measures_every_recipe_against_the_reference(artifacts, tmp_path, capsys):
    ref, copy = artifacts
    out = tmp_path / "reports"
    argv = ["--reference", str(ref), "--exits", str(copy), "--skim-layer", "1", "--taus", "0.3,0.6",
            "--questions", "16", "--out-dir", str(out)]  # fmt: skip
    assert er.main(argv) == 0
    result = json.loads((out / "metrics" / f"{er.METRICS}.json").read_text())
    assert result["produced_by"]["command"].startswith("python -m elma_utils.bench.exits_recipes --reference")
    assert result["questions"] >= 16 and result["skim_layer"] == 1
    a, b = result["recipes"]
    assert (a["name"], b["name"]) == (ref.name, copy.name)  # the reference first
    assert a["full_f1_minus_reference"] == 0.0 and a["f1_per_exit"] == b["f1_per_exit"]  # same weights
    assert a["skim"] == b["skim"] and set(a["skim"]) == {"0.3", "0.6"}
    assert a["skim"]["0.6"]["kept_share"] <= a["skim"]["0.3"]["kept_share"] <= 1.0
    for mode, c in a["calibrated"].items():
        assert c["f1_loss_vs_reference"] == pytest.approx(c["f1_loss"], abs=1e-9), mode  # its own reference
        assert c["speedup_cost_model"] >= 1.0 - 1e-9
    assert a["calibrated"]["depth"]["kept_token_share"] == 1.0 and a["calibrated"]["width"][
        "avg_layers"
    ] == len(a["f1_per_exit"])
    o = a["oracle_vs_reference"]
    assert o["depth_width"]["speedup"] >= o["depth_only"]["speedup"] - 1e-9
    for key in ("depth_only", "depth_width"):
        bound = o[f"{key}_within_budget"]
        assert bound["reachable"] and bound["speedup_upper_bound"] >= o[key]["speedup"] - 1e-4
    assert f"{copy.name}: exits" in capsys.readouterr().out


def test_the_command_refuses_what_it_cannot_measure(artifacts, tmp_path, capsys):
    ref, _ = artifacts
    with pytest.raises(SystemExit):
        er.main(["--reference", str(ref), "--skim-layer", "2"])
    assert "has no skim head for layer 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        er.main(["--reference", str(tmp_path), "--skim-layer", "1"])
    assert "is no exits artifact" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        er.main(["--reference", str(ref), "--skim-layer", "1", "--taus", "a,b"])
    assert "--taus takes comma-separated numbers" in capsys.readouterr().err
