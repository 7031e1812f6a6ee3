"""How many layers should the edge keep? Chosen by measurement, not by taste.

The edge keeps its first ``k`` layers with exit heads; a question no kept layer settles goes
to the server's full model. Each k trades edge compute (layers run on the device, and every
offloaded question pays all k of them first) against offloads (a round trip plus the
server's time, and the server's answer). For every k this module calibrates E_T on one half
of the dev articles with offloading in the sweep, applies it to the other half (and vice
versa), and reports the held-out F1, the offload share and the expected latency per
question from measured costs. The chosen k is the fastest one whose held-out F1 stays
within ``max_f1_loss`` of the server's full model; keeping every layer is one of the
candidates, so the table also shows when offloading does not pay.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from elma_utils.early_exit.calibration import choose_threshold, sweep_thresholds
from elma_utils.early_exit.policies import EntropyPolicy, simulate_exits


@dataclass
class EdgeDepthResult:
    """Held-out numbers for an edge that keeps ``k`` layers."""

    k: int
    f1: float  # percent, edge exits + server answers for the offloaded
    f1_loss: float  # points below the server's full model
    share_offloaded: float
    avg_edge_layers: float
    expected_ms: float  # per question: embeddings + edge layers + offload cost where offloaded
    speedup: float  # full model on the device / expected_ms
    thresholds: list[float]  # E_T chosen on each half


def _halves(titles: list[str], seed: int) -> np.ndarray:
    unique = sorted(set(titles))
    half = set(np.random.default_rng(seed).permutation(unique)[: len(unique) // 2].tolist())
    return np.array([t in half for t in titles])


def evaluate_edge_depth(
    k: int,
    per_layer_f1: np.ndarray,
    per_layer_entropy: np.ndarray,
    server_f1: np.ndarray,
    titles: list[str],
    layer_ms: np.ndarray,
    embeddings_ms: float,
    offload_ms: float,
    device_full_ms: float,
    max_f1_loss: float = 1.0,
    seed: int = 0,
) -> EdgeDepthResult:
    """Cross-fitted E_T for an edge of ``k`` layers; see the module note.

    ``layer_ms``: [K], or [K, N] per question (a skimmed bundle's later layers cost what their
    kept tokens cost: ``skim_calibration.question_costs``)."""
    f1 = np.asarray(per_layer_f1, dtype=np.float64)[:k]
    entropy = np.asarray(per_layer_entropy, dtype=np.float64)[:k]
    server = np.asarray(server_f1, dtype=np.float64)
    cost = np.asarray(layer_ms, dtype=np.float64)[:k]
    per_question = cost.ndim == 2
    in_a = _halves(titles, seed)
    n = f1.shape[1]
    got, latency, exits = np.zeros(n), np.zeros(n), np.zeros(n, dtype=int)
    chosen = []
    for tune in (in_a, ~in_a):
        test = ~tune
        sweep = sweep_thresholds(
            f1[:, tune],
            entropy[:, tune],
            cost[:, tune] if per_question else cost,
            offload_f1=server[tune],
            offload_latency_ms=offload_ms,
            base_latency_ms=embeddings_ms,
            reference_f1=100 * float(server[tune].mean()),
        )
        point = choose_threshold(sweep, max_f1_loss)
        chosen.append(point.value)
        layers = simulate_exits(entropy[:, test], None, EntropyPolicy(point.value))
        done = layers <= k
        used = np.minimum(layers, k)
        got[test] = np.where(done, f1[:, test][used - 1, np.arange(test.sum())], server[test])
        cum = np.cumsum(cost[:, test] if per_question else cost, axis=0)
        paid = cum[used - 1, np.arange(test.sum())] if per_question else cum[used - 1]
        latency[test] = embeddings_ms + paid + np.where(done, 0.0, offload_ms)
        exits[test] = layers
    mean_ms = float(latency.mean())
    return EdgeDepthResult(
        k=k,
        f1=float(100 * got.mean()),
        f1_loss=float(100 * (server.mean() - got.mean())),
        share_offloaded=float(np.mean(exits > k)),
        avg_edge_layers=float(np.minimum(exits, k).mean()),
        expected_ms=mean_ms,
        speedup=float(device_full_ms / mean_ms),
        thresholds=chosen,
    )


def choose_edge_depth(
    per_layer_f1: np.ndarray,
    per_layer_entropy: np.ndarray,
    server_f1: np.ndarray,
    titles: list[str],
    layer_ms: np.ndarray,
    embeddings_ms: float,
    offload_ms: float,
    device_full_ms: float | None = None,
    max_f1_loss: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Every k = 1..K evaluated; ``best`` is the fastest within ``max_f1_loss`` of the server.

    ``offload_ms``: one offload's cost (round trip + server compute), measured elsewhere;
    ``device_full_ms``: the full model on the device (default: embeddings + all layers)."""
    k_layers = np.shape(per_layer_f1)[0]
    full = float(device_full_ms or embeddings_ms + float(np.mean(np.sum(layer_ms, axis=0))))
    rows = []
    for k in range(1, k_layers + 1):
        try:
            rows.append(
                evaluate_edge_depth(
                    k,
                    per_layer_f1,
                    per_layer_entropy,
                    server_f1,
                    titles,
                    layer_ms,
                    embeddings_ms,
                    offload_ms,
                    full,
                    max_f1_loss,
                    seed,
                )
            )
        except ValueError:  # no E_T keeps F1 on the tuning half: this k cannot qualify
            continue
    ok = [r for r in rows if r.f1_loss <= max_f1_loss + 1e-9]
    best = min(ok or rows, key=lambda r: r.expected_ms) if rows else None
    return {
        "rows": [asdict(r) for r in rows],
        "best": asdict(best) if best else None,
        "within_target": bool(ok),
        "offload_ms": float(offload_ms),
        "device_full_ms": full,
        "max_f1_loss": float(max_f1_loss),
    }
