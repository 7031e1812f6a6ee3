"""Could a better exit policy close the gap to the oracle? Policies screened on cached exits.

    python -m elma_utils.bench.exit_policy_screen --exits artifacts/minilm-cpu-exits-distill \\
        [--questions N] [--max-f1-loss 1] [--out-dir reports]

Within a 1-F1 budget the oracle (``early_exit.oracle``: the cheapest layer per question, chosen
knowing every layer's F1) leaves far more room than the entropy threshold uses. The oracle
knows which questions a layer already answers as well as the full model; a policy only sees
what the exits say. This screens what a policy could see, on the exits' per-layer statistics
of dev-v1.1 (``layerwise_dev_stats``, Keras float32, cached beside the exits), depth only:

- ``entropy``: exit at the first layer whose normalised span entropy ≤ E_T (ELMA's policy);
- ``patience``: exit once the answer span stayed the same for p consecutive layers (PABEE);
- ``learned``: per layer, a logistic regression on what the exits show up to that layer (the
  entropy, its minimum and change so far, whether the span agrees with the previous layer's
  and for how many layers) predicts "this layer already scores the full model's F1"; exit at
  the first layer whose probability ≥ a threshold.

Every policy is tuned on one half of the articles (the regression fitted and its threshold
chosen there: the cheapest within the budget) and measured on the other, and vice versa, the
protocol of ``experiment.cross_fitted_exit``. Speed-ups from the cost model (measured Keras
batch-1 time per layer, ``adaptive/latency.json``). Writes ``metrics/bench_exit_policy_screen.json``.
Seconds on cached statistics.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

METRICS = "bench_exit_policy_screen"
FEATURES = ("entropy", "min_entropy_so_far", "entropy_change", "span_agrees", "agreement_streak")


def layer_features(entropy: np.ndarray, span: np.ndarray) -> np.ndarray:
    """[K, Q, F] what a policy sees at each layer (see ``FEATURES``), from entropy [K, Q] and
    the answer span [K, Q, 2] of every exit."""
    entropy = np.asarray(entropy, dtype=np.float64)
    agrees = np.zeros_like(entropy)
    agrees[1:] = (np.asarray(span)[1:] == np.asarray(span)[:-1]).all(axis=-1)
    streak = np.zeros_like(entropy)
    for k in range(1, entropy.shape[0]):
        streak[k] = np.where(agrees[k] > 0, streak[k - 1] + 1, 0)
    change = np.diff(entropy, axis=0, prepend=entropy[:1])
    return np.stack([entropy, np.minimum.accumulate(entropy, axis=0), change, agrees, streak], axis=-1)


def first_exit(confident: np.ndarray) -> np.ndarray:
    """0-based exit layer per question: the first layer (before the last) marked ``confident``
    [K-1, Q], else the last."""
    k = confident.shape[0]
    hit = confident.any(axis=0)
    return np.where(hit, np.argmax(confident, axis=0), k)


def cheapest_within(
    scores: np.ndarray, f1: np.ndarray, cum_cost: np.ndarray, rows: np.ndarray, max_f1_loss: float
) -> float:
    """The threshold on ``scores`` [K-1, Q] (exit when ≥) with the least cost on ``rows`` whose F1
    stays within ``max_f1_loss`` of the full depth there (inf: never exit)."""
    target = 100 * f1[-1, rows].mean() - max_f1_loss
    best = (float(cum_cost[-1]), np.inf)
    for t in np.unique(scores[:, rows]):
        layers = first_exit(scores[:, rows] >= t)
        if 100 * f1[layers, rows].mean() >= target - 1e-9:
            best = min(best, (float(cum_cost[layers].mean()), float(t)))
    return best[1]


def _entropy_scores(stats: dict, feats: np.ndarray, tune: np.ndarray) -> np.ndarray:
    return -np.asarray(stats["entropy"])[:-1]


def _patience_scores(stats: dict, feats: np.ndarray, tune: np.ndarray) -> np.ndarray:
    return feats[:-1, :, FEATURES.index("agreement_streak")]


def _learned_scores(stats: dict, feats: np.ndarray, tune: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    f1 = np.asarray(stats["f1"])
    out = np.zeros(f1[:-1].shape)
    for k in range(f1.shape[0] - 1):
        target = f1[k] >= f1[-1] - 1e-9
        if target[tune].all() or not target[tune].any():  # one class: the layer always / never does
            out[k] = float(target[tune].all())
            continue
        model = LogisticRegression(max_iter=1000).fit(feats[k, tune], target[tune])
        out[k] = model.predict_proba(feats[k])[:, 1]
    return out


POLICIES: dict[str, Callable[[dict, np.ndarray, np.ndarray], np.ndarray]] = {
    "entropy": _entropy_scores,
    "patience": _patience_scores,
    "learned": _learned_scores,
}


def screen(stats: dict, titles: list[str], layer_ms: np.ndarray, embeddings_ms: float,
           max_f1_loss: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Held-out numbers per policy (cross-fitted over article halves) and the oracle bound."""
    from elma_utils.early_exit.oracle import oracle_exit_bound
    from elma_utils.early_exit.squad2 import held_out_folds

    f1 = np.asarray(stats["f1"], dtype=np.float64)
    k, n = f1.shape
    cum = float(embeddings_ms) + np.cumsum(np.asarray(layer_ms, dtype=np.float64))
    feats = layer_features(stats["entropy"], stats["span"])
    folds = held_out_folds(titles, 0)
    out: dict[str, Any] = {}
    for name, scores_of in POLICIES.items():
        layers, thresholds = np.full(n, k - 1), []
        for test in folds:
            tune = np.nonzero(~test)[0]
            scores = scores_of(stats, feats, ~test)
            t = cheapest_within(scores, f1, cum, tune, max_f1_loss)
            thresholds.append(t)
            layers[test] = first_exit(scores[:, test] >= t)
        got = f1[layers, np.arange(n)]
        out[name] = {
            "f1": 100 * float(got.mean()),
            "full_f1": 100 * float(f1[-1].mean()),
            "f1_loss": 100 * float(f1[-1].mean() - got.mean()),
            "speedup_cost_model": float(cum[-1] / cum[layers].mean()),
            "avg_layers": float(layers.mean() + 1),
            "thresholds": [None if not np.isfinite(t) else float(t) for t in thresholds],
        }
    bound = oracle_exit_bound(f1, max_f1_loss, layer_latency_ms=layer_ms, embeddings_ms=embeddings_ms)
    out["oracle_within_budget"] = {
        key: bound[key] for key in ("f1", "speedup_achieved", "speedup_upper_bound")
    }
    return out


def main(argv: list[str] | None = None) -> int:
    from elma_utils.bench.exits_recipes import cached_layer_latency
    from elma_utils.early_exit.experiment import dev_questions, layerwise_dev_stats
    from elma_utils.report import provenance
    from elma_utils.reporting import save_metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exits", type=Path, required=True, help="exits artifact")
    p.add_argument("--questions", type=int, default=None, help="dev-v1.1 questions (default: all)")
    p.add_argument("--max-f1-loss", type=float, default=1.0)
    p.add_argument(
        "--out-dir", type=Path, default=None, help="reports directory (metrics/); none: print only"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    if not (args.exits / "exits.json").is_file():
        p.error(f"{args.exits} is no exits artifact (no exits.json)")
    if args.max_f1_loss < 0:
        p.error("--max-f1-loss must be ≥ 0")
    stats = layerwise_dev_stats(args.exits, "1.1", args.questions, args.data_dir)
    titles = [e.title for e in dev_questions("1.1", args.questions, args.data_dir)[1]]
    lat = cached_layer_latency(args.exits)
    policies = screen(
        stats, titles, np.asarray(lat["layer_ms"]), float(lat["embeddings_ms"]), args.max_f1_loss
    )
    for name, r in policies.items():
        if "speedup_cost_model" in r:
            print(
                f"{name}: {r['speedup_cost_model']:.3f}× at −{r['f1_loss']:.2f} ({r['avg_layers']:.2f} layers)"
            )
    print(
        f"oracle within {args.max_f1_loss:g} F1: ≤ {policies['oracle_within_budget']['speedup_upper_bound']:.3f}×"
    )
    if args.out_dir is not None:
        used = sys.argv[1:] if argv is None else argv
        result = {
            "exits": str(args.exits), "dev_set": "dev-v1.1", "questions": len(titles), "features": list(FEATURES),
            "max_f1_loss": args.max_f1_loss, "policies": policies,
            provenance.KEY: {**provenance.provenance(),
                             "command": shlex.join(["python", "-m", "elma_utils.bench.exit_policy_screen", *used])},
        }  # fmt: skip
        print(save_metrics(METRICS, result, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
