"""A dev set asked through the whole system: edge early exit, SSH offload, server answer.

What the user of ELMA cares about is the system's answer, not the edge model's or the
server's alone. This module asks every question through an ``EdgeQA`` (usually a
``LoopbackDeployment``'s), scores the answers with the official metric, and sets them beside
the full model alone on the same questions:

    results = ask_all(dep.edge, examples)       # or ask_held_out(...): E_T tuned on the other half
    summary = end_to_end_summary(examples, results, ds.raw, reference=full_model_answers(qa, examples))
    write_end_to_end_predictions(out_dir, "1.1", examples, results)

The predictions file is in the official format; its side file says where each answer came
from (``edge`` with the exit layer, ``server``, or ``edge-fallback``) and what it cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.atomic_files import write_json_atomic
from elma_utils.edge.client import SOURCES, EdgeQA, EdgeQAResult
from elma_utils.squad.metrics import per_question_scores

PREDICTIONS_NAME = "end-to-end-predictions-dev-v{version}.json"
SOURCES_NAME = "end-to-end-sources-dev-v{version}.json"
# issue 5's targets for the whole system on dev-v1.1 (defaults of end_to_end_summary)
MIN_EDGE_SHARE = 0.60
MAX_F1_LOSS = 0.5


def ask_all(edge_qa: EdgeQA, examples: Sequence[Any], progress: bool = True) -> list[EdgeQAResult]:
    """Every example's question through ``edge_qa``, one at a time, as a device asks them."""
    from tqdm.auto import tqdm

    return [
        edge_qa.answer(e.question, e.context)
        for e in tqdm(examples, desc="edge + server", unit="q", disable=not progress)
    ]


def ask_held_out(
    edge_qa: EdgeQA,
    examples: Sequence[Any],
    fold_thresholds: Sequence[float],
    fold_masks: Sequence[np.ndarray],
    progress: bool = True,
) -> list[EdgeQAResult]:
    """``ask_all`` with each fold's questions answered under the E_T tuned on the *other* fold
    (``fold_masks[i]``: the questions ``fold_thresholds[i]`` applies to, e.g. from
    ``squad2.held_out_folds``), so a calibrated system is scored on questions it was not
    calibrated on. The edge model's own policy is put back afterwards."""
    from elma_utils.early_exit.policies import EntropyPolicy

    masks = [np.asarray(m, dtype=bool) for m in fold_masks]
    if len(masks) != len(fold_thresholds) or any(m.shape != (len(examples),) for m in masks):
        raise ValueError("one threshold and one mask over all examples per fold")
    if not np.array_equal(np.sum(masks, axis=0), np.ones(len(examples), dtype=int)):
        raise ValueError("the folds must cover every example exactly once")
    model = edge_qa.edge
    own_policy = model.policy
    results: list[EdgeQAResult | None] = [None] * len(examples)
    try:
        for threshold, mask in zip(fold_thresholds, masks, strict=True):
            model.policy = EntropyPolicy(float(threshold))
            rows = np.flatnonzero(mask)
            for i, r in zip(rows, ask_all(edge_qa, [examples[i] for i in rows], progress), strict=True):
                results[i] = r
    finally:
        model.policy = own_policy
    return results  # type: ignore[return-value]


def full_model_answers(qa_model, examples: Sequence[Any], batch_size: int = 64) -> dict[str, str]:
    """The full (server) model alone on the same questions: ``QAModel.predict``, batched."""
    answers = qa_model.predict([(e.question, e.context) for e in examples], batch_size=batch_size)
    return {e.qas_id: ("" if a.no_answer else a.text) for e, a in zip(examples, answers, strict=True)}


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def end_to_end_summary(
    examples: Sequence[Any],
    results: Sequence[EdgeQAResult],
    dataset_raw: Mapping[str, Any],
    version: str = "1.1",
    reference: Mapping[str, str] | None = None,
    wire_bytes: int | None = None,
    *,
    min_edge_share: float = MIN_EDGE_SHARE,
    max_f1_loss: float = MAX_F1_LOSS,
) -> dict[str, Any]:
    """F1/EM of the system, where answers came from, what they cost, and (with ``reference``,
    the full model's answers) how far the system is from the full model alone and whether
    the targets (share answered on the edge, F1 loss) are met.

    ``wire_bytes``: bytes the edge's SSH connection carried while these questions were asked
    (both ways, SSH framing included), reported per offloaded question."""
    if len(examples) != len(results):
        raise ValueError(f"{len(examples)} examples but {len(results)} results")
    ids = [e.qas_id for e in examples]
    scores = per_question_scores(dataset_raw, {q: r.text for q, r in zip(ids, results, strict=True)}, version)
    f1 = np.array([scores[q][1] for q in ids])
    em = np.array([scores[q][0] for q in ids])
    source = np.array([r.source for r in results])
    n_server = int(np.sum(source == "server"))
    out: dict[str, Any] = {
        "questions": len(examples),
        "f1": float(100 * f1.mean()),
        "exact": float(100 * em.mean()),
        "share": {s: float(np.mean(source == s)) for s in SOURCES},
        "f1_by_source": {
            s: float(100 * f1[source == s].mean()) if (source == s).any() else None for s in SOURCES
        },
        "settled_on_edge_at_layer": {  # questions answered on the device, by exit layer
            int(k): int(v)
            for k, v in zip(
                *np.unique([r.exit_layer for r in results if r.source == "edge"], return_counts=True),
                strict=True,
            )
        },
        "edge_ms": {
            "p50": _pct([r.edge_ms for r in results], 50),
            "p95": _pct([r.edge_ms for r in results], 95),
        },
        "offload_ms": {
            "p50": _pct([r.offload_ms for r in results if r.source == "server"], 50),
            "p95": _pct([r.offload_ms for r in results if r.source == "server"], 95),
        },
        "server_ms_p50": _pct([r.server_ms for r in results if r.source == "server"], 50),
        "question_ms": {
            "mean": float(np.mean([r.total_ms for r in results])),
            "p50": _pct([r.total_ms for r in results], 50),
            "p95": _pct([r.total_ms for r in results], 95),
        },
    }
    if wire_bytes is not None:
        out["wire_bytes_per_offload"] = wire_bytes / n_server if n_server else None
    if reference is not None:
        ref = per_question_scores(dataset_raw, {q: reference[q] for q in ids}, version)
        ref_f1 = float(100 * np.mean([ref[q][1] for q in ids]))
        out["full_model_f1"] = ref_f1
        out["full_model_exact"] = float(100 * np.mean([ref[q][0] for q in ids]))
        out["f1_minus_full_model"] = out["f1"] - ref_f1
        out["targets"] = {"min_edge_share": min_edge_share, "max_f1_loss": max_f1_loss}
        out["targets_met"] = {
            "edge_share": out["share"]["edge"] >= min_edge_share,
            "f1_within": ref_f1 - out["f1"] <= max_f1_loss,
        }
    return out


def write_end_to_end_predictions(
    out_dir: str | Path, version: str, examples: Sequence[Any], results: Sequence[EdgeQAResult]
) -> dict[str, Path]:
    """Official-format predictions and, per question, where the answer came from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = {e.qas_id: r.text for e, r in zip(examples, results, strict=True)}
    sources = {
        e.qas_id: {
            "source": r.source,
            "edge_layers": r.exit_layer,  # the layer the edge exited at, or its last one when offloaded
            "edge_ms": round(r.edge_ms, 3),
            "offload_ms": round(r.offload_ms, 3),
            **({"error": r.error} if r.error else {}),
        }
        for e, r in zip(examples, results, strict=True)
    }
    paths = {
        "predictions": out / PREDICTIONS_NAME.format(version=version),
        "sources": out / SOURCES_NAME.format(version=version),
    }
    write_json_atomic(paths["predictions"], predictions)
    write_json_atomic(paths["sources"], sources)
    return paths
