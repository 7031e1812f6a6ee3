"""The whole adaptive-compute measurement from a trained exits artifact, in one command.

    python -m elma_utils.bench.adaptive_run --exits artifacts/<model>-exits-<mode> --out-dir reports \\
        [--layers 1,2,3] [--taus 0.6,0.7,0.75,0.8,0.85] [--limit N] [--skip-existing]

Stages, each cached beside the exits artifact (``<exits>/adaptive/``, and the layerwise
caches of ``layerwise_dev_stats`` / ``skim_layerwise_dev_stats`` in ``<exits>/``), so a
killed run continues where it stopped:

1. a skim head per candidate layer s, distilled from the full model (``train_skim_for_exits``
   → ``adaptive/L<s>/skim.npz``);
2. the Keras model's batch-1 cost per layer (``layer_latency_ms`` → ``adaptive/latency.json``),
   the cost model the calibration chooses with (the benchmark measures wall clock);
3. per dev set (v1.1 and v2.0): per-layer entropy / F1 / no-answer score of every question
   without skimming and with every head at every tau;
4. per layer and dev set, ``cross_fitted_adaptive`` (depth, width, both): tau, E_T and (v2.0)
   the no-answer thresholds tuned on one half of the articles, applied to the other. The
   skim layer is chosen by the *tuning* halves only: the largest mean tuning-half speed-up
   of "both" over the two dev sets and their two folds, among the layers within the F1
   budget on every tuning half (else the largest). One bundle holds one head, so both folds
   share the layer;
5. the int8 dynamic-length bundle with that head (``write_bundle``; its thresholds.json has
   the v1.1 "both" setting and the entropy predictor fitted on the skimmed runtime) →
   ``adaptive/edge/int8``;
6. ``bench.adaptive`` with the calibrated per-fold settings → ``<out-dir>/metrics/
   bench_adaptive.json`` (plus predictions and figures), to which the chosen layer, why, and
   the calibration of every candidate are added.

``--limit N``: N questions per dev set for calibration (spread over every article) and the
first N of each dev file for the benchmark — quick runs and tests, not the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from elma_utils.bench import adaptive as bench
from elma_utils.early_exit.skim import SKIM_FILE, SkimHead

RUN_DIR = "adaptive"
VERSIONS = bench.VERSIONS
# The head is fitted with positives weighted up (~10×), so its probabilities run high: on MiniLM
# dev-v1.1 the median block score is ~0.75 (layers 2 and 3) and taus ≤ 0.3 keep > 99 % of the
# tokens. The grid spans keeping ~75 % down to ~20 % of the blocks; ``dev_stats`` warns when a
# tau keeps almost everything (another head, another range).
DEFAULT_TAUS = (0.6, 0.7, 0.75, 0.8, 0.85)
ALL_KEPT = 0.98  # mean kept share above which a tau is reported as skimming nothing
WINDOWS_PER_QUESTION = 1.1  # SQuAD dev at 384 tokens, stride 128 (for the time estimate only)
EXPORT_MINUTES = 2.0
LAYER_RULE = (
    "mean over dev sets and folds of the tuning-half speed-up (cost model) of depth + width; layers within "
    "the F1 budget on every tuning half first; ties to the earlier layer"
)  # int8 conversion of the parts (for the time estimate only)


def run_dir(exits_dir: Path) -> Path:
    """``<exits>/adaptive/``: this command's cache (created on first use)."""
    path = Path(exits_dir) / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- stages 1–3: measurements


def skim_heads(
    exits_dir: Path, layers: list[int], max_windows: int, data_dir: Path | None
) -> dict[int, SkimHead]:
    """A trained head per layer (``adaptive/L<s>/skim.npz``; trained only when missing)."""
    from elma_utils.early_exit.skim_model import train_skim_for_exits

    heads = {}
    for s in tqdm(layers, desc="skim heads", unit="layer"):
        path = run_dir(exits_dir) / f"L{s}" / SKIM_FILE
        if not path.is_file():
            train_skim_for_exits(exits_dir, s, data_dir=data_dir, max_windows=max_windows, out=path)
        heads[s] = SkimHead.load(path)
    return heads


def latency(exits_dir: Path, multi, seq_len: int) -> dict[str, Any]:
    """Embeddings and per-layer ms at batch 1 (``adaptive/latency.json``; measured once)."""
    from elma_utils.atomic_files import write_json_atomic
    from elma_utils.early_exit.experiment import layer_latency_ms

    path = run_dir(exits_dir) / "latency.json"
    if path.is_file():
        return json.loads(path.read_text())
    lat = layer_latency_ms(multi, seq_len=seq_len)
    write_json_atomic(path, lat)
    return lat


def estimate_minutes(lat: dict, questions: dict[str, int], layers: list[int], taus: list[float],
                     max_windows: int, k: int) -> dict[str, float]:  # fmt: skip
    """Expected minutes per stage when nothing is cached (questions × configurations × ms).

    Batch-1 Keras time per layer stands in for every pass (batched evaluation is faster, the
    LiteRT int8 edge about as fast), so this is an upper-side estimate."""
    layer_ms, embed_ms = float(np.mean(lat["layer_ms"])), float(lat["embeddings_ms"])
    windows = {v: q * WINDOWS_PER_QUESTION for v, q in questions.items()}
    heads = sum(max_windows * (k + s) * layer_ms for s in layers)
    base = sum(w * (embed_ms + k * layer_ms) for w in windows.values())
    skim = sum(w * (embed_ms + s * layer_ms + len(taus) * (k - s) * layer_ms) for w in windows.values()
               for s in layers)  # fmt: skip
    bench_ms = sum(q * len(bench.CONFIGS) * (embed_ms + k * layer_ms) for q in questions.values())
    minutes = {"skim heads": heads, "layerwise stats": base + skim, "benchmark": bench_ms}
    out = {name: ms / 60e3 for name, ms in minutes.items()}
    out["export"] = EXPORT_MINUTES
    out["total"] = sum(out.values())
    return out


def dev_stats(exits_dir: Path, version: str, heads: dict[int, SkimHead], taus: list[float],
              limit: int | None, data_dir: Path | None) -> tuple[dict, dict[int, dict], list]:  # fmt: skip
    """(base stats, {layer: {tau: skimmed stats}}, examples) of one dev set; cached."""
    from elma_utils.early_exit.experiment import dev_questions, layerwise_dev_stats
    from elma_utils.early_exit.skim_model import skim_layerwise_dev_stats

    base = layerwise_dev_stats(exits_dir, version, limit, data_dir)
    by_layer = {
        s: skim_layerwise_dev_stats(exits_dir, h, version, taus, limit, data_dir) for s, h in heads.items()
    }
    for s, by_tau in by_layer.items():
        idle = [t for t, st in by_tau.items() if float(np.mean(st["kept_share"])) > ALL_KEPT]
        if idle:
            print(f"adaptive_run: dev-v{version}, skim layer {s}: tau {', '.join(f'{t:g}' for t in idle)} keep(s) "
                  f"> {ALL_KEPT:.0%} of the tokens (skims nothing): give --taus above this head's block scores")  # fmt: skip
    return base, by_layer, dev_questions(version, limit, data_dir)[1]


# ---------------------------------------------------------------- stage 4: calibration


def calibrate(base: dict, by_tau: dict, examples: list, version: str, lat: dict, layer: int,
              max_f1_loss: float) -> dict[str, dict]:  # fmt: skip
    """``cross_fitted_adaptive`` for depth, width and both on one dev set and skim layer."""
    from elma_utils.early_exit.skim_calibration import cross_fitted_adaptive

    titles = [e.title for e in examples]
    impossible = np.array([e.is_impossible for e in examples]) if version == "2.0" else None
    return {
        mode: cross_fitted_adaptive(
            base,
            by_tau,
            titles,
            layer_ms=np.asarray(lat["layer_ms"]),
            embeddings_ms=float(lat["embeddings_ms"]),
            skim_layer=layer,
            mode=mode,
            version=version,
            impossible=impossible,
            max_f1_loss=max_f1_loss,
        )  # fmt: skip
        for mode in ("depth", "width", "both")
    }


def choose_layer(calibrations: dict[int, dict[str, dict[str, dict]]]) -> tuple[int, dict[str, Any]]:
    """The skim layer by the tuning halves only; returns (layer, the reason as numbers).

    ``calibrations[layer][version][mode]``: ``cross_fitted_adaptive`` results. Score: the mean
    over dev sets and folds of the tuning-half speed-up (cost model) of "both"; layers within
    the F1 budget on every tuning half come first; ties go to the earlier layer."""
    scores = {}
    for s, per_version in calibrations.items():
        folds = [f for cf in per_version.values() for f in cf["both"]["settings"]]
        scores[s] = {
            "tuning_speedup": float(np.mean([f["tuning_speedup"] for f in folds])),
            "tuning_f1": {
                v: [round(f["tuning_f1"], 3) for f in cf["both"]["settings"]] for v, cf in per_version.items()
            },
            "within_target_on_tuning_halves": all(
                cf["both"]["within_target_on_tuning_halves"] for cf in per_version.values()
            ),  # fmt: skip
        }
    ranked = sorted(scores, key=lambda s: (not scores[s]["within_target_on_tuning_halves"],
                                           -scores[s]["tuning_speedup"], s))  # fmt: skip
    best = ranked[0]
    within = scores[best]["within_target_on_tuning_halves"]
    why = (
        f"layer {best}: the largest mean tuning-half speed-up of depth + width "
        f"({scores[best]['tuning_speedup']:.3f}×, cost model, both dev sets and both folds) "
        + (
            "among the layers within the F1 budget on every tuning half"
            if within
            else "(no layer met the F1 budget on every tuning half)"
        )  # fmt: skip
    )
    return best, {"chosen_layer": best, "why": why, "rule": LAYER_RULE,
                  "candidates": {str(s): v for s, v in scores.items()}}  # fmt: skip


def bundle_setting(cal_v11: dict[str, dict], taus: list[float]) -> dict[str, Any]:
    """The bundle's own (deployment) setting from the v1.1 folds of "both": the smaller tau
    (keeps more), the mean E_T (as notebook 04); the benchmark applies the per-fold ones."""
    both = cal_v11["both"]["settings"]
    fold_taus = [f["tau"] for f in both if f["tau"] is not None]
    fold_taus = fold_taus or [f["tau"] for f in cal_v11["width"]["settings"] if f["tau"] is not None]
    e_ts = [f["E_T"] for f in both if f["E_T"] is not None]
    return {"tau": float(min(fold_taus or taus)), "E_T": float(np.mean(e_ts)) if e_ts else None}


def fit_predictor(stats: dict, head: SkimHead, e_t: float | None, base: dict, folds: np.ndarray) -> tuple:
    """(table for the bundle fitted on every question, held-out report fitted on one fold).

    Exit layers and entropies are the skimmed runtime's at the bundle's tau and E_T; the
    offloaded answer is stood in for by the full-width last layer (the edge's full model)."""
    from elma_utils.early_exit.policies import EntropyPolicy, NeverExit, simulate_exits
    from elma_utils.early_exit.predictor import EntropyExitPredictor, evaluate_predictor

    entropy = np.asarray(stats["entropy"])
    k = entropy.shape[0]
    policy = NeverExit() if e_t is None else EntropyPolicy(e_t)
    exits = simulate_exits(entropy, None, policy)
    table = EntropyExitPredictor.from_layerwise(stats, exits, threshold=e_t, skim=head)
    half = EntropyExitPredictor.from_layerwise(
        stats, exits, threshold=e_t, skim=head, rows=np.nonzero(folds)[0]
    )
    used = np.minimum(exits, k)
    exit_f1 = np.asarray(stats["f1"])[used - 1, np.arange(used.size)]
    report = evaluate_predictor(half, entropy[0][~folds], exits[~folds], exit_f1[~folds],
                                np.asarray(base["f1"])[-1][~folds])  # fmt: skip
    return table, report


# ---------------------------------------------------------------- stages 5–6: bundle and benchmark


def export_bundle(exits_dir: Path, multi, tokenizer, config: dict, head: SkimHead, thresholds: dict) -> Path:
    """The int8 dynamic-length bundle with ``head`` (reused when the same head and settings)."""
    from elma_utils.export.bundle import BundleError, verify_bundle, write_bundle

    blob = head.w.tobytes() + json.dumps([head.b, head.settings(), thresholds], sort_keys=True).encode()
    version = f"{Path(exits_dir).name}-skim-L{head.layer}-{hashlib.sha256(blob).hexdigest()[:10]}"
    out = run_dir(exits_dir) / "edge" / "int8"
    try:
        if verify_bundle(out)["model_version"] == version:
            return out
    except BundleError:
        pass
    return write_bundle(multi, tokenizer, out, seq_len=config["max_seq_len"], precision="int8",
                        thresholds=thresholds, model_version=version, doc_stride=config["doc_stride"],
                        max_query_len=config["max_query_len"], overwrite=True, dynamic_length=True,
                        skim=head)  # fmt: skip


def run(
    exits_dir: Path,
    out_dir: Path,
    *,
    layers: list[int] | None = None,
    taus: list[float] = DEFAULT_TAUS,
    limit: int | None = None,
    skip_existing: bool = False,
    data_dir: Path | None = None,
    max_windows: int = 4000,
    max_f1_loss: float = 1.0,
    warmup: int = 3,
    threads: int | None = None,
    argv: list[str] | None = None,
    command: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Every stage (see the module note); returns the benchmark json as written.

    ``command``: what produced it, when not this module's command line (``argv``), e.g. the
    notebook that calls ``run``."""
    from elma_utils.atomic_files import write_json_atomic
    from elma_utils.early_exit.experiment import load_exits
    from elma_utils.early_exit.squad2 import held_out_folds
    from elma_utils.reporting import project_relative, to_jsonable
    from elma_utils.squad.data import load_squad

    exits_dir, out_dir = Path(exits_dir), Path(out_dir)
    multi, tokenizer, config, _ = load_exits(exits_dir)
    k = multi.num_exits
    layers = sorted(set(layers or range(1, k)))
    bad = [s for s in layers if not 1 <= s < k]
    if bad:
        raise ValueError(f"skim layers {bad} do not lie in 1..{k - 1} ({k} layers in {exits_dir})")
    taus = sorted({float(t) for t in taus})
    t_start = time.time()
    lat = latency(exits_dir, multi, config["max_seq_len"])
    questions = {v: limit or len(load_squad(v, "dev", data_dir=data_dir).examples) for v in VERSIONS}
    est = estimate_minutes(lat, questions, layers, taus, max_windows, k)
    log(f"adaptive_run: {k} layers, skim layers {layers} × {len(taus)} taus, questions {questions}, "
        f"{len(bench.CONFIGS)} benchmark configurations; expected ≈ {est['total']:.0f} min if nothing is cached "
        f"({', '.join(f'{n} {m:.2g}' for n, m in est.items() if n != 'total')} min); cache: {run_dir(exits_dir)}")  # fmt: skip

    heads = skim_heads(exits_dir, layers, max_windows, data_dir)
    calibrations: dict[int, dict[str, dict]] = {s: {} for s in layers}
    stats: dict[str, tuple] = {}
    for version in tqdm(VERSIONS, desc="dev sets (stats, calibration)", unit="set"):
        base, by_layer, examples = dev_stats(exits_dir, version, heads, taus, limit, data_dir)
        stats[version] = (base, by_layer, examples)
        for s in layers:
            calibrations[s][version] = calibrate(base, by_layer[s], examples, version, lat, s, max_f1_loss)
    layer, choice = choose_layer(calibrations)
    log(choice["why"])

    from elma_utils.early_exit.skim_calibration import bench_settings

    chosen = calibrations[layer]
    settings = {v: bench_settings([e.title for e in stats[v][2]], **chosen[v]) for v in VERSIONS}
    settings_path = run_dir(exits_dir) / f"bench-settings-L{layer}-{limit or 'all'}.json"
    write_json_atomic(settings_path, to_jsonable(settings))
    setting = bundle_setting(chosen["1.1"], taus)
    head = heads[layer].with_settings(tau=setting["tau"])
    base, by_layer, examples = stats["1.1"]
    folds = held_out_folds([e.title for e in examples])[0]
    table, predictor_report = fit_predictor(
        by_layer[layer][setting["tau"]], head, setting["E_T"], base, folds
    )
    thresholds = {"policy": "never", "rule": "max", "predictor": table.to_dict()}
    if setting["E_T"] is not None:
        thresholds.update(policy="entropy", E_T=setting["E_T"])
    bundle = export_bundle(exits_dir, multi, tokenizer, config, head, thresholds)
    log(f"bundle: {bundle} (skim layer {layer}, tau {head.tau:g}, E_T {setting['E_T']})")

    out = out_dir / "metrics" / "bench_adaptive.json"
    model_version = json.loads((bundle / "manifest.json").read_text())["model_version"]
    previous = json.loads(out.read_text()) if out.is_file() else None
    reuse = skip_existing and previous is not None and previous.get("model_version") == model_version and (
        previous.get("limit") == limit)  # fmt: skip
    if reuse:
        log(f"--skip-existing: {out} already holds this bundle's benchmark")
    else:
        bench_argv = ["--bundle", str(bundle), "--settings", str(settings_path), "--out", str(out),
                      "--predictions-dir", str(out_dir / "predictions"), "--figures-dir", str(out_dir / "figures"),
                      "--warmup", str(warmup)]  # fmt: skip
        bench_argv += (["--limit", str(limit)] if limit else []) + (
            ["--data-dir", str(data_dir)] if data_dir else []
        )
        bench_argv += ["--threads", str(threads)] if threads else []
        bench.main(bench_argv)
    result = json.loads(out.read_text())
    result.setdefault("bench_command", result.get("command"))
    result["command"] = command or "python -m elma_utils.bench.adaptive_run " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result.setdefault("produced_by", {})["command"] = result["command"]
    calibration_summary = {
        str(s): {v: {mode: {key: cf[key] for key in ("f1", "full_f1", "f1_loss", "speedup_cost_model", "avg_layers",
                                                     "kept_token_share", "within_target_on_tuning_halves",
                                                     "flip_rate_from_skim")}
                     for mode, cf in per_v.items()} for v, per_v in per_s.items()}
        for s, per_s in calibrations.items()
    }  # fmt: skip
    result["adaptive_run"] = {
        "exits": str(exits_dir),
        "skim_layer": choice,
        "taus": taus,
        "layer_cost": lat,
        "calibration_held_out": calibration_summary,
        "settings": str(settings_path),
        "bundle_setting": setting,
        "entropy_predictor": predictor_report,
        "minutes": round((time.time() - t_start) / 60, 2),
        "expected_minutes": round(est["total"], 2),
    }
    write_json_atomic(out, project_relative(to_jsonable(result)))
    return result


def deployment_record(result: dict[str, Any]) -> dict[str, Any]:
    """What notebook 04 records of a ``run`` (``export.deployed_bundle`` deploys ``bundle``):
    the bundle, its skim layer and setting, why that layer, and per dev set the measured
    speed-up, F1 loss, layers and kept share of each configuration."""
    keys = ("speedup", "f1", "full_f1", "f1_loss", "avg_layers", "kept_token_share", "questions")
    configs = {"both": None, "depth_only": "depth_only", "width_only": "width_only"}
    return {
        "bundle": result["bundle"],
        "skim_layer": result["adaptive_run"]["skim_layer"]["chosen_layer"],
        "why": result["adaptive_run"]["skim_layer"]["why"],
        "setting": result["adaptive_run"]["bundle_setting"],
        "metrics": "metrics/bench_adaptive.json",
        "dev_sets": {
            name: {c: {k: (dev if key is None else dev[key])[k] for k in keys} for c, key in configs.items()}
            for name, dev in result["dev_sets"].items()
        },
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Per dev set: speed-up, F1 loss, average layers and kept share, measured (adaptive, "both")."""
    lines = [f"skim layer: {result['adaptive_run']['skim_layer']['why']}"]
    for name, dev in result["dev_sets"].items():
        lines.append(
            f"{name}: speed-up {dev['speedup']:.2f}×, F1 {dev['f1']:.2f} (full {dev['full_f1']:.2f}, loss "
            f"{dev['f1_loss']:.2f}), avg layers {dev['avg_layers']:.2f}, kept share {dev['kept_token_share']:.3f}, "
            f"{dev['questions']} questions; depth only {dev['depth_only']['speedup']:.2f}×, width only "
            f"{dev['width_only']['speedup']:.2f}×"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exits", type=Path, required=True, help="exits artifact (train_exits_for_profile's)")
    p.add_argument(
        "--out-dir", type=Path, required=True, help="reports directory (metrics/, predictions/, figures/)"
    )
    p.add_argument(
        "--layers", default=None, help="candidate skim layers, e.g. 1,2,3 (default: all but the last)"
    )
    p.add_argument(
        "--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS), help="keep thresholds to calibrate"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="N questions per dev set (quick runs, not the report)"
    )
    p.add_argument("--skip-existing", action="store_true",
                   help="keep an existing benchmark json written for the same bundle and --limit")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    p.add_argument("--max-windows", type=int, default=4000, help="training windows per skim head")
    p.add_argument("--max-f1-loss", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="LiteRT threads for the benchmark")
    args = p.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    result = run(args.exits, args.out_dir, layers=layers, taus=[float(x) for x in args.taus.split(",")],
                 limit=args.limit, skip_existing=args.skip_existing, data_dir=args.data_dir,
                 max_windows=args.max_windows, max_f1_loss=args.max_f1_loss, warmup=args.warmup,
                 threads=args.threads, argv=sys.argv[1:] if argv is None else argv)  # fmt: skip
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
