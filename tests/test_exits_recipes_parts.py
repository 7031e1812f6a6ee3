"""``bench.exits_recipes_parts``: the screen measured in two sessions gives what one run gives,
a part stands in for a missing artifact only while it is current, on the same settings and
against the same reference model, and the command says what is missing instead of writing a
partial metrics file."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from qa_fixtures import save_tiny_exits

from elma_utils import config
from elma_utils.bench import exits_recipes as er
from elma_utils.bench import exits_recipes_parts as parts
from elma_utils.early_exit.skim import SkimHead

ROOT = config.PROJECT_ROOT


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, minilm_tokenizer):
    """A reference exits artifact with a layer-1 skim head, and a second one with other weights."""
    root = tmp_path_factory.mktemp("recipe-parts")
    ref = save_tiny_exits(root / "models", minilm_tokenizer)
    other = save_tiny_exits(root / "other", minilm_tokenizer, seed=5)
    head = SkimHead(np.random.default_rng(1).normal(size=64).astype(np.float32) / 8, -1.0, layer=1, block=8)
    for d in (ref, other):
        head.save(d / "adaptive" / "L1" / "skim.npz")
    named = root / "second-exits"
    shutil.copytree(other, named)
    return ref, named


def _argv(ref, exits, out) -> list[str]:
    return ["--reference", str(ref), "--exits", str(exits), "--skim-layer", "1", "--taus", "0.3,0.6",
            "--questions", "16", "--out-dir", str(out)]  # fmt: skip


def _as_if_committed(path, commit: str) -> None:
    """The part as a clean work tree at ``commit`` would have written it."""
    part = json.loads(path.read_text())
    part["produced_by"] = {**part["produced_by"], "commit": commit, "dirty": False}
    path.write_text(json.dumps(part))


def test_two_sessions_give_what_one_run_gives(artifacts, tmp_path, capsys):
    ref, second = artifacts
    out = tmp_path / "reports"
    metrics = out / "metrics" / f"{er.METRICS}.json"
    # session 1: both artifacts here, so both are measured and merged
    assert parts.main(_argv(ref, second, out)) == 0
    one_run = json.loads(metrics.read_text())
    assert [r["name"] for r in one_run["recipes"]] == [ref.name, second.name]
    direct = er.compare(ref, [second], 1, [0.3, 0.6], 16)
    for got, want in zip(one_run["recipes"], direct["recipes"], strict=True):
        assert got["f1_per_exit"] == pytest.approx(want["f1_per_exit"], abs=1e-9)
        assert got["full_f1_minus_reference"] == pytest.approx(want["full_f1_minus_reference"], abs=1e-9)
        assert got["calibrated"]["both"]["f1"] == pytest.approx(want["calibrated"]["both"]["f1"], abs=1e-9)
        assert got["measured_by"]["command"].startswith("python -m elma_utils.bench.exits_recipes_parts")
    assert one_run["reference_full_f1"] == pytest.approx(direct["reference_full_f1"], abs=1e-9)
    assert one_run["questions"] == direct["questions"] and one_run["taus"] == [0.3, 0.6]
    assert one_run["recipes"][1]["full_f1_minus_reference"] != 0.0  # other weights, another score

    # session 2: the second artifact is gone; its part (clean, at HEAD) stands in for it
    head = _git("rev-parse", "HEAD")
    for d in (ref, second):
        _as_if_committed(parts.part_path(out, d), head)
    metrics.unlink()
    moved = tmp_path / "elsewhere"
    shutil.move(second, moved)
    try:
        assert parts.main(_argv(ref, second, out)) == 0
    finally:
        shutil.move(moved, second)
    said = capsys.readouterr().out
    assert f"{second.name}: kept its part ({head[:7]})" in said and f"{ref.name}: kept its part" in said
    two_sessions = json.loads(metrics.read_text())
    assert [r["measured_by"]["commit"] for r in two_sessions["recipes"]] == [head, head]
    strip = [{k: v for k, v in r.items() if k != "measured_by"} for r in two_sessions["recipes"]]
    assert strip == [{k: v for k, v in r.items() if k != "measured_by"} for r in one_run["recipes"]]

    # --remeasure measures what is here again (the reference), and keeps the rest
    assert parts.main([*_argv(ref, second, out), "--remeasure"]) == 0
    said = capsys.readouterr().out
    assert f"{ref.name}: measured now" in said and f"{second.name}: measured now" in said


def test_a_part_stands_in_only_when_current_alike_and_on_the_same_model(artifacts, tmp_path):
    ref, second = artifacts
    out = tmp_path / "reports"
    assert parts.main(_argv(ref, second, out)) == 0
    part = json.loads(parts.part_path(out, second).read_text())
    settings, f1 = parts.settings_of(part), part["reference_full_f1"]
    head = _git("rev-parse", "HEAD")
    package = ROOT / "elma_utils"

    clean = {**part, "produced_by": {**part["produced_by"], "commit": head, "dirty": False}}
    assert parts.why_unusable(clean, settings, f1, ROOT, package) is None
    assert "not the same model" in parts.why_unusable(clean, settings, f1 + 0.01, ROOT, package)
    assert "other settings" in parts.why_unusable(clean, {**settings, "taus": [0.3]}, f1, ROOT, package)
    dirty = {**clean, "produced_by": {**clean["produced_by"], "dirty": True}}
    assert "differed from" in parts.why_unusable(dirty, settings, f1, ROOT, package)
    first = _git("rev-list", "--max-parents=0", "HEAD").split()[0]
    old = {**clean, "produced_by": {**clean["produced_by"], "commit": first}}
    assert parts.why_unusable(old, settings, f1, ROOT, package).startswith("STALE: elma_utils/")


def test_what_is_missing_is_said_and_no_metrics_file_is_written(artifacts, tmp_path, capsys):
    ref, second = artifacts
    out = tmp_path / "reports"
    absent = tmp_path / "never-built-exits"
    assert parts.main(_argv(ref, absent, out)) == 1
    captured = capsys.readouterr()
    assert f"{absent.name}: MISSING: not here and its part is unusable (there is none)" in captured.out
    assert "no metrics file written" in captured.err
    assert (
        not (out / "metrics").exists() and parts.part_path(out, ref).is_file()
    )  # the reference's part stays

    headless = tmp_path / "headless-exits"
    shutil.copytree(second, headless, ignore=shutil.ignore_patterns("skim.npz"))
    assert parts.main(_argv(ref, headless, out)) == 1
    assert f"{headless.name}: MISSING: it has no skim head for layer 1" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        parts.main(_argv(tmp_path / "nothing", second, out))
    assert "must be here (no exits.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parts.main(["--reference", str(ref), "--exits", str(ref), "--skim-layer", "1", "--out-dir", str(out)])
    assert "two artifacts share a name" in capsys.readouterr().err
