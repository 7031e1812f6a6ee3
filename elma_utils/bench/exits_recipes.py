"""Do the exits' training recipes pay for adaptive compute? Several exits artifacts, one question set.

    python -m elma_utils.bench.exits_recipes --reference artifacts/minilm-cpu-exits-distill \\
        --exits artifacts/minilm-cpu-exits-joint_distill-1ep --exits artifacts/minilm-cpu-exits-skimtuned-L3 \\
        --skim-layer 3 [--taus 0.5,0.6,0.7,0.8,0.85] [--questions 1000] [--out-dir reports]

Issue 16 gives the early layers their best chance (joint self-distillation for ≥ 1 epoch) and
tries skimming in the loop (``early_exit.skim_finetune``) "if it pays". This measures whether
they do, before a multi-hour whole-dev benchmark is spent on them: for every artifact (the
reference first; each needs its skim head at ``adaptive/L<s>/skim.npz``, which
``bench.adaptive_run`` or ``skim_finetune`` leave there), on the same dev-v1.1 questions (spread
over every article, Keras float32 exits):

- F1 per exit, and how far its full depth lies from the reference's (the original full model
  when the reference is the frozen-backbone ``distill`` exits: the server's answers);
- per keep threshold tau: the share of tokens past layer s and the full-depth F1 when skimming;
- depth, width and both, cross-fitted over articles by the calibration ``adaptive_run`` uses
  (``skim_calibration``, 1-F1 budget against the artifact's own full depth), with the loss
  against the reference too (F1 means are additive on SQuAD v1.1, so it is exact);
- the oracle bounds, depth only and depth + width: per question the cheapest option whose F1
  reaches the reference's (zero loss), and the Lagrangian bound within the F1 budget against
  the reference (``adaptive_report.budget_oracle``), which no policy on these exits can beat.

Speed-ups here come from the cost model (measured per-layer Keras batch-1 times, later layers
scaled by the kept share), not wall clock: a screen, not the issue's benchmark
(``bench.adaptive_run``). Writes ``metrics/bench_exits_recipes.json``. Minutes per artifact on
2 cores when ``adaptive_run`` left its statistics cached, ~15 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.early_exit.skim import SKIM_FILE, SkimHead

METRICS = "bench_exits_recipes"
DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.8, 0.85)
MODES = ("depth", "width", "both")


def cached_layer_latency(exits_dir: Path) -> dict[str, Any]:
    """The per-layer batch-1 cost ``adaptive_run`` measured (measured now when missing)."""
    from elma_utils.bench.adaptive_run import latency, run_dir
    from elma_utils.early_exit.experiment import load_exits

    cached = run_dir(exits_dir) / "latency.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    multi, _, config, _ = load_exits(exits_dir)
    return latency(exits_dir, multi, config["max_seq_len"])


def recipe_record(
    exits_dir: Path,
    layer: int,
    taus: list[float],
    questions: int | None,
    reference_f1: np.ndarray,
    data_dir: Path | None = None,
    max_f1_loss: float = 1.0,
) -> dict[str, Any]:
    """One artifact's numbers (see the module note); ``reference_f1`` [Q] per question, 0..1."""
    from elma_utils.bench.adaptive_report import budget_oracle, oracle
    from elma_utils.bench.adaptive_run import calibrate
    from elma_utils.early_exit.experiment import dev_questions, layerwise_dev_stats
    from elma_utils.early_exit.skim_calibration import question_costs
    from elma_utils.early_exit.skim_model import skim_layerwise_dev_stats

    exits_dir = Path(exits_dir)
    head = SkimHead.load(exits_dir / "adaptive" / f"L{layer}" / SKIM_FILE)
    base = layerwise_dev_stats(exits_dir, "1.1", questions, data_dir)
    by_tau = skim_layerwise_dev_stats(exits_dir, head, "1.1", taus, questions, data_dir)
    examples = dev_questions("1.1", questions, data_dir)[1]
    lat = cached_layer_latency(exits_dir)
    layer_ms, embed_ms = np.asarray(lat["layer_ms"]), float(lat["embeddings_ms"])
    f1 = np.asarray(base["f1"], dtype=np.float64)
    ref_full = 100 * float(np.mean(reference_f1))
    own_full = 100 * float(f1[-1].mean())
    cal = calibrate(base, by_tau, examples, "1.1", lat, layer, max_f1_loss)
    cost_full = question_costs(layer_ms, np.ones(f1.shape[1]), None, embed_ms)
    skims = {
        f"skim tau {t:g}": (st["f1"], question_costs(layer_ms, st["kept_share"], layer, embed_ms))
        for t, st in by_tau.items()
    }
    depth = {"full width": (f1, cost_full)}
    config = json.loads((exits_dir / "exits.json").read_text())
    return {
        "exits": str(exits_dir),
        "mode": config.get("mode"),
        "epochs": config.get("epochs"),
        "f1_per_exit": [100 * float(x) for x in f1.mean(axis=1)],
        "full_f1": own_full,
        "full_f1_minus_reference": own_full - ref_full,
        "skim_head": {k: v for k, v in head.settings().items() if k != "tau"},
        "skim": {
            f"{t:g}": {
                "kept_share": float(np.mean(st["kept_share"])),
                "full_depth_f1": 100 * float(np.mean(np.asarray(st["f1"])[-1])),
            }
            for t, st in by_tau.items()
        },
        "calibrated": {
            mode: {
                "f1": c["f1"],
                "f1_loss": c["f1_loss"],
                "f1_loss_vs_reference": ref_full - c["f1"],
                "speedup_cost_model": c["speedup_cost_model"],
                "avg_layers": c["avg_layers"],
                "kept_token_share": c["kept_token_share"],
                "within_target_on_tuning_halves": c["within_target_on_tuning_halves"],
                "taus_chosen": [s["tau"] for s in c["settings"]],
            }
            for mode, c in cal.items()
        },
        "oracle_vs_reference": {
            "depth_only": oracle(reference_f1, depth, cost_full[-1]),
            "depth_width": oracle(reference_f1, {**depth, **skims}, cost_full[-1]),
            "depth_only_within_budget": budget_oracle(reference_f1, depth, cost_full[-1], max_f1_loss),
            "depth_width_within_budget": budget_oracle(
                reference_f1, {**depth, **skims}, cost_full[-1], max_f1_loss
            ),
        },
    }


def compare(
    reference: Path,
    exits_dirs: list[Path],
    layer: int,
    taus: list[float],
    questions: int | None = 1000,
    data_dir: Path | None = None,
    max_f1_loss: float = 1.0,
) -> dict[str, Any]:
    """The reference's record and every artifact's, on the same questions."""
    from elma_utils.early_exit.experiment import layerwise_dev_stats

    ref_f1 = np.asarray(layerwise_dev_stats(Path(reference), "1.1", questions, data_dir)["f1"])[-1]
    records = [
        recipe_record(Path(d), layer, taus, questions, ref_f1, data_dir, max_f1_loss)
        for d in [reference, *exits_dirs]
    ]
    return {
        "dev_set": "dev-v1.1",
        "questions": int(ref_f1.size),
        "skim_layer": int(layer),
        "taus": [float(t) for t in taus],
        "max_f1_loss": float(max_f1_loss),
        "reference": str(reference),
        "reference_full_f1": 100 * float(ref_f1.mean()),
        "speedups": "cost model: measured Keras batch-1 time per layer, later layers × kept share",
        "recipes": [{"name": Path(r["exits"]).name, **r} for r in records],  # the reference first
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per artifact: exits' F1, skimmed F1 per tau, calibrated points, oracle."""
    lines = [f"{result['questions']} dev-v1.1 questions, skim after layer {result['skim_layer']}; "
             f"reference full-depth F1 {result['reference_full_f1']:.2f}"]  # fmt: skip
    for r in result["recipes"]:
        name = r["name"]
        skim = ", ".join(
            f"{t}: kept {s['kept_share']:.2f} F1 {s['full_depth_f1']:.2f}" for t, s in r["skim"].items()
        )
        cal = "; ".join(
            f"{m} {c['speedup_cost_model']:.2f}× at −{c['f1_loss']:.2f} (vs reference −{c['f1_loss_vs_reference']:.2f})"
            for m, c in r["calibrated"].items()
        )
        o = r["oracle_vs_reference"]
        lines.append(
            f"{name}: exits {' '.join(f'{x:.1f}' for x in r['f1_per_exit'])} ({r['full_f1_minus_reference']:+.2f} "
            f"vs reference); skimmed {skim}; calibrated {cal}; oracle (zero loss / within budget) depth "
            f"{o['depth_only']['speedup']:.2f}× / {_bound(o['depth_only_within_budget'])}, depth + width "
            f"{o['depth_width']['speedup']:.2f}× / {_bound(o['depth_width_within_budget'])}"
        )
    return lines


def _bound(b: dict[str, Any]) -> str:
    return f"≤ {b['speedup_upper_bound']:.2f}×" if b.get("reachable") else "unreachable"


def main(argv: list[str] | None = None) -> int:
    from elma_utils.report import provenance
    from elma_utils.reporting import save_metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--reference", type=Path, required=True, help="exits artifact to measure against (distill)"
    )
    p.add_argument("--exits", type=Path, action="append", default=[], help="exits artifact (repeatable)")
    p.add_argument("--skim-layer", type=int, required=True, help="layer of the skim heads (adaptive/L<s>)")
    p.add_argument("--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS), help="keep thresholds")
    p.add_argument(
        "--questions", type=int, default=1000, help="dev-v1.1 questions, spread over every article"
    )
    p.add_argument("--max-f1-loss", type=float, default=1.0)
    p.add_argument(
        "--out-dir", type=Path, default=None, help="reports directory (metrics/); none: print only"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    try:
        taus = [float(t) for t in args.taus.split(",")]
    except ValueError:
        p.error(f"--taus takes comma-separated numbers, e.g. 0.6,0.7, not {args.taus!r}")
    for d in [args.reference, *args.exits]:
        if not (d / "exits.json").is_file():
            p.error(f"{d} is no exits artifact (no exits.json)")
        if not (d / "adaptive" / f"L{args.skim_layer}" / SKIM_FILE).is_file():
            p.error(f"{d} has no skim head for layer {args.skim_layer}: run python -m elma_utils.bench.adaptive_run "
                    f"--exits {d} --layers {args.skim_layer} first")  # fmt: skip
    result = compare(args.reference, args.exits, args.skim_layer, taus, args.questions, args.data_dir,
                     args.max_f1_loss)  # fmt: skip
    print("\n".join(summary_lines(result)))
    if args.out_dir is not None:
        used = sys.argv[1:] if argv is None else argv
        command = shlex.join(["python", "-m", "elma_utils.bench.exits_recipes", *used])
        result[provenance.KEY] = {**provenance.provenance(), "command": command}
        print(save_metrics(METRICS, result, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
