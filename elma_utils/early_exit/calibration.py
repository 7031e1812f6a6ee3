"""Choose the exit threshold E_T on held-out questions, and show the trade-off.

Input: what every exit layer would have answered for each held-out question (per-question
F1 in 0..1 as ``[K, N]``), the span entropies ``[K, N]``, and what a layer costs. For every
threshold the exits are replayed (``simulate_exits``) and scored: a question that exits at
layer k gets layer k's F1; one that never exits gets the server's answer (``offload_f1``)
when there is a server, else the last layer's. ``choose_threshold`` then takes the
cheapest threshold whose F1 is at most ``max_f1_loss`` points below the reference (the
same model at full depth). F1 values in the sweep are in percent, as the official scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from elma_utils.early_exit.entropy import aggregate_by_example, answer_space, span_entropy
from elma_utils.early_exit.policies import NO_SPAN, EntropyPolicy, simulate_exits


@dataclass
class ThresholdSweep:
    """One row per policy setting (``values``): quality and cost of the replayed exits."""

    parameter: str  # "threshold" (entropy E_T) or "patience"
    values: np.ndarray  # [T]
    f1: np.ndarray  # [T] percent
    avg_exit_layer: np.ndarray  # [T] edge layers computed per question (offloaded: K)
    share_offloaded: np.ndarray  # [T] share of questions no layer decided for
    expected_latency: np.ndarray  # [T] per question, in ``cost_unit``
    speedup: np.ndarray  # [T] full_depth_latency / expected_latency
    exit_layers: np.ndarray  # [T, N] 1..K, K + 1 = not solved on the edge
    reference_f1: float  # percent
    full_depth_latency: float
    num_layers: int
    cost_unit: str  # "ms" or "layers"
    offloading: bool  # True when non-exits go to a server (offload_f1 given)

    @property
    def thresholds(self) -> np.ndarray:
        return self.values

    def __len__(self) -> int:
        return len(self.values)

    def point(self, index: int) -> SweepPoint:
        i = int(index)
        return SweepPoint(
            index=i,
            value=float(self.values[i]),
            f1=float(self.f1[i]),
            f1_loss=float(self.reference_f1 - self.f1[i]),
            avg_exit_layer=float(self.avg_exit_layer[i]),
            share_offloaded=float(self.share_offloaded[i]),
            expected_latency=float(self.expected_latency[i]),
            speedup=float(self.speedup[i]),
        )

    def rows(self) -> list[dict]:
        """The table as JSON-ready dicts (for ``reporting.save_metrics`` or a DataFrame)."""
        return [asdict(self.point(i)) for i in range(len(self))]

    def summary(self) -> dict[str, Any]:
        return {
            "parameter": self.parameter,
            "reference_f1": float(self.reference_f1),
            "full_depth_latency": float(self.full_depth_latency),
            "num_layers": int(self.num_layers),
            "cost_unit": self.cost_unit,
            "offloading": bool(self.offloading),
            "rows": self.rows(),
        }


@dataclass
class SweepPoint:
    """One row of a sweep (the chosen threshold, typically)."""

    index: int
    value: float
    f1: float
    f1_loss: float
    avg_exit_layer: float
    share_offloaded: float
    expected_latency: float
    speedup: float


def default_thresholds(per_layer_entropy: np.ndarray, n: int = 101) -> np.ndarray:
    """A 0..1 grid plus entropy quantiles, so that clustered low entropies are resolved too."""
    h = np.asarray(per_layer_entropy, dtype=np.float64)
    h = h[np.isfinite(h)]
    extra = np.quantile(h, np.linspace(0, 1, 2 * n - 1)) if h.size else np.empty(0)
    return np.unique(np.concatenate([np.linspace(0.0, 1.0, n), extra]))


def sweep_thresholds(
    per_layer_f1: np.ndarray,
    per_layer_entropy: np.ndarray,
    layer_latency_ms: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
    offload_f1: np.ndarray | None = None,
    offload_latency_ms: float | np.ndarray = 0.0,
    cumulative: bool = False,
    base_latency_ms: float = 0.0,
    reference_f1: float | None = None,
    full_depth_latency_ms: float | None = None,
    per_layer_null_diff: np.ndarray | None = None,
    null_threshold: float = 0.0,
    no_answer_margin: float | None = None,
) -> ThresholdSweep:
    """Replay the entropy policy for every threshold and score it.

    ``layer_latency_ms`` [K]: cost of layer k with its exit head (``cumulative=True``: cost
    of layers 1..k); None counts layers. ``base_latency_ms``: embeddings etc., paid by every
    question. With ``offload_f1`` [N], non-exits pay all K edge layers plus
    ``offload_latency_ms`` and get the server's F1. ``reference_f1`` (percent) defaults to
    the server's F1 when offloading, else the last layer's; ``full_depth_latency_ms`` to the
    cost of all K edge layers. For SQuAD 2.0 pass ``per_layer_null_diff`` with
    ``no_answer_margin`` so that exits need a settled no-answer call.
    """
    entropy = np.asarray(per_layer_entropy, dtype=np.float64)
    if entropy.shape != np.shape(per_layer_f1):
        raise ValueError(
            f"per_layer_entropy {entropy.shape} and per_layer_f1 {np.shape(per_layer_f1)} differ"
        )
    thresholds = default_thresholds(entropy) if thresholds is None else np.asarray(thresholds, dtype=float)
    policies = [
        EntropyPolicy(float(t), no_answer_margin=no_answer_margin, null_threshold=null_threshold)
        for t in thresholds
    ]
    exits = (
        np.stack([simulate_exits(entropy, None, p, per_layer_null_diff) for p in policies])
        if len(policies)
        else np.empty((0, entropy.shape[1]), dtype=int)
    )
    return sweep_exit_layers(
        "threshold",
        thresholds,
        exits,
        per_layer_f1,
        layer_latency_ms=layer_latency_ms,
        offload_f1=offload_f1,
        offload_latency_ms=offload_latency_ms,
        cumulative=cumulative,
        base_latency_ms=base_latency_ms,
        reference_f1=reference_f1,
        full_depth_latency_ms=full_depth_latency_ms,
    )


def sweep_exit_layers(
    parameter: str,
    values: Sequence[float] | np.ndarray,
    exit_layers: np.ndarray,
    per_layer_f1: np.ndarray,
    layer_latency_ms: np.ndarray | None = None,
    offload_f1: np.ndarray | None = None,
    offload_latency_ms: float | np.ndarray = 0.0,
    cumulative: bool = False,
    base_latency_ms: float = 0.0,
    reference_f1: float | None = None,
    full_depth_latency_ms: float | None = None,
) -> ThresholdSweep:
    """Score given exit layers [T, N] (from any policy: e.g. patience 1..K via ``simulate_exits``).

    ``layer_latency_ms`` may be [K] (every question pays the same) or [K, N] (each question its
    own, e.g. a skimmed model's later layers scaled by the share of tokens it kept)."""
    f1 = _checked_f1(per_layer_f1)
    k_layers, n = f1.shape
    exits = np.asarray(exit_layers, dtype=np.int64)
    if exits.ndim != 2 or exits.shape != (len(values), n):
        raise ValueError(f"exit_layers must be [T, N] = ({len(values)}, {n}), got {exits.shape}")
    if exits.size and (exits.min() < 1 or exits.max() > k_layers + 1):
        raise ValueError(f"exit layers must lie in 1..{k_layers + 1}")
    server_f1 = None if offload_f1 is None else _checked_vector(offload_f1, n, "offload_f1")
    cum = _cumulative_cost(layer_latency_ms, k_layers, cumulative, n) + float(base_latency_ms)
    offload_cost = np.broadcast_to(np.asarray(offload_latency_ms, dtype=np.float64), (n,))
    if reference_f1 is None:
        reference_f1 = 100.0 * float(np.mean(server_f1 if server_f1 is not None else f1[-1]))
    full = float(np.mean(cum[-1])) if full_depth_latency_ms is None else float(full_depth_latency_ms)

    done = exits <= k_layers
    layers = np.minimum(exits, k_layers)
    scored = np.take_along_axis(f1, layers - 1, axis=0) if exits.size else np.empty((0, n))
    if server_f1 is not None:
        scored = np.where(done, scored, server_f1[None, :])
    paid = cum[layers - 1] if cum.ndim == 1 else cum[layers - 1, np.arange(n)[None, :]]
    latency = paid + (np.where(done, 0.0, offload_cost[None, :]) if server_f1 is not None else 0.0)
    mean_latency = latency.mean(axis=1) if n else np.zeros(len(exits))
    return ThresholdSweep(
        parameter=parameter,
        values=np.asarray(values, dtype=np.float64),
        f1=100.0 * scored.mean(axis=1),
        avg_exit_layer=layers.mean(axis=1),
        share_offloaded=1.0 - done.mean(axis=1),
        expected_latency=mean_latency,
        speedup=full / np.maximum(mean_latency, 1e-12),
        exit_layers=exits,
        reference_f1=float(reference_f1),
        full_depth_latency=full,
        num_layers=k_layers,
        cost_unit="layers" if layer_latency_ms is None else "ms",
        offloading=server_f1 is not None,
    )


def _checked_f1(per_layer_f1: np.ndarray) -> np.ndarray:
    f1 = np.asarray(per_layer_f1, dtype=np.float64)
    if f1.ndim != 2 or f1.shape[0] < 1 or f1.shape[1] < 1:
        raise ValueError(f"per_layer_f1 must be [K, N] with K, N ≥ 1, got shape {f1.shape}")
    if np.nanmax(f1) > 1.0 + 1e-9 or np.nanmin(f1) < 0.0 or np.isnan(f1).any():
        raise ValueError("per_layer_f1 must hold per-question F1 in 0..1 (not percent), without NaN")
    return f1


def _checked_vector(values: np.ndarray, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
    if np.isnan(v).any() or v.min() < 0.0 or v.max() > 1.0 + 1e-9:
        raise ValueError(f"{name} must hold per-question F1 in 0..1 (not percent), without NaN")
    return v


def _cumulative_cost(
    layer_latency_ms: np.ndarray | None, k_layers: int, cumulative: bool, n: int | None = None
) -> np.ndarray:
    """Cost of layers 1..k: [K], or [K, N] when ``layer_latency_ms`` is per question."""
    if layer_latency_ms is None:
        return np.arange(1, k_layers + 1, dtype=np.float64)
    cost = np.asarray(layer_latency_ms, dtype=np.float64)
    if cost.shape not in {(k_layers,), (k_layers, n)} or not np.isfinite(cost).all() or (cost < 0).any():
        raise ValueError(
            f"layer latencies must be {k_layers} finite values ≥ 0 (or [{k_layers}, {n}] per question), "
            f"got shape {cost.shape}"
        )
    cum = cost if cumulative else np.cumsum(cost, axis=0)
    if np.any(np.diff(cum, axis=0) < 0):
        raise ValueError("cumulative layer latencies must not decrease")
    return cum


def choose_threshold(sweep: ThresholdSweep, max_f1_loss: float = 1.0) -> SweepPoint:
    """The cheapest setting whose F1 ≥ reference − ``max_f1_loss`` (points of F1).

    Ties in cost go to the higher F1, then to the smaller threshold (the safer one).
    Raises ValueError when no setting is good enough.
    """
    if not max_f1_loss >= 0:
        raise ValueError(f"max_f1_loss must be ≥ 0, got {max_f1_loss}")
    target = sweep.reference_f1 - max_f1_loss
    ok = np.nonzero(sweep.f1 >= target - 1e-9)[0]
    if ok.size == 0:
        best = int(np.argmax(sweep.f1)) if len(sweep) else None
        got = "no setting was swept" if best is None else f"the best reaches {sweep.f1[best]:.2f}"
        raise ValueError(
            f"no {sweep.parameter} keeps F1 within {max_f1_loss} of the reference "
            f"{sweep.reference_f1:.2f} (needs ≥ {target:.2f}); {got}"
        )
    order = np.lexsort((sweep.values[ok], -sweep.f1[ok], sweep.expected_latency[ok]))
    return sweep.point(int(ok[order[0]]))


def layerwise_question_stats(
    examples: Sequence[Any],
    features: Any,
    per_layer_start: np.ndarray,
    per_layer_end: np.ndarray,
    dataset: Any,
    version: str,
    null_threshold: float | None = None,
    rule: str = "max",
    include_cls: bool = True,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> dict[str, Any]:
    """Per layer and question: span entropy, answer span, null margin, F1 — the sweep's input.

    ``per_layer_start/end`` are [K, N_windows, L] exit logits for ``features``. Entropy is
    the max over a question's windows (every window must be sure). Spans are character
    offsets, ``NO_SPAN`` for a predicted no-answer. Returns arrays ``entropy``, ``null_diff``,
    ``f1``, ``exact`` [K, Q], ``span`` [K, Q, 2] and ``predictions`` (list per layer).
    """
    from elma_utils.squad.metrics import per_question_scores
    from elma_utils.squad.postprocess import predict_answers

    start, end = np.asarray(per_layer_start), np.asarray(per_layer_end)
    if start.ndim != 3 or start.shape != end.shape:
        raise ValueError(f"per-layer logits must both be [K, N, L], got {start.shape} and {end.shape}")
    k_layers, q = start.shape[0], len(examples)
    mask = answer_space(features, include_cls, length=start.shape[2])
    out = {k: np.zeros((k_layers, q)) for k in ("entropy", "null_diff", "f1", "exact")}
    span = np.zeros((k_layers, q, 2), dtype=np.int64)
    predictions = []
    for k in range(k_layers):  # one layer at a time: float64 copies of [K, N, L] would not fit
        h = span_entropy(start[k], end[k], mask, rule, n_best, max_answer_len)
        out["entropy"][k] = aggregate_by_example(h, features.example_index, "max", q)
        preds = predict_answers(examples, features, start[k], end[k], null_threshold, n_best, max_answer_len)
        answers = {e.qas_id: p.text for e, p in zip(examples, preds, strict=True)}
        scores = per_question_scores(dataset, answers, version)
        if k == 0 and not answers.keys() <= scores.keys():
            raise ValueError(
                "some examples are not questions of `dataset` (score them against their own file)"
            )
        for i, (e, p) in enumerate(zip(examples, preds, strict=True)):
            out["exact"][k, i], out["f1"][k, i] = scores[e.qas_id]
            out["null_diff"][k, i] = p.null_score_diff
            span[k, i] = NO_SPAN if p.no_answer or p.char_start < 0 else (p.char_start, p.char_end)
        predictions.append(preds)
    return {"span": span, "predictions": predictions, **out}


# ---------------------------------------------------------------- plots


def plot_f1_vs_exit_layer(
    sweep: ThresholdSweep, chosen: SweepPoint | int | None = None, max_f1_loss=None, title: str | None = None
):
    """F1 against the average number of edge layers computed, one point per threshold."""
    return _tradeoff_plot(
        sweep,
        sweep.avg_exit_layer,
        "average exit layer (edge layers computed per question)",
        chosen,
        max_f1_loss,
        title or f"F1 against depth on the edge ({_parameter_name(sweep)} sweep)",
    )


def plot_f1_vs_latency(
    sweep: ThresholdSweep, chosen: SweepPoint | int | None = None, max_f1_loss=None, title: str | None = None
):
    """F1 against the expected latency per question."""
    label = f"expected latency per question ({sweep.cost_unit})"
    title = title or f"F1 against expected latency ({_parameter_name(sweep)} sweep)"
    return _tradeoff_plot(sweep, sweep.expected_latency, label, chosen, max_f1_loss, title)


def _parameter_name(sweep) -> str:
    return "E_T" if sweep.parameter == "threshold" else sweep.parameter


def _tradeoff_plot(sweep, x, xlabel: str, chosen, max_f1_loss, title: str):
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes, mark_operating_point

    fig, ax = plt.subplots(figsize=(6, 3.6))
    order = np.argsort(x, kind="stable")
    ax.plot(x[order], sweep.f1[order], marker="o", ms=2.5, lw=1, label=f"{_parameter_name(sweep)} sweep")
    ax.axhline(sweep.reference_f1, color="k", lw=1, label=f"reference F1 {sweep.reference_f1:.1f}")
    if max_f1_loss is not None:
        ax.axhline(sweep.reference_f1 - max_f1_loss, color="k", ls="--", lw=1, label=f"−{max_f1_loss} F1")
    if chosen is not None:
        p = chosen if isinstance(chosen, SweepPoint) else sweep.point(chosen)
        mark_operating_point(
            ax, x[p.index], p.f1, f"{_parameter_name(sweep)} = {p.value:.3g}, F1 {p.f1:.1f}, {p.speedup:.2f}×"
        )
    finish_axes(ax, title, xlabel, "F1 (%, official SQuAD scoring)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_exit_histogram(
    exit_layers: np.ndarray, num_layers: int, title: str | None = None, no_exit_label: str = "server"
):
    """Questions per exit layer, each bar with its count; the last bar (K + 1) counts those no
    layer was sure about."""
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes, label_bars

    exits = np.asarray(exit_layers, dtype=np.int64).ravel()
    counts = np.bincount(np.clip(exits, 1, num_layers + 1), minlength=num_layers + 2)[1:]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    layers = np.arange(1, num_layers + 2)
    colors = ["C0"] * num_layers + ["C3"]
    bars = ax.bar(layers, counts, color=colors)
    label_bars(ax, bars, "{:.0f}")
    ax.set_xticks(layers, [str(k) for k in range(1, num_layers + 1)] + [no_exit_label])
    ax.margins(y=0.12)
    ax.yaxis.get_major_locator().set_params(integer=True)
    finish_axes(
        ax,
        title or f"Questions per exit layer ({len(exits)} questions)",
        f"exit layer (layers computed; {no_exit_label}: none sure)",
        "questions (count)",
    )
    fig.tight_layout()
    return fig
