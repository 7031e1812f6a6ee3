"""Calibrated early-exit predictions: the written file scores, with the official metric, exactly
what the calibration reported, on real dev questions of both SQuAD versions.

The per-layer logits are made from the features' own labels so that the right layer is known:
"easy" questions are answered right and sharply from layer 1, "hard" ones wrongly and vaguely
until layer 3. The calibration must then let easy questions leave at layer 1, hard ones at 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from elma_utils.early_exit.calibration import layerwise_question_stats
from elma_utils.early_exit.exit_predictions import calibrated_dev_predictions, exit_predictions
from elma_utils.early_exit.experiment import cross_fitted_exit, dev_questions
from elma_utils.early_exit.squad2 import cross_fitted_squad2_exit
from elma_utils.squad.features import build_features
from elma_utils.squad.metrics import score_predictions

K = 3


def _layer_logits(feats, easy_example: np.ndarray, seed: int = 0):
    """[K, N, L] start/end logits: peaked on the label where a layer 'knows', else a vague
    guess two tokens to the right of it."""
    rng = np.random.default_rng(seed)
    n, length = feats.token_ids.shape
    start = rng.normal(0, 0.3, (K, n, length))
    end = rng.normal(0, 0.3, (K, n, length))
    rows = np.arange(n)
    for k in range(K):
        knows = easy_example[feats.example_index] | (k == K - 1)
        s, e = feats.start_positions.copy(), feats.end_positions.copy()
        wrong = ~knows
        # a wrong guess: a span inside the context, away from the label
        s[wrong] = np.minimum(feats.context_start[wrong] + 1, feats.lengths[wrong] - 2)
        e[wrong] = s[wrong]
        height = np.where(knows, 12.0, 1.5)
        start[k, rows, s] += height
        end[k, rows, e] += height
    return start, end


@pytest.fixture(scope="module")
def v11(minilm_tokenizer):
    ds, examples = dev_questions("1.1", 150)
    return ds, examples, build_features(examples, minilm_tokenizer, 384, 128, 64, progress=False)


def test_v11_predictions_score_the_calibrated_f1_and_name_each_exit_layer(v11, tmp_path):
    ds, examples, feats = v11
    easy = np.arange(len(examples)) % 2 == 0
    start, end = _layer_logits(feats, easy)
    stats = layerwise_question_stats(examples, feats, start, end, ds.raw, "1.1")
    cf = cross_fitted_exit(stats, [e.title for e in examples], max_f1_loss=1.0)
    r = calibrated_dev_predictions(tmp_path, ds.raw, "1.1", examples, stats, cf)
    assert r["f1"] == pytest.approx(cf["f1"]) and r["avg_exit_layer"] == pytest.approx(cf["avg_exit_layer"])
    assert r["share_not_settled"] == pytest.approx(cf["share_not_settled"])
    paths = {k: Path(v) for k, v in r["files"].items()}

    written = json.loads(paths["predictions"].read_text())
    assert set(written) == {e.qas_id for e in examples}
    scores = score_predictions(ds.raw, written, "1.1")  # official v1.1: the rest of the file scores 0
    assert scores["f1"] * len(ds.examples) / len(examples) == pytest.approx(cf["f1"], abs=1e-6)

    layers = json.loads(paths["exit_layers"].read_text())
    got = np.array([layers[e.qas_id]["exit_layer"] for e in examples])
    np.testing.assert_array_equal(got, np.minimum(cf["exit_layers"], K))
    assert (got[easy] == 1).mean() > 0.9 and (got[~easy] == K).all()
    settled = np.array([layers[e.qas_id]["settled_on_edge"] for e in examples])
    np.testing.assert_array_equal(settled, cf["exit_layers"] <= K)
    assert settled.mean() > 0.9
    assert {round(v["E_T"], 4) for v in layers.values()} <= {round(t, 4) for t in cf["thresholds"]}
    assert cf["avg_exit_layer"] == pytest.approx(got.mean())


def test_v20_predictions_carry_the_settled_no_answer_calls(minilm_tokenizer, tmp_path):
    ds, examples = dev_questions("2.0", 200)
    feats = build_features(examples, minilm_tokenizer, 384, 128, 64, progress=False)
    easy = np.arange(len(examples)) % 2 == 0
    start, end = _layer_logits(feats, easy, seed=1)
    stats = layerwise_question_stats(examples, feats, start, end, ds.raw, "2.0", null_threshold=None)
    impossible = np.array([e.is_impossible for e in examples])
    v2 = cross_fitted_squad2_exit(stats, [e.title for e in examples], impossible, max_f1_loss=1.0)
    r = calibrated_dev_predictions(tmp_path, ds.raw, "2.0", examples, stats, v2)
    assert r["f1"] == pytest.approx(v2["f1"]) and r["avg_exit_layer"] == pytest.approx(v2["avg_exit_layer"])
    paths = {k: Path(v) for k, v in r["files"].items()}

    written = json.loads(paths["predictions"].read_text())
    scores = score_predictions(ds.raw, written, "2.0")  # official v2: over the predicted questions
    assert scores["f1"] == pytest.approx(v2["f1"], abs=1e-6)
    silent = np.array([written[e.qas_id] == "" for e in examples])
    # the no-answer calls are the calibration's: tuned t_k of the fold, at the exit layer
    diff, used = stats["null_diff"], np.minimum(v2["exit_layers"], K)
    t = [v2["settings"][f]["null_thresholds"][u - 1] for f, u in zip(v2["setting_index"], used, strict=True)]
    np.testing.assert_array_equal(silent, diff[used - 1, np.arange(len(used))] > np.array(t))
    assert silent[impossible].mean() > 0.5 and silent[~impossible].mean() < 0.5  # labels at [CLS] → no answer
    layers = json.loads(paths["exit_layers"].read_text())
    assert all(layers[e.qas_id]["no_answer"] == bool(s) for e, s in zip(examples, silent, strict=True))


def test_exit_layers_outside_the_model_are_refused(v11):
    ds, examples, feats = v11
    stats = {"span": np.zeros((K, len(examples), 2), int), "entropy": np.zeros((K, len(examples)))}
    with pytest.raises(ValueError, match="within 1..4"):
        exit_predictions(examples, stats, np.full(len(examples), K + 2))
    with pytest.raises(ValueError, match="examples"):
        exit_predictions(examples[:-1], stats, np.ones(len(examples), int))
