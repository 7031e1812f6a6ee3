"""Choose a retrained edge's entropy threshold again before it is compared with the current edge.

Retraining the exit heads changes how sure they are. Kept at the old E_T, a retrained edge
exits at other layers than the one it replaces, and a comparison of the two measures the
threshold rather than the heads: in notebook 07 (cpu profile, 2026-12-05) the candidate
distilled on the grown data set exited at layer 4.41 instead of 5.14 with the old E_T and
lost 2.4 F1. So the candidate gets notebook 03's rule on calibration questions of its own:
the cheapest E_T whose F1 stays within ``max_f1_loss`` of the same heads at full depth.

The sweep's thresholds include the observed entropies themselves, so the chosen one can sit
exactly on a calibration question's entropy, where the exported runtime's float32 logits
(a different kernel, dynamic length) tip that question the other way. Every threshold up to
the next observed entropy exits the same questions, so E_T is moved to the middle of that gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

NOT_RECALIBRATED = "kept the current E_T"


def recalibrate_entropy_threshold(
    multi: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    dataset: dict,
    version: str,
    thresholds: dict[str, Any],
    *,
    seq_len: int,
    doc_stride: int = 128,
    max_query_len: int = 64,
    max_f1_loss: float = 1.0,
    skim: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(thresholds with the new E_T, what was measured)`` for a MultiExitQAModel.

    ``skim``: the bundle's ``SkimHead``; the exits are then measured as the bundle runs them,
    skimmed after the head's layer at its tau, so E_T fits what the device computes.

    Only the plain entropy policy on SQuAD v1.1-style questions is re-chosen; a patience
    policy or SQuAD 2.0 no-answer settings are returned unchanged with the reason in the
    report (their joint calibration is notebook 03's, not something to redo unattended).
    ``examples`` must be questions of ``dataset`` that neither the full model nor the exit
    heads trained on, or E_T comes out too low.
    """
    from elma_utils.early_exit.calibration import choose_threshold, layerwise_question_stats, sweep_thresholds
    from elma_utils.model.exit_training import predict_exit_logits
    from elma_utils.squad.features import build_features

    before = thresholds.get("E_T")
    if thresholds.get("policy") != "entropy":
        return thresholds, {"status": NOT_RECALIBRATED, "why": f"policy {thresholds.get('policy')!r}"}
    if thresholds.get("no_answer_margin") is not None or thresholds.get("null_threshold") not in (
        None,
        0,
        0.0,
    ):
        return thresholds, {"status": NOT_RECALIBRATED, "why": "SQuAD 2.0 no-answer settings"}
    if not examples:
        raise ValueError("no calibration questions: pass held-out SQuAD questions to re-choose E_T")
    feats = build_features(list(examples), tokenizer, seq_len, doc_stride, max_query_len, progress=False)
    if skim is None:
        start, end = predict_exit_logits(multi, feats, progress=False)
    else:
        from elma_utils.early_exit.skim_model import skim_exit_logits

        skimmed = skim_exit_logits(multi, feats, skim, progress=False)[skim.tau]
        start, end = skimmed["start"], skimmed["end"]
    stats = layerwise_question_stats(
        list(examples),
        feats,
        start.transpose(1, 0, 2),
        end.transpose(1, 0, 2),
        dataset,
        version,
        rule=thresholds.get("rule", "max"),
    )
    sweep = sweep_thresholds(stats["f1"], stats["entropy"])
    point = choose_threshold(sweep, max_f1_loss)
    e_t = middle_of_gap(float(point.value), stats["entropy"])
    report = {
        "status": "recalibrated",
        "questions": len(examples),
        "E_T_before": before,
        "E_T": e_t,
        "E_T_swept": float(point.value),
        "max_f1_loss": max_f1_loss,
        "f1": float(point.f1),
        "full_depth_f1": float(sweep.reference_f1),
        "avg_exit_layer": float(point.avg_exit_layer),
        "skimmed": None if skim is None else skim.settings(),
    }
    return {**thresholds, "E_T": e_t}, report


def middle_of_gap(threshold: float, entropies: np.ndarray, top: float = 1.0) -> float:
    """The middle between ``threshold`` and the next larger observed entropy (or ``top``,
    the normalised entropy's maximum): the same exits on these questions, with a margin."""
    h = np.asarray(entropies, dtype=np.float64)
    above = h[np.isfinite(h) & (h > threshold)]
    upper = float(above.min()) if above.size else max(top, threshold)
    return (threshold + upper) / 2
