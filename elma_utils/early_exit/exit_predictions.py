"""Official-format predictions of the calibrated early exit, with each question's exit layer.

The calibration (``experiment.cross_fitted_exit`` for v1.1, ``squad2.cross_fitted_squad2_exit``
for v2.0) decides, per question, the layer where the edge model stops. This module turns that
decision and the per-layer answer spans of ``layerwise_question_stats`` into what a SQuAD
scorer reads — ``{qas_id: answer text}`` ("" = no answer) — plus a side file that says, for
every question, the exit layer, whether the edge settled it, and the E_T that applied:

    preds, layers = exit_predictions(examples, stats, cf["exit_layers"], cf["threshold_per_question"])
    write_exit_predictions(out_dir, "1.1", preds, layers)

Scored per predicted question, the written file gives the calibration's own F1 (tested; over a
whole dev set that is the official score), so the committed predictions are the numbers in
the report, not a re-run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.atomic_files import write_json_atomic
from elma_utils.early_exit.policies import NO_SPAN

PREDICTIONS_NAME = "early-exit-predictions-dev-v{version}.json"
LAYERS_NAME = "early-exit-layers-dev-v{version}.json"


def exit_predictions(
    examples: Sequence[Any],
    stats: dict[str, np.ndarray],
    exit_layers: np.ndarray,
    thresholds: np.ndarray | None = None,
    no_answer: np.ndarray | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(predictions, per-question exit details) for ``examples`` at their ``exit_layers``.

    ``exit_layers`` [Q] is 1-based; K + 1 means no layer settled the question (the edge hands
    it to the server; here its last layer's answer stands in, as in the calibration's F1).
    ``no_answer`` [Q] (SQuAD 2.0): the exit layer's no-answer call, as the calibration made it.
    """
    span = np.asarray(stats["span"])
    k_layers, n = span.shape[0], len(examples)
    layers = np.asarray(exit_layers, dtype=int)
    if layers.shape != (n,) or span.shape[1] != n:
        raise ValueError(f"{n} examples, but exit layers {layers.shape} and spans {span.shape[:2]}")
    if layers.min(initial=1) < 1 or layers.max(initial=1) > k_layers + 1:
        raise ValueError(f"exit layers must be within 1..{k_layers + 1} (K + 1 = not settled)")
    used = np.minimum(layers, k_layers)
    entropy = np.asarray(stats["entropy"])
    predictions: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(examples):
        start, end = (int(x) for x in span[used[i] - 1, i])
        silent = bool(no_answer[i]) if no_answer is not None else False
        text = "" if silent or (start, end) == NO_SPAN else e.context[start:end]
        predictions[e.qas_id] = text
        details[e.qas_id] = {
            "exit_layer": int(used[i]),
            "settled_on_edge": bool(layers[i] <= k_layers),
            "entropy": round(float(entropy[used[i] - 1, i]), 4),
            **({"E_T": round(float(thresholds[i]), 4)} if thresholds is not None else {}),
            **({"no_answer": silent} if no_answer is not None else {}),
        }
    return predictions, details


def squad2_no_answer(
    stats: dict[str, np.ndarray], exit_layers: np.ndarray, settings: Sequence[dict], setting_index: np.ndarray
) -> np.ndarray:
    """Per question: does its exit layer say "no answer" under the null thresholds that were
    tuned on the other half of the articles (``cross_fitted_squad2_exit``'s ``settings``)?"""
    diff = np.asarray(stats["null_diff"])
    used = np.minimum(np.asarray(exit_layers, dtype=int), diff.shape[0])
    t = np.array(
        [settings[int(s)]["null_thresholds"][u - 1] for s, u in zip(setting_index, used, strict=True)]
    )
    return diff[used - 1, np.arange(len(used))] > t


def write_exit_predictions(
    out_dir: str | Path, version: str, predictions: dict[str, str], details: dict[str, dict]
) -> dict[str, Path]:
    """Write the official-format predictions and the per-question exit details; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": out / PREDICTIONS_NAME.format(version=version),
        "exit_layers": out / LAYERS_NAME.format(version=version),
    }
    write_json_atomic(paths["predictions"], predictions)
    write_json_atomic(paths["exit_layers"], details)
    return paths


def calibrated_dev_predictions(
    out_dir: str | Path,
    dataset_raw: dict[str, Any],
    version: str,
    examples: Sequence[Any],
    stats: dict[str, np.ndarray],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """Write the predictions of a cross-fitted calibration (notebook 03) and score the file.

    ``calibration``: ``cross_fitted_exit``'s result for v1.1, ``cross_fitted_squad2_exit``'s
    for v2.0. Returns the files and the official EM/F1 of what was written, with the average
    exit layer and the share of questions no edge layer settled."""
    from elma_utils.squad.metrics import per_question_scores

    layers = np.asarray(calibration["exit_layers"])
    if "settings" in calibration:  # SQuAD 2.0: per-fold E_T and null thresholds
        idx = np.asarray(calibration["setting_index"])
        thresholds = np.array([calibration["settings"][int(i)]["E_T"] for i in idx])
        no_answer = squad2_no_answer(stats, layers, calibration["settings"], idx)
    else:
        thresholds, no_answer = np.asarray(calibration["threshold_per_question"]), None
    predictions, details = exit_predictions(examples, stats, layers, thresholds, no_answer)
    paths = write_exit_predictions(out_dir, version, predictions, details)
    written = json.loads(paths["predictions"].read_text())
    scores = per_question_scores(dataset_raw, written, version)
    return {
        "files": {k: str(v) for k, v in paths.items()},
        "questions": len(written),
        "exact": float(100 * np.mean([scores[q][0] for q in written])),
        "f1": float(100 * np.mean([scores[q][1] for q in written])),
        "avg_exit_layer": float(np.mean([d["exit_layer"] for d in details.values()])),
        "share_not_settled": float(np.mean([not d["settled_on_edge"] for d in details.values()])),
    }
