"""``bench.exits_recipes`` in parts: each session measures the artifacts it could build.

    python -m elma_utils.bench.exits_recipes_parts --reference artifacts/minilm-cpu-exits-distill \\
        --exits artifacts/minilm-cpu-exits-joint_distill-1ep --exits artifacts/minilm-cpu-exits-skimtuned-L3 \\
        --skim-layer 3 --out-dir reports

On a 2-core machine that starts empty, the screen's artifacts take longer to build than one
session lasts (the model 52 min, 1-epoch joint self-distillation 70 min, skimming in the loop,
then about 15 min of measuring each). So every artifact named that exists here is measured now
and kept as a part, ``<out-dir>/parts/bench_exits_recipes/<name>.json``, with the commit and
command that made it. An artifact that is not here is taken from its part, but only when

- the part is current at HEAD (``report.freshness``: none of the code this command runs changed
  since the part's commit, and the part was made from a clean work tree),
- it was measured on the same questions, taus, skim layer and F1 budget, and
- against the same reference: the reference must be here every time, and its full-depth F1 on
  the questions must equal the part's. Training from scratch is deterministic (the same F1 on
  three fresh machines), so a rebuilt model is the same model; if it is not, the part is
  refused and must be measured again.

An artifact that is here is not measured again while its part is usable (``--remeasure`` forces
it). Once every artifact has a usable part, they are merged into
``metrics/bench_exits_recipes.json``: the ``exits_recipes`` format, each recipe with the
provenance of its part under ``measured_by``. Until then the command says which artifacts are
missing and writes no metrics file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.bench import exits_recipes as er
from elma_utils.early_exit.skim import SKIM_FILE

PARTS_DIR = Path("parts") / er.METRICS
REFERENCE_TOLERANCE = 1e-6  # F1 points: the same model scores the same, to float rounding


def part_path(out_dir: Path, exits_dir: Path) -> Path:
    """Where the part of ``exits_dir`` lives under ``out_dir`` (by the artifact's name)."""
    return Path(out_dir) / PARTS_DIR / f"{Path(exits_dir).name}.json"


def settings_of(record: dict[str, Any]) -> dict[str, Any]:
    """What two parts must share to be merged (the reference's F1 is checked apart)."""
    keys = ("dev_set", "questions", "skim_layer", "taus", "max_f1_loss", "reference")
    return {k: record[k] for k in keys}


def why_unusable(part: dict[str, Any], settings: dict[str, Any], reference_full_f1: float,
                 root: Path, package_dir: Path) -> str | None:  # fmt: skip
    """None when ``part`` may stand for its artifact in this run, else why not (one phrase)."""
    from elma_utils.report.freshness import judge_record

    if settings_of(part) != settings:
        return "it was measured with other settings " + json.dumps(settings_of(part), sort_keys=True)
    if abs(part["reference_full_f1"] - reference_full_f1) > REFERENCE_TOLERANCE:
        return (f"its reference scored {part['reference_full_f1']:.6f} F1, this one {reference_full_f1:.6f}: "
                "not the same model")  # fmt: skip
    verdict = judge_record(part, part["recipe"]["name"], root, package_dir)
    return None if verdict.current else verdict.describe()


def measure(exits_dir: Path, settings: dict[str, Any], questions: int, reference_f1: np.ndarray,
            data_dir: Path | None) -> dict[str, Any]:  # fmt: skip
    """A new part for ``exits_dir``: its ``exits_recipes`` record and what it was measured on."""
    record = er.recipe_record(exits_dir, settings["skim_layer"], settings["taus"], questions,
                              reference_f1, data_dir, settings["max_f1_loss"])  # fmt: skip
    return {**settings,
            "reference_full_f1": 100 * float(np.mean(reference_f1)),
            "recipe": {"name": Path(exits_dir).name, **record}}  # fmt: skip


def merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``exits_recipes`` result made of ``parts`` (the reference's first)."""
    first = parts[0]
    return {
        **settings_of(first),
        "reference_full_f1": first["reference_full_f1"],
        "speedups": "cost model: measured Keras batch-1 time per layer, later layers × kept share",
        "recipes": [{**p["recipe"], "measured_by": p["produced_by"]} for p in parts],
    }


def run(reference: Path, exits_dirs: list[Path], skim_layer: int, taus: list[float], questions: int,
        max_f1_loss: float, out_dir: Path, data_dir: Path | None, remeasure: bool,
        root: Path, package_dir: Path, command: str) -> tuple[dict[str, Any] | None, list[str]]:  # fmt: skip
    """(the merged result or None, what was done or is missing, one line each)."""
    from elma_utils.atomic_files import write_bytes_atomic
    from elma_utils.early_exit.experiment import layerwise_dev_stats
    from elma_utils.report import provenance
    from elma_utils.reporting import project_relative, to_jsonable

    ref_f1 = np.asarray(layerwise_dev_stats(Path(reference), "1.1", questions, data_dir)["f1"])[-1]
    reference_full_f1 = 100 * float(ref_f1.mean())
    settings = {"dev_set": "dev-v1.1", "questions": int(ref_f1.size), "skim_layer": int(skim_layer),
                "taus": [float(t) for t in taus], "max_f1_loss": float(max_f1_loss),
                "reference": str(project_relative(str(reference), root))}  # fmt: skip
    parts, lines = [], [f"reference {Path(reference).name}: full-depth F1 {reference_full_f1:.4f} on "
                        f"{settings['questions']} dev-v1.1 questions"]  # fmt: skip
    for d in [Path(reference), *map(Path, exits_dirs)]:
        path = part_path(out_dir, d)
        part = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        why = (
            "there is none"
            if part is None
            else why_unusable(part, settings, reference_full_f1, root, package_dir)
        )
        here = (d / "exits.json").is_file()
        has_head = (d / "adaptive" / f"L{skim_layer}" / SKIM_FILE).is_file()
        if why is None and not (remeasure and here and has_head):
            parts.append(part)
            lines.append(f"{d.name}: kept its part ({part['produced_by']['commit'][:7]})")
        elif here and not has_head:
            lines.append(f"{d.name}: MISSING: it has no skim head for layer {skim_layer} and its part is unusable "
                         f"({why}); run python -m elma_utils.bench.adaptive_run --exits {d} --layers {skim_layer} "
                         "(its skim head stage) and this command again")  # fmt: skip
        elif here:
            part = measure(d, settings, questions, ref_f1, data_dir)
            part[provenance.KEY] = {**provenance.provenance(root=root), "command": command}
            text = json.dumps(project_relative(to_jsonable(part), root), indent=2, sort_keys=True) + "\n"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, text.encode("utf-8"))
            parts.append(part)
            lines.append(f"{d.name}: measured now, part written to {path}")
        else:
            lines.append(f"{d.name}: MISSING: not here and its part is unusable ({why}); build it here and run "
                         "this command again")  # fmt: skip
    return (merged(parts) if len(parts) == 1 + len(exits_dirs) else None), lines


def main(argv: list[str] | None = None) -> int:
    from elma_utils import config
    from elma_utils.reporting import save_metrics

    p = argparse.ArgumentParser(prog="python -m elma_utils.bench.exits_recipes_parts",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--reference", type=Path, required=True, help="exits artifact to measure against (here)")
    p.add_argument("--exits", type=Path, action="append", default=[], help="exits artifact (repeatable)")
    p.add_argument("--skim-layer", type=int, required=True, help="layer of the skim heads (adaptive/L<s>)")
    p.add_argument("--taus", default=",".join(f"{t:g}" for t in er.DEFAULT_TAUS), help="keep thresholds")
    p.add_argument(
        "--questions", type=int, default=1000, help="dev-v1.1 questions, spread over every article"
    )
    p.add_argument("--max-f1-loss", type=float, default=1.0)
    p.add_argument("--out-dir", type=Path, default=config.PROJECT_ROOT / "reports",
                   help="reports directory: parts/ and metrics/")  # fmt: skip
    p.add_argument("--remeasure", action="store_true", help="measure every artifact that is here again")
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    try:
        taus = [float(t) for t in args.taus.split(",")]
    except ValueError:
        p.error(f"--taus takes comma-separated numbers, e.g. 0.6,0.7, not {args.taus!r}")
    if not (args.reference / "exits.json").is_file():
        p.error(f"the reference {args.reference} must be here (no exits.json): build it first")
    names = [d.name for d in [args.reference, *args.exits]]
    if len(set(names)) != len(names):
        p.error(f"two artifacts share a name, so their parts would too: {names}")
    used = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "elma_utils.bench.exits_recipes_parts", *used])
    root = config.PROJECT_ROOT
    result, lines = run(args.reference, args.exits, args.skim_layer, taus, args.questions, args.max_f1_loss,
                        args.out_dir, args.data_dir, args.remeasure, root, root / "elma_utils", command)  # fmt: skip
    print("\n".join(lines))
    if result is None:
        print("not every artifact has a usable part yet: no metrics file written", file=sys.stderr)
        return 1
    print("\n".join(er.summary_lines(result)))
    from elma_utils.report import provenance

    result[provenance.KEY] = {**provenance.provenance(root=root), "command": command}
    print(save_metrics(er.METRICS, result, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
