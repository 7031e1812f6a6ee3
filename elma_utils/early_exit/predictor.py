"""EdgeBERT's look-up table: from the entropy at an early layer, guess where a question exits.

A question that will not exit on the device still costs every edge layer before it is
offloaded. After layer ``j`` (default 1) its span entropy already says a lot: the table
maps entropy bins to the distribution of exit layers seen on held-out data (for one
threshold E_T), so the runtime can offload a hopeless question at once. The table is
plain numbers (JSON) for the edge bundle.

Exit layers use the convention of ``simulate_exits``: 1..K, and K + 1 = no exit.

With adaptive width (``early_exit.skim``) the runtime's entropies after the skim layer and
its exit layers are those of the skimmed model, so the table must be fitted on those:
``EntropyExitPredictor.from_layerwise(stats, exits, skim=head)`` takes the skimmed stats
(``skim_model.skim_layerwise_dev_stats`` at the head's tau), refuses unskimmed ones, and
records the head's keep rule in the table; ``write_bundle`` refuses a table whose keep rule
is not the bundle's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FORMAT = "elma.entropy_exit_predictor"
FORMAT_VERSION = 1


class EntropyExitPredictor:
    """Entropy at layer ``layer`` → predicted exit layer (a quantile) and P(no exit) per bin."""

    def __init__(
        self,
        num_layers: int,
        layer: int = 1,
        quantile: float = 0.5,
        threshold: float | None = None,
        binning: str = "quantile",
        skim: dict[str, Any] | None = None,
    ) -> None:
        if not 1 <= layer < num_layers:
            raise ValueError(f"layer must be in 1..{num_layers - 1} (an early layer), got {layer}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if binning not in ("quantile", "uniform"):
            raise ValueError(f"binning must be 'quantile' or 'uniform', got {binning!r}")
        self.num_layers, self.layer, self.quantile = int(num_layers), int(layer), float(quantile)
        self.threshold, self.binning = threshold, binning
        self.skim = None if skim is None else dict(skim)  # the keep rule of the runtime it was fitted on
        self.edges: np.ndarray | None = None  # [B - 1] inner bin edges
        self.counts: np.ndarray | None = None  # [B, K + 1] exit layers 1..K+1 seen per bin

    @property
    def no_exit(self) -> int:
        """The exit-layer value meaning "will not exit on the edge"."""
        return self.num_layers + 1

    def fit(self, entropy_at_j: np.ndarray, exit_layer: np.ndarray, bins: int = 20) -> EntropyExitPredictor:
        """Count exit layers per entropy bin, over the questions still running after layer j.

        Questions that exited at or before layer j never consult the table, so they are left
        out. When none runs past layer j (a threshold so loose that everything exits there) the
        table is fitted on all of them: it then shows no question without an exit and never
        advises an early offload, which is right for such a threshold. Quantile bins hold equal
        numbers of questions; uniform bins split 0..1.
        """
        h, exits = self._checked(entropy_at_j, exit_layer)
        if h.size == 0:
            raise ValueError("no questions to fit the predictor on")
        keep = exits > self.layer
        if keep.any():
            h, exits = h[keep], exits[keep]
        if bins < 1:
            raise ValueError(f"bins must be ≥ 1, got {bins}")
        if self.binning == "quantile":
            edges = np.unique(np.quantile(h, np.linspace(0.0, 1.0, bins + 1))[1:-1])
        else:
            edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
        self.edges = edges
        counts = np.zeros((len(edges) + 1, self.num_layers + 1), dtype=np.int64)
        np.add.at(counts, (np.searchsorted(edges, h, side="right"), exits - 1), 1)
        self.counts = _fill_empty_bins(counts)
        return self

    def _checked(self, entropy: np.ndarray, exit_layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = np.asarray(entropy, dtype=np.float64).ravel()
        exits = np.asarray(exit_layer).ravel()
        if h.shape != exits.shape:
            raise ValueError(f"{h.size} entropies but {exits.size} exit layers")
        if not np.isfinite(h).all():
            raise ValueError("entropies must be finite")
        if exits.size and (np.any(exits != np.round(exits)) or exits.min() < 1 or exits.max() > self.no_exit):
            raise ValueError(f"exit layers must be integers in 1..{self.no_exit} ({self.no_exit} = no exit)")
        return h, exits.astype(np.int64)

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.edges is None or self.counts is None:
            raise RuntimeError("the predictor is not fitted: call fit() or from_dict() first")
        return self.edges, self.counts

    def _bins(self, entropy: np.ndarray | float) -> np.ndarray:
        return np.searchsorted(self._fitted()[0], np.asarray(entropy, dtype=np.float64), side="right")

    @property
    def predicted_layers(self) -> np.ndarray:
        """Per bin: the ``quantile`` of its exit layers (``no_exit`` when that is where it falls)."""
        counts = self._fitted()[1]
        cdf = np.cumsum(counts, axis=1) / counts.sum(axis=1, keepdims=True)
        return (cdf >= self.quantile - 1e-12).argmax(axis=1) + 1

    @property
    def p_no_exit_table(self) -> np.ndarray:
        counts = self._fitted()[1]
        return counts[:, -1] / counts.sum(axis=1)

    def predict(self, entropy: np.ndarray | float) -> np.ndarray:
        """Predicted exit layer for each entropy at layer j; ``no_exit`` = not on the edge."""
        return self.predicted_layers[self._bins(entropy)]

    def p_no_exit(self, entropy: np.ndarray | float) -> np.ndarray:
        """Share of held-out questions in the same bin that never exited on the edge."""
        return self.p_no_exit_table[self._bins(entropy)]

    def should_offload_now(self, entropy: np.ndarray | float, p_no_exit_threshold: float = 0.8) -> np.ndarray:
        """Offload after layer j instead of computing the other edge layers in vain?"""
        return self.p_no_exit(entropy) >= p_no_exit_threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready table for the edge bundle."""
        edges, counts = self._fitted()
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "layer": self.layer,
            "quantile": self.quantile,
            "threshold": self.threshold,
            "binning": self.binning,
            "skim": self.skim,
            "edges": [float(e) for e in edges],
            "counts": counts.tolist(),
        }

    @classmethod
    def from_layerwise(
        cls,
        stats: dict[str, np.ndarray],
        exit_layer: np.ndarray,
        *,
        layer: int = 1,
        threshold: float | None = None,
        rows: np.ndarray | None = None,
        bins: int = 20,
        quantile: float = 0.5,
        skim=None,
    ) -> EntropyExitPredictor:
        """Fit on layerwise stats (entropy [K, Q]) and the exit layers [Q] of the same runtime.

        ``skim``: the ``SkimHead`` the runtime skims with (None: no skim). With a head,
        ``stats`` must be the skimmed ones (they carry ``kept_share``; entropies after the skim
        layer differ from the full-width model's) and the exit layers those of the skimmed
        runtime; the table records ``skim.settings()``. ``rows``: the questions to fit on."""
        entropy = np.asarray(stats["entropy"], dtype=np.float64)
        skimmed = "kept_share" in stats and bool(np.any(np.asarray(stats["kept_share"]) < 1.0))
        if skim is not None and "kept_share" not in stats:
            raise ValueError(
                "a skim head was given but these stats are full-width: fit on "
                "skim_model.skim_layerwise_dev_stats(exits_dir, head, version, taus=[head.tau])"
            )
        if skim is None and skimmed:
            raise ValueError("these stats come from a skimmed runtime: pass its head as skim=")
        cols = np.arange(entropy.shape[1]) if rows is None else np.asarray(rows)
        pred = cls(
            entropy.shape[0], layer, quantile, threshold, skim=None if skim is None else skim.settings()
        )
        return pred.fit(entropy[layer - 1, cols], np.asarray(exit_layer)[cols], bins=bins)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntropyExitPredictor:
        """Rebuild from ``to_dict``'s output, refusing tables that do not add up."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an entropy exit predictor table (format must be {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported predictor table version {data.get('version')!r}")
        try:
            pred = cls(
                int(data["num_layers"]),
                int(data["layer"]),
                float(data["quantile"]),
                data.get("threshold"),
                data.get("binning", "quantile"),
                data.get("skim"),
            )
            edges = np.asarray(data["edges"], dtype=np.float64).reshape(-1)
            counts = np.asarray(data["counts"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed predictor table: {err}") from err
        if counts.shape != (len(edges) + 1, pred.num_layers + 1):
            raise ValueError(f"predictor table: counts {counts.shape} do not fit {len(edges)} edges")
        if np.any(np.diff(edges) <= 0) or (counts < 0).any() or np.any(counts.sum(axis=1) == 0):
            raise ValueError("predictor table: edges must increase and every bin must hold counts ≥ 0")
        pred.edges, pred.counts = edges, counts
        return pred


def _fill_empty_bins(counts: np.ndarray) -> np.ndarray:
    """An empty bin borrows the counts of the nearest non-empty one (lower bin on ties)."""
    filled = np.nonzero(counts.sum(axis=1) > 0)[0]
    nearest = filled[np.abs(np.arange(len(counts))[:, None] - filled[None, :]).argmin(axis=1)]
    return counts[nearest]


def evaluate_predictor(
    predictor: EntropyExitPredictor,
    entropy_at_j: np.ndarray,
    exit_layer: np.ndarray,
    exit_f1: np.ndarray,
    offload_f1: np.ndarray,
    p_no_exit_threshold: float = 0.8,
    layer_latency_ms: np.ndarray | None = None,
) -> dict[str, float]:
    """What offloading at layer j on the table's advice saves (layers) and costs (F1) on held-out data.

    ``exit_layer`` [N] from ``simulate_exits`` (K + 1 = offloaded after layer K);
    ``exit_f1`` [N]: F1 (0..1) of the edge answer at the exit layer; ``offload_f1`` [N]: of
    the server's. F1 values in the report are in percent; ``f1_change`` is after − before.
    """
    h, exits = predictor._checked(entropy_at_j, exit_layer)
    edge_f1, server_f1 = (np.asarray(a, dtype=np.float64).ravel() for a in (exit_f1, offload_f1))
    if edge_f1.shape != h.shape or server_f1.shape != h.shape:
        raise ValueError("entropy_at_j, exit_layer, exit_f1 and offload_f1 must have the same length")
    k, j = predictor.num_layers, predictor.layer
    reach = exits > j
    early = reach & predictor.should_offload_now(h, p_no_exit_threshold)
    exited = exits <= k
    before = np.minimum(exits, k)
    after = np.where(early, j, before)
    f1_before = np.where(exited, edge_f1, server_f1)
    f1_after = np.where(early, server_f1, f1_before)
    predicted = predictor.predict(h)
    report = {
        "questions": int(h.size),
        "layer": j,
        "p_no_exit_threshold": float(p_no_exit_threshold),
        "share_reaching_layer": float(reach.mean()),
        "share_offloaded_early": float(early.mean()),
        "wrongly_offloaded": int((early & exited).sum()),
        "correctly_offloaded": int((early & ~exited).sum()),
        "missed_no_exits": int((reach & ~exited & ~early).sum()),
        "avg_edge_layers_before": float(before.mean()),
        "avg_edge_layers_after": float(after.mean()),
        "edge_layers_saved_share": float(1.0 - after.sum() / max(before.sum(), 1)),
        "share_offloaded_before": float(1.0 - exited.mean()),
        "share_offloaded_after": float(np.mean(~exited | early)),
        "f1_before": float(100.0 * f1_before.mean()),
        "f1_after": float(100.0 * f1_after.mean()),
        "f1_change": float(100.0 * (f1_after.mean() - f1_before.mean())),
        "predicted_layer_exact": float(np.mean(predicted[reach] == exits[reach])) if reach.any() else 1.0,
        "predicted_layer_mae": float(np.mean(np.abs(predicted[reach] - exits[reach])))
        if reach.any()
        else 0.0,
    }
    if layer_latency_ms is not None:
        cost = np.concatenate([[0.0], np.cumsum(np.asarray(layer_latency_ms, dtype=np.float64))])
        if cost.shape != (k + 1,):
            raise ValueError(f"layer_latency_ms must hold {k} values")
        report["edge_ms_saved_per_question"] = float(np.mean(cost[before] - cost[after]))
    return report
