"""What the adaptive benchmark's per-layer answers say beyond its four measured runs.

From the two full-compute runs (every layer, without and with skimming) every question has
an answer, an entropy and a measured cumulative cost at every layer, so:

- ``oracle``: per question the cheapest (layer, width) whose answer scores at least the full
  model's F1 — no exit or skim policy on this bundle can do better at zero F1 loss;
- ``budget_oracle``: the same options under the issue's budget (mean F1 ≥ full − 1): the
  Lagrangian bound of ``early_exit.oracle``, above which no policy on this bundle can go;
- ``entropy_frontier``: replaying E_T over those per-layer entropies gives the F1 / speed-up
  curve of depth-only (no skim) and depth+width (skim);
- ``plot_frontier`` and ``markdown_table`` put the measured points, the curves and published
  numbers (marked "from the paper") side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.early_exit.calibration import default_thresholds
from elma_utils.early_exit.policies import EntropyPolicy, simulate_exits

# Numbers from the papers' abstracts (not measured here; different models, tasks and hardware).
PUBLISHED = [
    {"method": "Block-Skim (Guan et al., AAAI 2022, arXiv 2112.08560)", "kind": "width (skim blocks)",
     "model": "BERT-base", "task": "SQuAD and other extractive QA", "speedup": "3×",
     "quality": "accuracy improves over the full-size model", "source": "from the paper (abstract)"},
    {"method": "LTP, learned token pruning (Kim et al., KDD 2022, arXiv 2107.00910)", "kind": "width (tokens)",
     "model": "RoBERTa-base", "task": "GLUE and SQuAD",
     "speedup": "up to 2.1× FLOPs; up to 1.9× throughput (Intel Haswell CPU), 2.0× (V100)",
     "quality": "< 1% accuracy drop", "source": "from the paper (abstract)"},
    {"method": "DeeBERT (Xin et al., ACL 2020)", "kind": "depth (entropy exits)", "model": "BERT-base, RoBERTa",
     "task": "GLUE", "speedup": "up to ~40% inference time saved (≈1.7×)",
     "quality": "minimal degradation", "source": "from the paper (abstract)"},
    {"method": "PABEE (Zhou et al., NeurIPS 2020)", "kind": "depth (patience exits)", "model": "ALBERT",
     "task": "GLUE", "speedup": "no single figure in the abstract (speed-accuracy curves in the paper)",
     "quality": "better accuracy-speed trade-off than earlier exits", "source": "from the paper (abstract)"},
]  # fmt: skip


def cumulative_ms(embeddings_ms: float, layer_ms: list[float]) -> np.ndarray:
    """Cost of stopping after layer k (1-based index k - 1): embeddings + layers 1..k."""
    return float(embeddings_ms) + np.cumsum(np.asarray(layer_ms, dtype=np.float64))


def oracle(
    full_f1: np.ndarray, tables: dict[str, tuple[np.ndarray, np.ndarray]], full_cost: np.ndarray
) -> dict[str, Any]:
    """The cheapest option per question whose F1 ≥ its full-model F1 (else full compute).

    ``tables``: {name: (per-layer F1 [K, Q] in 0..1, cumulative cost [K, Q] in ms)}, e.g.
    {"full width": …, "skim": …}; ``full_cost`` [Q] the full model's cost per question."""
    full_f1 = np.asarray(full_f1, dtype=np.float64)
    best_cost = np.asarray(full_cost, dtype=np.float64).copy()
    best_f1 = full_f1.copy()
    layer = np.full(full_f1.size, -1)
    source = np.array(["full"] * full_f1.size, dtype=object)
    for name, (f1, cost) in tables.items():
        f1, cost = np.asarray(f1, dtype=np.float64), np.asarray(cost, dtype=np.float64)
        ok = f1 >= full_f1[None, :] - 1e-9
        c = np.where(ok, cost, np.inf)
        k = np.argmin(c, axis=0)
        cheapest = c[k, np.arange(full_f1.size)]
        better = cheapest < best_cost
        best_cost = np.where(better, cheapest, best_cost)
        best_f1 = np.where(better, f1[k, np.arange(full_f1.size)], best_f1)
        layer = np.where(better, k + 1, layer)
        source[better] = name
    k_layers = next(iter(tables.values()))[0].shape[0]
    layer = np.where(layer < 0, k_layers, layer)
    return {
        "speedup": float(np.sum(full_cost) / np.sum(best_cost)),
        "f1": float(100 * best_f1.mean()),
        "avg_layers": float(layer.mean()),
        "share_by_option": {str(s): float(np.mean(source == s)) for s in sorted(set(source.tolist()))},
    }


def budget_oracle(
    full_f1: np.ndarray,
    tables: dict[str, tuple[np.ndarray, np.ndarray]],
    full_cost: np.ndarray,
    max_f1_loss: float = 1.0,
) -> dict[str, Any]:
    """``oracle``'s options (every layer of every table) with mean F1 ≥ the full model's −
    ``max_f1_loss`` instead of per-question F1 ≥ the full model's: ``speedup_upper_bound`` is
    what no policy choosing among these options can beat, ``speedup_achieved`` an assignment
    that meets the budget (``early_exit.oracle.oracle_option_bound``)."""
    from elma_utils.early_exit.oracle import oracle_option_bound

    full_f1 = np.asarray(full_f1, dtype=np.float64)
    f1 = np.concatenate([np.asarray(t[0], dtype=np.float64) for t in tables.values()])
    cost = np.concatenate([np.asarray(t[1], dtype=np.float64) for t in tables.values()])
    out = oracle_option_bound(f1, cost, 100 * float(full_f1.mean()), max_f1_loss, full_cost=full_cost)
    out.pop("options", None)
    return out


def entropy_frontier(
    per_layer_f1: np.ndarray, per_layer_entropy: np.ndarray, cost: np.ndarray, full_cost: np.ndarray
) -> list[dict[str, float]]:
    """(E_T, F1 %, speed-up) for an E_T sweep replayed on per-layer answers [K, Q]."""
    f1 = np.asarray(per_layer_f1, dtype=np.float64)
    entropy = np.asarray(per_layer_entropy, dtype=np.float64)
    k, q = f1.shape
    points = []
    for e_t in default_thresholds(entropy, 41):
        layers = np.minimum(simulate_exits(entropy, None, EntropyPolicy(float(e_t))), k) - 1
        points.append({
            "E_T": float(e_t),
            "f1": float(100 * f1[layers, np.arange(q)].mean()),
            "speedup": float(np.sum(full_cost) / np.sum(cost[layers, np.arange(q)])),
        })  # fmt: skip
    return points


FIGURE_NAME = "bench_adaptive_dev-v{version}.png"
ZOOM_BELOW_FULL_F1 = 3.0  # the right panel's F1 range: full F1 - 3 .. full F1 + 1 (the budget region)


def plot_frontier(dev: dict[str, Any], title: str):
    """F1 against measured speed-up: depth-only and depth+width curves, the measured runs,
    the chosen (adaptive) point starred, the full model and the 1-F1 budget line. Left: the
    whole E_T sweep; right: the same zoomed on the budget region, where the choice is made."""
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes, mark_operating_point

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for key, label, color in (("depth_only", "depth only", "C0"), ("both", "depth + width", "C2")):
            pts = dev.get("frontier", {}).get(key, [])
            if not pts:
                continue
            x, y = np.array([p["speedup"] for p in pts]), np.array([p["f1"] for p in pts])
            ax.scatter(x, y, s=6, color=color, alpha=0.35)
            ex, ey = pareto(x, y)
            ax.plot(ex, ey, lw=1.2, color=color, drawstyle="steps-pre",
                    label=f"{label}: E_T sweep (best F1 at ≥ speed-up)")  # fmt: skip
        markers = {"full": ("k", "o", "full depth and width"), "depth_only": ("C0", "s", "depth only (measured)"),
                   "width_only": ("C1", "^", "width only (measured)")}  # fmt: skip
        for key, (color, marker, label) in markers.items():
            m = dev[key]
            ax.plot([m["speedup"]], [m["f1"]], marker=marker, color=color, ls="none", ms=7, label=label)
        ax.axhline(dev["full_f1"] - 1.0, color="k", ls="--", lw=0.8, label="full F1 − 1 (the budget)")
        if zoom:
            ax.set_ylim(dev["full_f1"] - ZOOM_BELOW_FULL_F1, dev["full_f1"] + 1.0)
            measured = [dev[k]["speedup"] for k in ("full", "depth_only", "width_only")] + [dev["speedup"]]
            ax.set_xlim(0.97, max(measured) * 1.35)
        mark_operating_point(ax, dev["speedup"], dev["f1"],
                             f"depth + width ({dev['speedup']:.2f}×, F1 {dev['f1']:.1f})", legend=zoom)  # fmt: skip
        finish_axes(ax, "zoomed on the budget region" if zoom else "the whole E_T sweep",
                    "speed-up over full depth and width (×, batch 1)", "F1 (%, official SQuAD scoring)",
                    fontsize=10)  # fmt: skip
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{title}: QA-model wall clock", fontsize=11)
    fig.tight_layout()
    return fig


def save_frontier_figure(dev: dict[str, Any], name: str, precision: str, figures_dir: Path) -> Path:
    """``plot_frontier`` of one dev set (``name``: "dev-v1.1") as ``FIGURE_NAME`` in ``figures_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_frontier(dev, f"Adaptive compute on the edge, {name} ({precision}, batch 1)")
    path = Path(figures_dir) / FIGURE_NAME.format(version=name.removeprefix("dev-v"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def replot(result: dict[str, Any], figures_dir: Path) -> list[Path]:
    """The frontier figures again from a benchmark json (its curves and measured points), for a
    figure whose drawing code changed after the measurement; returns the files written."""
    return [
        save_frontier_figure(dev, name, result["precision"], figures_dir)
        for name, dev in result["dev_sets"].items()
    ]


def pareto(speedup: np.ndarray, f1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The upper envelope: for each speed-up, the best F1 reached at that speed-up or more."""
    order = np.argsort(-np.asarray(speedup), kind="stable")
    x, y = np.asarray(speedup)[order], np.maximum.accumulate(np.asarray(f1)[order])
    return x[::-1], y[::-1]


def markdown_table(result: dict[str, Any]) -> str:
    """Our measured rows per dev set, then the published numbers, each row labelled."""
    lines = [
        "| method | dev set | speed-up | F1 | F1 loss | avg layers | kept tokens | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, dev in result["dev_sets"].items():
        rows = [("full depth and width", dev["full"]), ("depth only (early exit)", dev["depth_only"]),
                ("width only (skim)", dev["width_only"]), ("depth + width (ELMA adaptive)", dev)]  # fmt: skip
        for label, m in rows:
            lines.append(
                f"| {label} | {name} | {m['speedup']:.2f}× | {m['f1']:.2f} | {m['f1_loss']:.2f} | "
                f"{m['avg_layers']:.2f} | {m['kept_token_share']:.2f} | measured here ({result['precision']} bundle) |"
            )
        for label, key in (("oracle, depth only", "depth_only"), ("oracle, depth + width", "depth_width")):
            o = dev["oracle"][key]
            lines.append(f"| {label} | {name} | {o['speedup']:.2f}× | {o['f1']:.2f} | ≤ 0 | {o['avg_layers']:.2f} | – | "
                         "bound from measured per-layer answers |")  # fmt: skip
            b = dev["oracle"].get(f"{key}_within_budget")
            if b and b.get("reachable"):
                lines.append(f"| {label}, ≤ {b['max_f1_loss']:g} F1 | {name} | ≤ {b['speedup_upper_bound']:.2f}× | "
                             f"{b['f1']:.2f} | ≤ {b['max_f1_loss']:g} | – | – | Lagrangian bound, same answers |")  # fmt: skip
    lines += [
        "",
        "| published method | kind | model | task | speed-up | quality | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in PUBLISHED:
        lines.append(
            f"| {p['method']} | {p['kind']} | {p['model']} | {p['task']} | {p['speedup']} | {p['quality']} | {p['source']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m elma_utils.bench.adaptive_report BENCH_JSON --figures-dir DIR``: draw the
    frontier figures again from the measured json; the json records who drew them."""
    import argparse
    import json

    from elma_utils.atomic_files import write_json_atomic
    from elma_utils.report.provenance import provenance

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("bench_json", type=Path, help="reports/metrics/bench_adaptive.json")
    p.add_argument("--figures-dir", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        result = json.loads(args.bench_json.read_text())
        result["dev_sets"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        p.error(f"{args.bench_json}: not a bench.adaptive result ({err})")
    paths = replot(result, args.figures_dir)
    result["figures_produced_by"] = provenance()
    write_json_atomic(args.bench_json, result)
    print("\n".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
