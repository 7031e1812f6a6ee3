"""Which edge bundle the pipeline deploys, and the statistics its runtime behaves like.

With adaptive width (the profile's ``skim_layers``), notebook 04 builds and calibrates an int8
bundle that skims the passage after one layer and exits early (``bench.adaptive_run``) and
records it under ``adaptive`` in its metrics; notebook 05 deploys that bundle. The system's
E_T is then chosen on the statistics of the *skimmed* model at the bundle's keep threshold, so
the offload decision is tuned on what the device computes, and priced at the width it runs
(``edge_layer_costs``). Without adaptive width (or for
another precision) it is the depth-only export of notebook 04 and the plain per-layer
statistics.

    python -m elma_utils.export.deployed_bundle [--profile cpu] [--precision int8]

prints the bundle a profile's pipeline deploys (what to give ``elma publish bundle``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from elma_utils import config, reporting
from elma_utils.early_exit.skim import SkimHead
from elma_utils.early_exit.skim_calibration import question_costs
from elma_utils.export.bundle import MANIFEST

RECORD = "04_edge_export_and_benchmark"  # the notebook whose metrics name the adaptive bundle
ADAPTIVE_PRECISION = "int8"  # the precision bench.adaptive_run exports


def depth_only_bundle(model_dir: Path, precision: str) -> Path:
    """Notebook 04's export of the exits model at ``precision`` (early exit, no skimming)."""
    return config.artifacts_dir() / f"{Path(model_dir).name}-edge" / precision


def deployed_bundle(model_dir: Path, precision: str, reports: Path | None = None) -> Path:
    """The adaptive bundle notebook 04 recorded (int8 only), else the depth-only export.

    Raises FileNotFoundError when notebook 04 has not run, or its adaptive bundle is gone."""
    record = reporting.earlier_metrics(RECORD, reports).get("adaptive") or {}
    if precision != ADAPTIVE_PRECISION or not record.get("bundle"):
        return depth_only_bundle(model_dir, precision)
    path = Path(record["bundle"])
    path = path if path.is_absolute() else config.PROJECT_ROOT / path
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{path}: the adaptive bundle notebook 04 recorded is missing: run notebooks/{RECORD}.ipynb again"
        )
    return path


def bundle_skim(bundle: Path) -> SkimHead | None:
    """The bundle's skim head with its keep rule, or None (a depth-only bundle)."""
    from elma_utils.edge.runtime import skim_from_manifest

    manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    return skim_from_manifest(Path(bundle), manifest)


def edge_layerwise_stats(
    exits_dir: Path, bundle: Path, version: str, n_questions: int | None, data_dir: Path | None = None
) -> dict:
    """Per-layer entropy / F1 of the float32 exits as ``bundle`` runs them: skimmed after the
    head's layer at the head's tau when the bundle skims (``skim_layerwise_dev_stats``), else
    ``layerwise_dev_stats``. Both are cached beside the exits."""
    from elma_utils.early_exit.experiment import layerwise_dev_stats
    from elma_utils.early_exit.skim_model import skim_layerwise_dev_stats

    head = bundle_skim(bundle)
    if head is None:
        return layerwise_dev_stats(exits_dir, version, n_questions, data_dir=data_dir)
    return skim_layerwise_dev_stats(exits_dir, head, version, [head.tau], n_questions, data_dir)[head.tau]


def edge_layer_costs(bundle: Path, stats: dict, layer_ms: list[float]) -> np.ndarray:
    """Per-layer cost of each question as ``bundle`` runs it: [K] for a depth-only bundle, [K, Q]
    when it skims (layers after the head's cost ``kept_share`` of their full-width time, the
    cost model of ``skim_calibration``), so the system's E_T sweep prices the width it saves."""
    cost = np.asarray(layer_ms, dtype=np.float64)
    head = bundle_skim(bundle)
    if head is None:
        return cost
    cumulative = question_costs(cost, np.asarray(stats["kept_share"]), head.layer)
    return np.diff(cumulative, axis=0, prepend=0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print the edge bundle a profile's pipeline deploys.")
    p.add_argument("--profile", default=None, help="pipeline profile (default: $ELMA_PROFILE or cpu)")
    p.add_argument("--precision", default=ADAPTIVE_PRECISION, choices=("float32", "float16", "int8"))
    args = p.parse_args(argv)
    try:
        profile = config.get_profile(args.profile)
        bundle = deployed_bundle(
            config.full_model_dir(profile), args.precision, config.reports_dir_for(profile.name)
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"deployed_bundle: {err}", file=sys.stderr)
        return 2
    if not (bundle / MANIFEST).is_file():
        print(f"deployed_bundle: {bundle} has no {MANIFEST}: run notebooks/{RECORD}.ipynb", file=sys.stderr)
        return 2
    print(bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
