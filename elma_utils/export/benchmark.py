"""Export an exits model at several precisions and compare the bundles (notebook 04).

For each precision: bundle size, agreement of the edge runtime's answers with the Keras
layer-by-layer runtime on the same questions and policy, F1, exit layers, and median
latency per stage (tokenisation excluded) at batch 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from elma_utils.early_exit.runtime import EarlyExitRunner
from elma_utils.edge.runtime import EdgeModel
from elma_utils.export.bundle import policy_from_thresholds, write_bundle
from elma_utils.squad.features import build_features
from elma_utils.squad.metrics import per_question_scores


def _f1(dataset_raw, examples, texts, version) -> float:
    scores = per_question_scores(
        dataset_raw, dict(zip([e.qas_id for e in examples], texts, strict=True)), version
    )
    return float(100 * np.mean([scores[e.qas_id][1] for e in examples]))


def compare_precisions(
    multi,
    tokenizer,
    config: dict,
    out_root: Path,
    precisions: list[str],
    thresholds: dict,
    model_version: str,
    examples: list,
    dataset_raw: dict,
    version: str = "1.1",
) -> dict:
    """Bundles under ``out_root/<precision>`` and their numbers on ``examples``."""
    seq_len = config["max_seq_len"]
    feats = [
        build_features([e], tokenizer, seq_len, config["doc_stride"], config["max_query_len"], progress=False)
        for e in examples
    ]
    policy = policy_from_thresholds({"policy": "entropy", **thresholds})
    keras_runner = EarlyExitRunner(multi, policy)
    reference = [keras_runner.run([e], f, length=seq_len)[0] for e, f in zip(examples, feats, strict=True)]
    result: dict = {
        "questions": len(examples),
        "keras": {
            "f1": _f1(dataset_raw, examples, [a.text for a in reference], version),
            "avg_exit_layer": float(np.mean([a.exit_layer for a in reference])),
        },
    }
    for precision in precisions:
        bundle = write_bundle(
            multi,
            tokenizer,
            Path(out_root) / precision,
            seq_len=seq_len,
            precision=precision,
            thresholds=thresholds,
            model_version=model_version,
            doc_stride=config["doc_stride"],
            max_query_len=config["max_query_len"],
            overwrite=True,
        )
        edge = EdgeModel.load(bundle)
        answers = [edge.answer_features([e], f)[0] for e, f in zip(examples, feats, strict=True)]
        same = [
            (a.text, a.exit_layer) == (r.text, r.exit_layer) for a, r in zip(answers, reference, strict=True)
        ]
        sizes = {p.name: p.stat().st_size for p in bundle.glob("*.tflite")}
        result[precision] = {
            "bundle": str(bundle),
            "tflite_bytes": int(sum(sizes.values())),
            "part_bytes": sizes,
            "agreement_with_keras": float(np.mean(same)),
            "f1": _f1(dataset_raw, examples, [a.text for a in answers], version),
            "avg_exit_layer": float(np.mean([a.exit_layer for a in answers])),
            "share_solved_on_edge": float(np.mean([a.solved for a in answers])),
            "embeddings_ms_p50": float(np.median([a.embeddings_ms for a in answers])),
            "layer_ms_p50": float(np.median([ms for a in answers for ms in a.layer_ms])),
            "question_ms_p50": float(np.median([a.embeddings_ms + sum(a.layer_ms) for a in answers])),
        }
    return result


def evaluate_bundle(
    bundle_dir: Path,
    examples: list,
    dataset_raw: dict,
    version: str = "1.1",
    policy=None,
    null_thresholds: list[float] | None = None,
    progress: bool = True,
) -> dict:
    """Run a bundle over ``examples`` (batch 1, from raw text as on the device) and score it.

    ``policy``: the bundle's own thresholds.json when None; ``null_thresholds``: per-layer
    SQuAD 2.0 no-answer thresholds replacing the bundle's. Returns F1/EM, average exit layer,
    the share settled on the edge, and the model's time per question (embeddings + layers,
    median and p95; tokenisation not counted), with the per-layer median cost.
    """
    from tqdm.auto import tqdm

    edge = EdgeModel.load(bundle_dir)
    if null_thresholds is not None:
        edge.null_threshold = list(null_thresholds)
    answers = []
    for e in tqdm(examples, desc=f"edge {Path(bundle_dir).name} v{version}", disable=not progress, unit="q"):
        answers.append(edge.answer_features([e], edge.features_for([e]), policy=policy)[0])
    texts = [a.text for a in answers]
    scores = per_question_scores(
        dataset_raw, dict(zip([e.qas_id for e in examples], texts, strict=True)), version
    )
    total = np.array([a.embeddings_ms + sum(a.layer_ms) for a in answers])
    per_layer = [[a.layer_ms[k] for a in answers if len(a.layer_ms) > k] for k in range(edge.num_layers)]
    return {
        "bundle": str(bundle_dir),
        "precision": edge.manifest.get("precision"),
        "dynamic_length": edge.dynamic_length,
        "questions": len(examples),
        "f1": float(100 * np.mean([scores[e.qas_id][1] for e in examples])),
        "exact": float(100 * np.mean([scores[e.qas_id][0] for e in examples])),
        "avg_exit_layer": float(np.mean([a.exit_layer for a in answers])),
        "share_solved_on_edge": float(np.mean([a.solved for a in answers])),
        "question_ms_p50": float(np.median(total)),
        "question_ms_p95": float(np.percentile(total, 95)),
        "layer_ms_p50": [float(np.median(v)) if v else None for v in per_layer],
    }
