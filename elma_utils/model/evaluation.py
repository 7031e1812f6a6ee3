"""`elma evaluate`: run a model over a SQuAD dev set, write official-format files, score them.

For SQuAD 2.0 the no-answer threshold must not be fitted on the questions it is scored
on. We report the official script's numbers (whose ``best_f1`` *is* fitted on dev, as
published results do) and, as the honest figure, a cross-fitted F1: the threshold for one
half of the articles is tuned on the other half, and the other way round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from elma_utils.model import artifacts
from elma_utils.model.batching import batch_arrays, plan_batches
from elma_utils.squad import metrics
from elma_utils.squad.data import SquadDataset, load_squad, split_by_article
from elma_utils.squad.features import QAFeatures, build_features
from elma_utils.squad.postprocess import SpanPrediction, predict_answers


def predict_logits(model, features: QAFeatures, batch_size: int = 64, progress: bool = True):
    """Start/end logits [N, L] for every feature, batched by length (padding cut away)."""
    n, seq = len(features), features.max_seq_len
    start = np.full((n, seq), -1e4, dtype=np.float32)
    end = np.full((n, seq), -1e4, dtype=np.float32)
    plan = plan_batches(features.lengths, batch_size, seq, shuffle=False)
    for b in tqdm(plan, desc="predicting", disable=not progress, unit="batch"):
        out = model.predict_on_batch(batch_arrays(features, b, with_labels=False))
        start[b.rows, : b.length] = np.asarray(out["start_logits"], dtype=np.float32)
        end[b.rows, : b.length] = np.asarray(out["end_logits"], dtype=np.float32)
    return start, end


def cross_fitted_threshold_f1(dataset: SquadDataset, preds: list[SpanPrediction], seed: int = 0) -> dict:
    """SQuAD 2.0 F1 with the no-answer threshold tuned on the *other* half of the articles."""
    examples = dataset.examples
    half_a, half_b = split_by_article(examples, 0.5, seed=seed)
    if not half_a or not half_b:
        raise ValueError("cross-fitting the no-answer threshold needs questions from at least two articles")
    by_id = {e.qas_id: p for e, p in zip(examples, preds, strict=True)}
    final: dict[str, str] = {}
    thresholds = []
    for tune, apply in ((half_a, half_b), (half_b, half_a)):
        tune_ids = {e.qas_id for e in tune}
        sub = _subset_raw(dataset.raw, tune_ids)
        span_text = {q: by_id[q].text_if_answer() for q in tune_ids}
        na = {q: by_id[q].null_score_diff for q in tune_ids}
        best = metrics.squad_v2_scores(sub, span_text, na)
        thr = best["best_f1_thresh"]
        thresholds.append(thr)
        for e in apply:
            p = by_id[e.qas_id]
            final[e.qas_id] = "" if p.null_score_diff > thr else p.text_if_answer()
    scores = metrics.squad_v2_scores(dataset.raw, final)
    return {"scores": dict(scores), "thresholds": thresholds, "predictions": final}


def _subset_raw(raw: dict, qids: set[str]) -> dict:
    data = []
    for art in raw["data"]:
        paras = []
        for p in art["paragraphs"]:
            qas = [q for q in p["qas"] if q["id"] in qids]
            if qas:
                paras.append({**p, "qas": qas})
        if paras:
            data.append({**art, "paragraphs": paras})
    return {**raw, "data": data}


def evaluate_dataset(
    model, tokenizer, config: dict, dataset: SquadDataset, batch_size: int = 64, progress: bool = True
) -> dict:
    """Predictions and official scores for one dataset (v1.1 or v2.0)."""
    t0 = time.time()
    feats = build_features(
        dataset.examples,
        tokenizer,
        max_seq_len=config["max_seq_len"],
        doc_stride=config["doc_stride"],
        max_query_len=config["max_query_len"],
        progress=progress,
    )
    t_feat = time.time() - t0
    t0 = time.time()
    start, end = predict_logits(model, feats, batch_size, progress)
    t_model = time.time() - t0
    preds = predict_answers(dataset.examples, feats, start, end)
    result: dict = {
        "questions": len(dataset.examples),
        "features": len(feats),
        "seconds_features": round(t_feat, 1),
        "seconds_model": round(t_model, 1),
        "questions_per_second": round(len(dataset.examples) / max(t_model, 1e-9), 2),
        "spans": preds,
    }
    if dataset.version == "1.1":
        result["predictions"] = {e.qas_id: p.text for e, p in zip(dataset.examples, preds, strict=True)}
        result["scores"] = dict(metrics.squad_v1_scores(dataset.raw, result["predictions"]))
    else:
        span_text = {e.qas_id: p.text_if_answer() for e, p in zip(dataset.examples, preds, strict=True)}
        na = {e.qas_id: p.null_score_diff for e, p in zip(dataset.examples, preds, strict=True)}
        official = dict(metrics.squad_v2_scores(dataset.raw, span_text, na))
        always = dict(metrics.squad_v2_scores(dataset.raw, span_text))
        if len({e.title for e in dataset.examples}) < 2:
            raise ValueError(
                "SQuAD 2.0 evaluation needs questions from at least two articles (raise --limit)"
            )
        crossfit = cross_fitted_threshold_f1(dataset, preds)
        result["predictions"] = crossfit["predictions"]
        result["na_probs"] = na
        result["scores"] = {
            "exact": crossfit["scores"]["exact"],
            "f1": crossfit["scores"]["f1"],
            "HasAns_f1": crossfit["scores"].get("HasAns_f1"),
            "NoAns_f1": crossfit["scores"].get("NoAns_f1"),
            "thresholds_cross_fitted": crossfit["thresholds"],
            "always_answer": {k: always[k] for k in ("exact", "f1", "HasAns_f1", "NoAns_f1") if k in always},
            "official_best_f1": official.get("best_f1"),
            "official_best_f1_thresh": official.get("best_f1_thresh"),
            "official_best_exact": official.get("best_exact"),
        }
    return result


def write_eval_files(result: dict, out_dir: Path, version: str) -> dict[str, Path]:
    """predictions (official format), na_probs (v2), scores; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"dev-v{version}"
    paths = {"predictions": out_dir / f"predictions-{tag}.json", "scores": out_dir / f"scores-{tag}.json"}
    paths["predictions"].write_text(json.dumps(result["predictions"], ensure_ascii=False, indent=0))
    if "na_probs" in result:
        paths["na_probs"] = out_dir / f"na-probs-{tag}.json"
        paths["na_probs"].write_text(json.dumps(result["na_probs"]))
    summary = {k: v for k, v in result.items() if k not in ("spans", "predictions", "na_probs")}
    paths["scores"].write_text(json.dumps(summary, indent=2))
    return paths


def evaluate_artifact(
    model_dir: Path,
    version: str = "1.1",
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    out_dir: Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Load a trained model, evaluate it on dev-v{version}.json, write files, record metrics."""
    model, tokenizer, config = artifacts.load_span_model(model_dir)
    dataset = load_squad(version, "dev", data_dir=data_dir, limit=limit)
    result = evaluate_dataset(model, tokenizer, config, dataset, batch_size, progress)
    result["files"] = {
        k: str(v) for k, v in write_eval_files(result, out_dir or Path(model_dir) / "eval", version).items()
    }
    summary = {k: v for k, v in result.items() if k not in ("spans", "predictions", "na_probs")}
    artifacts.update_metrics(model_dir, f"eval-dev-v{version}" + (f"-first{limit}" if limit else ""), summary)
    return result
