"""What each notebook recorded: keys present, values in plausible ranges and consistent with each
other, and prediction files scoring what the metrics say (the recommenders way: notebook tests that
fail on a wrong number, not only on an exception).

Checked for the committed ``cpu`` results (reports/) and, when a smoke run left them, for
reports/profiles/smoke/ and reports/profiles/smoke-albert/ (nbval in scripts/test.sh writes
them; not committed). Rescoring
predictions needs the SQuAD dev files: without them (a clone without ../shared) those tests skip
and say so.
"""

from __future__ import annotations

import json
import math

import pytest

from elma_utils import config, reporting
from elma_utils.report.headline import lookup

REPORT_DIRS = {
    "cpu": config.PROJECT_ROOT / "reports",
    "smoke": config.PROJECT_ROOT / "reports" / "profiles" / "smoke",
    "smoke-albert": config.PROJECT_ROOT / "reports" / "profiles" / "smoke-albert",
}


def _metrics(profile: str, notebook: str) -> dict:
    root = REPORT_DIRS[profile]
    path = root / "metrics" / f"{notebook}.json"
    if not path.is_file():
        how = "run the cpu pipeline" if profile == "cpu" else f"run `elma pipeline --profile {profile}`"
        pytest.skip(f"{path.relative_to(config.PROJECT_ROOT)} is not there: {how} first")
    return reporting.load_metrics(path)


def _get(data: dict, dotted: str):
    value = lookup({"m": data}, "m", dotted)  # keys with dots of their own ("dev-v1.1") work
    assert value is not None, f"key {dotted!r} missing"
    return value


def _between(value, low: float, high: float, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{what} = {value!r} is not a number"
    assert low <= value <= high, f"{what} = {value} is outside [{low}, {high}]"


PROFILES = pytest.mark.parametrize("profile", sorted(REPORT_DIRS))


@PROFILES
def test_01_squad_data(profile: str) -> None:
    m = _metrics(profile, "01_squad_data")
    for name in ("dev-v1.1", "dev-v2.0", "train-v1.1"):
        d = _get(m, f"datasets.{name}")
        assert d["questions"] > 0 and d["bad_examples"] == 0
        assert 0 <= d["unanswerable"] <= d["questions"]
    assert _get(m, "datasets.dev-v1.1.unanswerable") == 0
    for tok in ("wordpiece", "sentencepiece"):
        r = _get(m, f"span_recovery.{tok}")
        assert r["recovered"] <= r["answerable"]
        _between(r["rate"], 0.9, 1.0, f"{tok} span recovery")
        assert math.isclose(r["rate"], r["recovered"] / r["answerable"])
    if profile == "cpu":  # the whole official files
        assert _get(m, "datasets.dev-v1.1.questions") == 10570
        assert _get(m, "datasets.dev-v2.0.questions") == 11873


@PROFILES
def test_02_full_model(profile: str) -> None:
    m = _metrics(profile, "02_finetune_full_model")
    for dev, em_key in (("dev_v1_1", "exact_match"), ("dev_v2_0", "exact")):
        s = _get(m, f"{dev}.scores")
        _between(s["f1"], 0, 100, f"{dev} F1")
        assert s[em_key] <= s["f1"] + 1e-9, "EM above F1"
        assert _get(m, f"{dev}.questions") > 0
    if profile == "cpu":  # a trained MiniLM, not a random one
        _between(_get(m, "dev_v1_1.scores.f1"), 60, 100, "dev-v1.1 F1")
        assert _get(m, "dev_v1_1.questions") == 10570


@PROFILES
def test_03_early_exit(profile: str) -> None:
    m = _metrics(profile, "03_early_exit")
    layers = len(_get(m, "dev_v1_1.per_layer_f1"))
    for dev in ("dev_v1_1", "dev_v2_0"):
        d = _get(m, dev)
        _between(d["avg_exit_layer"], 1, layers, f"{dev} average exit layer")
        _between(d["share_not_settled"], 0, 1, f"{dev} share not settled")
        _between(d["f1"], 0, 100, f"{dev} early-exit F1")
        assert math.isclose(d["f1_loss"], d.get("reference_f1", d["full_depth_f1"]) - d["f1"], abs_tol=1e-6)
        assert sum(d["exit_layer_histogram"]) > 0
    r = _get(m, "runtime_speedup")
    assert math.isclose(
        r["speedup"], r["full_depth"]["ms_per_question"] / r["early_exit"]["ms_per_question"], rel_tol=1e-3
    )
    assert r["full_depth"]["avg_exit_layer"] == layers
    assert m["best_mode"] in m["modes"]


@PROFILES
def test_04_edge_export(profile: str) -> None:
    m = _metrics(profile, "04_edge_export_and_benchmark")
    sizes = {p: _get(m, f"edge.{p}.tflite_bytes") for p in ("float32", "float16", "int8")}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    for p in ("float32", "int8"):
        w = _get(m, f"whole_dev_v1_1.{p}")
        _between(w["f1"], 0, 100, f"{p} F1")
        _between(w["share_solved_on_edge"], 0, 1, f"{p} share on the edge")
        assert w["question_ms_p50"] > 0
    loss = _get(m, "whole_dev_v1_1.float32.f1") - _get(m, "whole_dev_v1_1.int8.f1")
    assert math.isclose(_get(m, "int8_f1_loss_v1_1"), loss, abs_tol=1e-6)
    _between(_get(m, "edge.float32.agreement_with_keras"), 0.99, 1.0, "float32 answers equal to Keras'")


@PROFILES
def test_04_adaptive_bundle(profile: str) -> None:
    """The adaptive (skim + early exit) bundle notebook 04 builds for notebook 05: a measured
    configuration per dev set, consistent with the benchmark json it wrote. The committed cpu
    record is checked once it has one (records made before adaptive width was wired in lack it)."""
    m = _metrics(profile, "04_edge_export_and_benchmark")
    if profile == "cpu" and "adaptive" not in m:
        return
    a = _get(m, "adaptive")
    assert a["skim_layer"] in config.get_profile(profile).skim_layers
    bench = reporting.load_metrics(REPORT_DIRS[profile] / a["metrics"])
    assert bench["bundle"] == a["bundle"] and bench["adaptive_run"]["bundle_setting"] == a["setting"]
    for name in ("dev-v1.1", "dev-v2.0"):
        dev = _get(a, f"dev_sets.{name}")
        assert dev["both"]["speedup"] == bench["dev_sets"][name]["speedup"]
        for c in ("both", "depth_only", "width_only"):
            r = dev[c]
            _between(r["speedup"], 0.2, 20, f"{name} {c} speed-up")
            _between(r["kept_token_share"], 0, 1, f"{name} {c} kept share")
            assert math.isclose(r["f1_loss"], r["full_f1"] - r["f1"], abs_tol=1e-6)
        layers = len(_get(_metrics(profile, "03_early_exit"), "layer_latency.layer_ms"))
        # depth only keeps every token; width only takes every question through every layer
        assert dev["depth_only"]["kept_token_share"] == 1.0 and dev["width_only"]["avg_layers"] == layers


@PROFILES
def test_05_encrypted_offload(profile: str) -> None:
    m = _metrics(profile, "05_encrypted_offload")
    e = _get(m, "end_to_end")
    assert math.isclose(sum(e["share"].values()), 1.0, abs_tol=1e-9)
    on_edge = sum(e["settled_on_edge_at_layer"].values())
    assert on_edge == round(e["share"]["edge"] * e["questions"])
    assert math.isclose(e["f1_minus_full_model"], e["f1"] - e["full_model_f1"], abs_tol=1e-6)
    for where in ("endpoint", "sshd"):
        _between(_get(m, f"ssh_overhead_ms_p50.{where}"), 0, 50, f"SSH overhead ({where}), ms")
    for clients in _get(m, "throughput").values():
        assert clients["errors"] == clients["mismatches"] == 0
        assert clients["answered"] == clients["requests"]


@PROFILES
def test_06_speech(profile: str) -> None:
    m = _metrics(profile, "06_speech_to_answer")
    for name, run in _get(m, "runs").items():
        _between(run["wer"], 0, 1.5, f"{name} WER")
        _between(run["rtf"], 0, 10, f"{name} real-time factor")
        assert math.isclose(run["f1_drop"], run["typed_f1"] - run["spoken_f1"], abs_tol=0.02), name
        _between(run["same_answer_share"], 0, 1, f"{name} same answer")


@PROFILES
def test_07_growth(profile: str) -> None:
    m = _metrics(profile, "07_dataset_growth_and_sync")
    if "rounds" in m:  # issue 19's layout: one entry per round, round 0 first, per target
        rounds, summary = _get(m, "rounds"), _get(m, "growth_rounds.summary")
        assert rounds and {r["target"] for r in rounds} == set(summary)
        for target, s in summary.items():
            mine = [r for r in rounds if r["target"] == target]
            assert [r["round"] for r in mine] == list(range(len(mine))) and s["rounds"] == len(mine) - 1
            assert sum(r["asked"] for r in mine) == _get(m, "growth_rounds.domain.asked"), target
            assert 0 <= s["published"] <= s["rounds"] and len(s["decisions"]) == s["rounds"]
            for r in mine:
                assert 0 <= r["offloaded"] <= r["asked"] and r["stored_questions"] >= 0
                for group in ("deployment", "other"):
                    _between(
                        r[group]["share_on_device"], 0, 100, f"{target} round {r['round']} {group} share"
                    )
                    _between(r[group]["system_f1"], 0, 100, f"{target} round {r['round']} {group} F1")
        return
    g = _get(m, "grown")
    assert 0 <= g["offloaded"] <= g["asked"] and g["stored_questions"] <= g["offloaded"]
    assert isinstance(_get(m, "retrain.published"), bool)
    for side in ("candidate", "current"):
        _between(_get(m, f"retrain.{side}.f1"), 0, 100, f"{side} F1")


# ---------------------------------------------------------------- predictions score what the metrics say


def _dev(version: str):
    from elma_utils.squad.data import load_squad

    try:
        return load_squad(version, "dev", download=False).raw
    except FileNotFoundError as exc:
        pytest.skip(f"rescoring predictions needs SQuAD dev-v{version}.json ({exc})")


def _predictions(profile: str, name: str) -> dict:
    path = REPORT_DIRS[profile] / "predictions" / name
    if not path.is_file():
        pytest.skip(f"{path.relative_to(config.PROJECT_ROOT)} is not there")
    return json.loads(path.read_text(encoding="utf-8"))


def _only(dataset: dict, ids) -> dict:
    """The dataset with only the questions in ``ids`` (a smoke run scores a subset of dev)."""
    ids = set(ids)
    articles = []
    for article in dataset["data"]:
        paragraphs = []
        for p in article["paragraphs"]:
            qas = [qa for qa in p["qas"] if qa["id"] in ids]
            if qas:
                paragraphs.append({**p, "qas": qas})
        if paragraphs:
            articles.append({**article, "paragraphs": paragraphs})
    return {**dataset, "data": articles}


def _v1_f1(predictions: dict) -> float:
    from elma_utils.squad.metrics import squad_v1_scores

    dev = _dev("1.1")
    return squad_v1_scores(_only(dev, predictions), predictions)["f1"]


@PROFILES
def test_the_scores_file_is_the_metrics(profile: str) -> None:
    m = _metrics(profile, "02_finetune_full_model")
    scores = _predictions(profile, "scores-dev-v1.1.json")
    assert scores["scores"] == _get(m, "dev_v1_1.scores")


@PROFILES
def test_full_model_predictions_score_what_notebook_02_recorded(profile: str) -> None:
    m = _metrics(profile, "02_finetune_full_model")
    predictions = _predictions(profile, "predictions-dev-v1.1.json")
    assert len(predictions) == _get(m, "dev_v1_1.questions")
    assert _v1_f1(predictions) == pytest.approx(_get(m, "dev_v1_1.scores.f1"), abs=1e-6)


@PROFILES
def test_early_exit_predictions_score_what_notebook_03_recorded(profile: str) -> None:
    m = _metrics(profile, "03_early_exit")
    predictions = _predictions(profile, "early-exit-predictions-dev-v1.1.json")
    layers = _predictions(profile, "early-exit-layers-dev-v1.1.json")
    assert set(layers) == set(predictions)
    mean_layer = sum(v["exit_layer"] for v in layers.values()) / len(layers)
    assert mean_layer == pytest.approx(_get(m, "dev_v1_1.avg_exit_layer"), abs=1e-6)
    assert _v1_f1(predictions) == pytest.approx(_get(m, "dev_v1_1.f1"), abs=1e-6)


@PROFILES
def test_end_to_end_predictions_score_what_notebook_05_recorded(profile: str) -> None:
    e = _get(_metrics(profile, "05_encrypted_offload"), "end_to_end")
    predictions = _predictions(profile, "end-to-end-predictions-dev-v1.1.json")
    sources = _predictions(profile, "end-to-end-sources-dev-v1.1.json")
    assert set(sources) == set(predictions) and len(predictions) == e["questions"]
    for source, share in e["share"].items():
        counted = sum(1 for v in sources.values() if v["source"] == source)
        assert counted == round(share * len(sources)), source
    assert _v1_f1(predictions) == pytest.approx(e["f1"], abs=1e-6)
