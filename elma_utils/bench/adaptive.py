"""Adaptive compute on the edge: depth (early exit), width (skim) and both, against full compute.

    python -m elma_utils.bench.adaptive --bundle artifacts/<model>-edge/int8 \\
        --settings artifacts/<exits>/adaptive-settings.json --out reports/metrics/bench_adaptive.json

For every dev set (v1.1 and v2.0, whole files unless ``--limit``) one bundle answers every
question at batch 1 in four configurations, **interleaved** (question by question, the
configurations in a rotating order, so drift in machine load hits all alike):

- ``full``: every layer, no skim (the reference);
- ``depth_only``: early exit (E_T), no skim;
- ``width_only``: every layer, skimming after the skim layer;
- ``both``: early exit and skimming (ELMA's adaptive edge, the chosen point).

Time is the QA model's wall clock per question (embeddings, parts, skim gathers and the
exit decisions; tokenisation excluded: windows are built before timing). F1 is the official
scoring of what each configuration answered. Settings come from ``--settings`` (written by
``skim_calibration.bench_settings``: per configuration either one dict or two, one per
article half, each applied to the half it was *not* tuned on), else from the bundle's
thresholds.json and skim entry.

Writes the metrics json (with ``commit`` and ``command``), official-format predictions of
``both`` with a side file of per-question exit layer and kept share, the figure of F1
against speed-up and a markdown table beside published numbers (``adaptive_report``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.bench.adaptive_report import (
    budget_oracle,
    cumulative_ms,
    entropy_frontier,
    markdown_table,
    oracle,
    save_frontier_figure,
)
from elma_utils.early_exit.policies import EntropyPolicy, NeverExit
from elma_utils.report import provenance

CONFIGS = ("full", "depth_only", "width_only", "both")
VERSIONS = ("1.1", "2.0")
MAX_F1_LOSS = 1.0  # the budget, for the oracle bound within it
PREDICTIONS_NAME = "adaptive-predictions-dev-v{version}.json"
DETAILS_NAME = "adaptive-details-dev-v{version}.json"


@dataclass
class RunSetting:
    """How one configuration answers one question."""

    policy: Any
    skim: Any  # False (no skim) or a SkimHead
    null_threshold: Any  # None (v1.1) or the per-layer no-answer thresholds


def _policy(th: dict, rule: str, v2: bool):
    if th.get("E_T") is None:
        return NeverExit()
    margin = th.get("no_answer_margin") if v2 else None
    null = th.get("null_threshold") if v2 and margin is not None else 0.0
    return EntropyPolicy(float(th["E_T"]), rule=th.get("rule", rule), no_answer_margin=margin,
                         null_threshold=0.0 if null is None else null)  # fmt: skip


def resolve_settings(
    edge, version: str, settings: dict | None, titles: list[str]
) -> dict[str, list[RunSetting]]:
    """Per configuration, the setting of every question (fold-wise settings applied held-out)."""
    from elma_utils.early_exit.squad2 import held_out_folds

    if edge.skim is None:
        raise ValueError(
            f"bundle {edge.bundle_dir} has no skim head: export it with write_bundle(..., skim=SkimHead.load("
            "'<exits>/skim.npz')) (see elma_utils.early_exit.skim_model.train_skim_for_exits)"
        )
    v2 = version == "2.0"
    mine = (settings or {}).get(version, {})
    bundle_th = dict(edge.thresholds)
    bundle_null = edge.null_threshold if v2 else None
    default = {
        "full": {"E_T": None},
        "depth_only": {**bundle_th, "tau": None},
        "width_only": {"E_T": None, "tau": edge.skim.tau},
        "both": {**bundle_th, "tau": edge.skim.tau},
    }
    if "held_out_titles" in mine:  # the calibration's article halves (also under --limit)
        first = set(mine["held_out_titles"])
        folds = np.array([t in first for t in titles], dtype=bool)
    else:
        folds = held_out_folds(titles)[0] if titles else np.ones(0, dtype=bool)
    per_fold: dict[str, list[RunSetting]] = {}
    for name in ("depth_only", "width_only", "both"):
        given = mine.get(name.removesuffix("_only"), mine.get(name))
        dicts = given if isinstance(given, list) else [given or default[name]] * 2
        made = []
        for th in dicts:
            th = {**default[name], **th}
            tau = th.get("tau") if name != "depth_only" else None
            skim = False if tau is None else edge.skim.with_settings(tau=float(tau))
            null = th.get("null_threshold", bundle_null) if v2 else None
            made.append(RunSetting(_policy(th, edge.rule, v2), skim, null))
        per_fold[name] = made
    # the reference: every layer, no skim, the depth configuration's no-answer thresholds (v2.0)
    per_fold["full"] = [RunSetting(NeverExit(), False, d.null_threshold) for d in per_fold["depth_only"]]
    return {
        name: [per_fold[name][0] if folds[i] else per_fold[name][1] for i in range(len(titles))]
        for name in CONFIGS
    }


def run_interleaved(edge, examples: list, features: list, settings: dict[str, list[RunSetting]],
                    warmup: int = 3, progress: bool = True) -> dict[str, list]:  # fmt: skip
    """{config: [(EdgeAnswer, wall ms)] per question}, configurations round-robin per question."""
    from tqdm.auto import tqdm

    def one(name: str, i: int):
        s = settings[name][i]
        edge.null_threshold = s.null_threshold
        t0 = time.perf_counter()
        [a] = edge.answer_features([examples[i]], features[i], policy=s.policy, skim=s.skim)
        return a, (time.perf_counter() - t0) * 1e3

    for i in range(min(warmup, len(examples))):  # untimed: first calls allocate and resize
        for name in CONFIGS:
            one(name, i)
    runs: dict[str, list] = {name: [None] * len(examples) for name in CONFIGS}
    for i in tqdm(range(len(examples)), desc="interleaved configs", disable=not progress, unit="q"):
        for j in range(len(CONFIGS)):
            name = CONFIGS[(i + j) % len(CONFIGS)]
            runs[name][i] = one(name, i)
    return runs


def _scores(raw: dict, examples: list, texts: list[str], version: str) -> tuple[dict, np.ndarray]:
    from elma_utils.squad.metrics import per_question_scores, score_predictions

    preds = {e.qas_id: t for e, t in zip(examples, texts, strict=True)}
    per_q = per_question_scores(raw, preds, version)
    return score_predictions(raw, preds, version), np.array([per_q[e.qas_id][1] for e in examples])


def _layer_f1(raw: dict, examples: list, answers: list, version: str) -> np.ndarray:
    """F1 [K, Q] (0..1) of every layer's answer, from runs that computed every layer."""
    k = min(len(a.layer_texts) for a in answers)
    return np.stack(
        [_scores(raw, examples, [a.layer_texts[j] for a in answers], version)[1] for j in range(k)]
    )


def bench_dev_set(edge, version: str, data_dir: Path | None, limit: int | None, settings: dict | None,
                  predictions_dir: Path, warmup: int = 3, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the four configurations on one dev set; returns its metrics and writes predictions."""
    from elma_utils.atomic_files import write_json_atomic
    from elma_utils.squad.data import load_squad

    ds = load_squad(version, "dev", data_dir=data_dir, limit=limit)
    examples = ds.examples
    titles = [e.title for e in examples]
    features = [edge.features_for([e]) for e in examples]  # tokenised before any timing
    resolved = resolve_settings(edge, version, settings, titles)
    runs = run_interleaved(edge, examples, features, resolved, warmup, progress)
    official: dict[str, dict] = {}
    per_q: dict[str, np.ndarray] = {}
    for name in CONFIGS:
        official[name], per_q[name] = _scores(ds.raw, examples, [a.text for a, _ in runs[name]], version)
    full_ms = np.array([ms for _, ms in runs["full"]])
    full_empty = np.array([a.text == "" for a, _ in runs["full"]])

    def metrics(name: str) -> dict[str, Any]:
        answers = [a for a, _ in runs[name]]
        ms = np.array([m for _, m in runs[name]])
        return {
            "speedup": float(full_ms.sum() / ms.sum()),
            "f1": float(official[name]["f1"]),
            "exact": float(official[name].get("exact", official[name].get("exact_match"))),
            "full_f1": float(official["full"]["f1"]),
            "f1_loss": float(official["full"]["f1"] - official[name]["f1"]),
            "avg_layers": float(np.mean([a.exit_layer for a in answers])),
            "kept_token_share": float(np.mean([a.kept_share for a in answers])),
            "questions": len(answers),
            "ms_mean": float(ms.mean()),
            "ms_p50": float(np.median(ms)),
            "ms_p95": float(np.percentile(ms, 95)),
            "share_solved_on_edge": float(np.mean([a.solved for a in answers])),
            "flip_rate_vs_full": float(np.mean(np.array([a.text == "" for a in answers]) != full_empty)),
        }

    result = {**metrics("both"), **{name: metrics(name) for name in ("full", "depth_only", "width_only")}}
    full_answers = [a for a, _ in runs["full"]]
    skim_answers = [a for a, _ in runs["width_only"]]
    f1_full_layers = _layer_f1(ds.raw, examples, full_answers, version)
    f1_skim_layers = _layer_f1(ds.raw, examples, skim_answers, version)
    cost_full = np.stack([cumulative_ms(a.embeddings_ms, a.layer_ms) for a in full_answers], axis=1)
    cost_skim = np.stack([cumulative_ms(a.embeddings_ms, a.layer_ms) for a in skim_answers], axis=1)
    reference, ref_cost = per_q["full"], cost_full[-1]
    depth = {"full width": (f1_full_layers, cost_full)}
    depth_width = {**depth, "skim": (f1_skim_layers, cost_skim)}
    result["oracle"] = {
        "depth_only": oracle(reference, depth, ref_cost),
        "depth_width": oracle(reference, depth_width, ref_cost),
        "depth_only_within_budget": budget_oracle(reference, depth, ref_cost, MAX_F1_LOSS),
        "depth_width_within_budget": budget_oracle(reference, depth_width, ref_cost, MAX_F1_LOSS),
        "cost": "measured LiteRT time per layer (embeddings + parts + skim), per question",
    }
    ent_full = np.array([a.entropies for a in full_answers]).T
    ent_skim = np.array([a.entropies for a in skim_answers]).T
    result["frontier"] = {
        "depth_only": entropy_frontier(f1_full_layers, ent_full, cost_full, ref_cost),
        "both": entropy_frontier(f1_skim_layers, ent_skim, cost_skim, ref_cost),
        "note": "E_T replayed on per-layer answers (no no-answer margin); speed-up from measured part times",
    }
    predictions_dir = Path(predictions_dir)
    predictions_dir.mkdir(parents=True, exist_ok=True)
    both = [a for a, _ in runs["both"]]
    paths = {
        "predictions": predictions_dir / PREDICTIONS_NAME.format(version=version),
        "details": predictions_dir / DETAILS_NAME.format(version=version),
    }
    write_json_atomic(paths["predictions"], {e.qas_id: a.text for e, a in zip(examples, both, strict=True)})
    write_json_atomic(paths["details"], {
        e.qas_id: {"exit_layer": a.exit_layer, "kept_share": round(a.kept_share, 4), "solved": a.solved,
                   "ms": round(ms, 3)}
        for e, (a, ms) in zip(examples, runs["both"], strict=True)
    })  # fmt: skip
    result["files"] = {k: str(v) for k, v in paths.items()}
    result["skim"] = edge.skim.settings()
    return result


def run(
    bundle: Path,
    out: Path,
    *,
    data_dir: Path | None = None,
    versions: tuple[str, ...] = VERSIONS,
    limit: int | None = None,
    settings: dict | None = None,
    predictions_dir: Path | None = None,
    figures_dir: Path | None = None,
    num_threads: int | None = None,
    warmup: int = 3,
    argv: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole benchmark; writes ``out`` (json), ``out`` with .md (table), figures, predictions."""
    from elma_utils.atomic_files import write_bytes_atomic, write_json_atomic
    from elma_utils.config import PROJECT_ROOT
    from elma_utils.edge.runtime import EdgeModel
    from elma_utils.reporting import project_relative, to_jsonable

    out = Path(out)
    reports = PROJECT_ROOT / "reports"
    predictions_dir = Path(predictions_dir or reports / "predictions")
    figures_dir = Path(figures_dir or reports / "figures")
    edge = EdgeModel.load(bundle, num_threads=num_threads)
    command = shlex.join(
        ["python", "-m", "elma_utils.bench.adaptive", *(sys.argv[1:] if argv is None else argv)]
    )
    produced = {**provenance.provenance(), "command": command}  # one git call for both places
    result: dict[str, Any] = {
        **produced,
        provenance.KEY: produced,  # what the report reads
        "bundle": str(bundle),
        "precision": edge.manifest.get("precision"),
        "model_version": edge.manifest.get("model_version"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "num_threads": num_threads,
        "batch_size": 1,
        "interleaved": True,
        "limit": limit,
        "dev_sets": {},
    }
    for version in versions:
        dev = bench_dev_set(edge, version, data_dir, limit, settings, predictions_dir, warmup, progress)
        path = save_frontier_figure(dev, f"dev-v{version}", result["precision"], figures_dir)
        dev["files"]["figure"] = str(path)
        result["dev_sets"][f"dev-v{version}"] = dev
    table = out.with_suffix(".md")
    result["table"] = str(table)
    table.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(table, markdown_table(result).encode("utf-8"))
    write_json_atomic(out, project_relative(to_jsonable(result)))
    return result


def main(argv: list[str] | None = None) -> int:
    from elma_utils.config import PROJECT_ROOT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--bundle", type=Path, required=True, help="edge bundle with a skim head (int8 for the report)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD dev files")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "metrics" / "bench_adaptive.json")
    p.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each dev set (quick runs)")
    p.add_argument("--settings", type=Path, default=None, help="json from skim_calibration.bench_settings")
    p.add_argument("--predictions-dir", type=Path, default=None)
    p.add_argument("--figures-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="LiteRT threads (default: the interpreter's)")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    settings = json.loads(args.settings.read_text()) if args.settings else None
    result = run(args.bundle, args.out, data_dir=args.data_dir, versions=tuple(args.versions), limit=args.limit,
                 settings=settings, predictions_dir=args.predictions_dir, figures_dir=args.figures_dir,
                 num_threads=args.threads, warmup=args.warmup, argv=sys.argv[1:] if argv is None else argv)  # fmt: skip
    summary = {name: {k: round(dev[k], 4) for k in ("speedup", "f1", "full_f1", "f1_loss", "avg_layers",
                                                    "kept_token_share")} for name, dev in result["dev_sets"].items()}  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
