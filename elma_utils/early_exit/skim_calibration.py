"""Choose the skim threshold tau together with E_T, cross-fitted over articles (≤ 1 F1).

The same protocol as ``experiment.cross_fitted_exit`` (v1.1) and
``squad2.cross_fitted_squad2_exit`` (v2.0): settings are tuned on one half of the articles
and applied to the other half, and vice versa; the reference is the full model (last layer,
no skim). Candidates are every tau of ``by_tau`` (and "no skim") × every E_T (and "never
exit") × (v2.0) every no-answer margin; each exit layer gets its own tuned null threshold
per candidate tau. The cheapest candidate within ``max_f1_loss`` of the reference on the
tuning half wins; on SQuAD 2.0 a tau is only a candidate when skimming changes the last
layer's answer/no-answer call on at most ``max_flip_rate`` of the tuning questions (the
[CLS] position is always kept; the flips are measured and reported on the held-out half).

Cost model (for choosing; the benchmark measures wall clock): a question exiting at layer k
with kept share r costs ``embeddings_ms + Σ_{j ≤ min(k, s)} c_j + Σ_{s < j ≤ k} r · c_j``
(layer cost linear in tokens, which holds for short sequences; attention is quadratic, so
it is an upper bound on the cost of a skimmed layer).

    base = layerwise_dev_stats(exits_dir, "1.1")
    by_tau = skim_layerwise_dev_stats(exits_dir, head, "1.1", taus=[0.02, 0.05, 0.1, 0.2])
    cf = cross_fitted_adaptive(base, by_tau, titles, layer_ms=lat["layer_ms"], skim_layer=head.layer)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from elma_utils.early_exit.calibration import default_thresholds
from elma_utils.early_exit.policies import EntropyPolicy, simulate_exits
from elma_utils.early_exit.squad2 import (
    DEFAULT_MARGINS,
    _shifted,
    best_null_thresholds,
    f1_with_null_thresholds,
    held_out_folds,
)

MODES = ("depth", "width", "both")
NEVER = -1.0  # an E_T no normalised entropy reaches: every layer runs


def question_costs(
    layer_ms: np.ndarray, kept_share: np.ndarray, skim_layer: int | None, embeddings_ms: float = 0.0
) -> np.ndarray:
    """Cumulative cost [K, Q] of exiting at layer k for every question (see the module note)."""
    c = np.asarray(layer_ms, dtype=np.float64)
    r = np.asarray(kept_share, dtype=np.float64)
    scale = np.ones((c.size, r.size))
    if skim_layer is not None:
        scale[skim_layer:] = r[None, :]
    return float(embeddings_ms) + np.cumsum(c[:, None] * scale, axis=0)


def cross_fitted_adaptive(
    base: dict[str, np.ndarray],
    by_tau: dict[float, dict[str, np.ndarray]],
    titles: list[str],
    *,
    layer_ms: np.ndarray | None = None,
    embeddings_ms: float = 0.0,
    skim_layer: int,
    mode: str = "both",
    version: str = "1.1",
    impossible: np.ndarray | None = None,
    max_f1_loss: float = 1.0,
    max_flip_rate: float = 0.01,
    margins: tuple[float, ...] = DEFAULT_MARGINS,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out F1, speed-up (cost model), average layers, kept share and chosen settings.

    ``base``: ``layerwise_dev_stats`` (no skim); ``by_tau``: ``skim_layerwise_dev_stats``.
    ``mode``: "depth" (no skim), "width" (every layer, skim) or "both". ``layer_ms`` [K]
    default to 1 per layer. SQuAD 2.0 (``version="2.0"``) needs ``impossible`` [Q]."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    v2 = str(version).removeprefix("v") == "2.0"
    if v2 and impossible is None:
        raise ValueError("SQuAD 2.0 calibration needs `impossible` (which questions have no answer)")
    f1_base = np.asarray(base["f1"], dtype=np.float64)
    k_layers, n = f1_base.shape
    if len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} questions")
    costs_ms = np.ones(k_layers) if layer_ms is None else np.asarray(layer_ms, dtype=np.float64)
    imp = np.zeros(n, dtype=bool) if impossible is None else np.asarray(impossible, dtype=bool)
    # Every mode may also skim nothing (width: at full depth), so a dev set where no tau meets the F1
    # budget or the no-answer flip rule (SQuAD 2.0) gets the full model rather than a rule it refused.
    configs: list[tuple[float | None, dict]] = [(None, base)]
    if mode != "depth":
        configs += sorted(((float(t), s) for t, s in by_tau.items()), key=lambda c: c[0])
    full_cost = float(embeddings_ms + costs_ms.sum())
    out_f1, out_cost = np.zeros(n), np.zeros(n)
    out_layer, out_share = np.zeros(n, dtype=int), np.ones(n)
    out_empty, ref_empty, skim_flip = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    ref_f1 = np.zeros(n)
    settings, within = [], True
    for test in held_out_folds(titles, seed):
        tune = ~test
        t_ref = best_null_thresholds(f1_base[:, tune], base["null_diff"][:, tune], imp[tune]) if v2 else None
        f1_ref_all = f1_with_null_thresholds(f1_base, base["null_diff"], imp, t_ref) if v2 else f1_base
        ref_f1[test] = f1_ref_all[-1, test]
        base_empty = (np.asarray(base["null_diff"])[-1] > t_ref[-1]) if v2 else np.zeros(n, bool)
        ref_empty[test] = base_empty[test]
        target = 100 * f1_ref_all[-1, tune].mean() - max_f1_loss
        best, fallback = None, None
        tau_flips: dict[float, float] = {}
        for tau, stats in configs:
            cand = _prepare(stats, tau, imp, tune, v2, costs_ms, embeddings_ms, skim_layer)
            flips = float(np.mean(cand["empty"][tune] != base_empty[tune])) if v2 else 0.0
            if tau is not None:
                tau_flips[tau] = flips
            if tau is not None and flips > max_flip_rate:
                continue
            grid = [NEVER] if mode == "width" else [NEVER, *default_thresholds(stats["entropy"][:, tune], 51)]
            for margin in margins if v2 else (None,):
                for e_t in grid:
                    layers = _exits(cand, e_t, margin, tune)
                    f1 = 100 * cand["f1"][layers - 1, np.nonzero(tune)[0]].mean()
                    cost = cand["cost"][layers - 1, np.nonzero(tune)[0]].mean()
                    key = (cost, -f1, e_t)
                    point = {"tau": tau, "E_T": None if e_t == NEVER else float(e_t), "margin": margin,
                             "cand": cand, "f1": f1, "cost": cost, "e_t": e_t}  # fmt: skip
                    if f1 >= target - 1e-9 and (best is None or key < best[0]):
                        best = (key, point)
                    if fallback is None or f1 > fallback[1]["f1"]:
                        fallback = ((cost, -f1), point)
        if best is None:
            within, best = False, fallback
        p = best[1]
        cand = p["cand"]
        layers = _exits(cand, p["e_t"], p["margin"], test)
        cols = np.nonzero(test)[0]
        out_layer[test] = layers
        out_f1[test] = cand["f1"][layers - 1, cols]
        out_cost[test] = cand["cost"][layers - 1, cols]
        skimmed = (p["tau"] is not None) & (layers > skim_layer)
        out_share[test] = np.where(skimmed, cand["share"][cols], 1.0)
        if v2:
            diff = np.asarray(cand["stats"]["null_diff"])
            out_empty[test] = diff[layers - 1, cols] > np.asarray(cand["t_k"])[layers - 1]
            skim_flip[test] = cand["empty"][test] != base_empty[test]
        settings.append({
            "tau": p["tau"], "E_T": p["E_T"], "no_answer_margin": p["margin"],
            "null_thresholds": None if cand["t_k"] is None else [float(x) for x in cand["t_k"]],
            "skim_layer": None if p["tau"] is None else int(skim_layer),
            "tuning_f1": float(p["f1"]), "tuning_speedup": full_cost / float(p["cost"]),
            "tuning_flip_rate_by_tau": tau_flips,
        })  # fmt: skip
    used = np.minimum(out_layer, k_layers)
    return {
        "mode": mode,
        "f1": float(100 * out_f1.mean()),
        "full_f1": float(100 * ref_f1.mean()),
        "f1_loss": float(100 * (ref_f1.mean() - out_f1.mean())),
        "speedup_cost_model": full_cost / float(out_cost.mean()),
        "avg_layers": float(used.mean()),
        "kept_token_share": float(out_share.mean()),
        "within_target_on_tuning_halves": within,
        "flip_rate_vs_full": float(np.mean(out_empty != ref_empty)) if v2 else 0.0,
        "flip_rate_from_skim": float(np.mean(skim_flip)) if v2 else 0.0,
        "questions": int(n),
        "settings": settings,
        "exit_layers": out_layer,
        "kept_share": out_share,
        "setting_index": np.where(held_out_folds(titles, seed)[0], 0, 1),
    }


def _prepare(stats, tau, imp, tune, v2, costs_ms, embeddings_ms, skim_layer) -> dict:
    """F1 [K, Q] (with per-layer null thresholds tuned on ``tune`` for v2.0), costs and shifts."""
    f1 = np.asarray(stats["f1"], dtype=np.float64)
    share = np.ones(f1.shape[1]) if tau is None else np.asarray(stats["kept_share"], dtype=np.float64)
    cost = question_costs(costs_ms, share, None if tau is None else skim_layer, embeddings_ms)
    t_k, shifted, empty = None, None, np.zeros(f1.shape[1], bool)
    if v2:
        diff = np.asarray(stats["null_diff"])
        t_k = best_null_thresholds(f1[:, tune], diff[:, tune], imp[tune])
        f1 = f1_with_null_thresholds(f1, diff, imp, t_k)
        shifted = _shifted(diff, t_k)
        empty = diff[-1] > t_k[-1]
    return {"stats": stats, "f1": f1, "cost": cost, "share": share, "t_k": t_k, "shifted": shifted,
            "empty": empty}  # fmt: skip


def _exits(cand: dict, e_t: float, margin: float | None, cols: np.ndarray) -> np.ndarray:
    """Layer (1..K) each question in ``cols`` answers with: its exit, else the last layer."""
    entropy = np.asarray(cand["stats"]["entropy"])[:, cols]
    k = entropy.shape[0]
    if e_t == NEVER:
        return np.full(entropy.shape[1], k)
    policy = EntropyPolicy(float(e_t), no_answer_margin=margin, null_threshold=0.0)
    shifted = None if cand["shifted"] is None else cand["shifted"][:, cols]
    return np.minimum(simulate_exits(entropy, None, policy, shifted), k)


def bench_settings(
    titles: list[str],
    *,
    depth: dict | None = None,
    width: dict | None = None,
    both: dict | None = None,
    rule: str = "max",
    seed: int = 0,
) -> dict[str, Any]:
    """One dev set's entry of the ``bench.adaptive --settings`` file from cross-fitted results.

    Each configuration gets its two fold settings; ``held_out_titles`` names the articles the
    first applies to (the benchmark applies each to the half it was not tuned on)."""
    first = sorted({t for t, m in zip(titles, held_out_folds(titles, seed)[0], strict=True) if m})

    def folds(cf: dict | None) -> list[dict] | None:
        if cf is None:
            return None
        return [{"E_T": s["E_T"], "tau": s["tau"], "no_answer_margin": s["no_answer_margin"],
                 "null_threshold": s["null_thresholds"], "rule": rule} for s in cf["settings"]]  # fmt: skip

    out: dict[str, Any] = {"held_out_titles": first}
    for name, cf in (("depth", depth), ("width", width), ("both", both)):
        if cf is not None:
            out[name] = folds(cf)
    return out
