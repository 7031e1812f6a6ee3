"""When does offloading pay? The server learns the device's offload threshold E_offload.

A question that no exit settles (last-layer entropy above E_T) goes to the server. That costs
a round trip and buys something only where the server's answer is *better* than the device's
own last-layer answer. When the server's model is no stronger than the edge's on the device's
texts (on the ``cpu`` profile it is the same six-layer MiniLM the edge runs in int8), most of
those offloads change nothing. The store shows how often: every stored offload holds the
device's last-layer answer and entropy beside the server's answer.

The price of keeping a question on the device is (how much the two answers differ) × (what a
difference is worth). The first part comes from the store, on the device's own texts, without
any label: ``d = 1 − F1(edge answer, server answer)``. The second comes from labelled held-back
questions of other texts (the calibration questions that also choose E_T, and as many more as
the server holds: only ~5 % of questions lie above E_T), only those the device would
offload (last-layer entropy above the current threshold: where the edge is unsure the server
is worth more than on average): the F1 the server's answer gains over the edge's per unit of
disagreement (``gain_per_disagreement``: an upper bootstrap percentile, and "the server is
always right" when there are too few disagreements to tell). Keeping the stored offloads with
entropy ≤ e then costs about ``100 · Σ g·d / questions asked`` F1 points, where *questions
asked* is what the devices reported (``edge.asked``; ``learn_from_store`` pools the published
versions with the same weights, ``same_weights_versions``, and leaves out devices that sent
no count or are no longer registered), taken at an upper
bootstrap percentile over the stored rows too (the same rows price and choose the threshold);
``learn_offload_threshold`` picks the largest *observed* entropy whose cost stays within
``budget`` (questions above the highest observed one are still offloaded: the server keeps
learning from them).

``offload_candidate`` writes the current bundle again with that ``E_offload`` in its
thresholds.json (``EdgeModel`` then answers on the device every question whose last-layer
entropy is ≤ E_offload), and ``grow_offload_threshold`` puts it through the same gate as a
retrained edge (whole-system F1 on labelled guard questions, against the same weights without
any E_offload, so that rounds cannot add up small losses) and publishes it. A retrained edge
drops the threshold (``export.bundle.for_new_weights``): it is learned again for new weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.export.bundle import (
    MANIFEST,
    OFFLOAD_THRESHOLD_KEYS,
    THRESHOLDS,
    for_new_weights,
    read_thresholds,
    with_thresholds,
)
from elma_utils.server import publish

OFFLOAD_KEY, COST_KEY = OFFLOAD_THRESHOLD_KEYS  # the threshold, and the F1 points it was estimated to cost
log = logging.getLogger(__name__)


@dataclass
class StoredOffload:
    """What one stored offload says about keeping that question on the device."""

    entropy: float  # the device's last-layer entropy
    disagreement: float  # 1 − F1(edge answer, server answer), 0..1


def disagreement(edge: str, server: str) -> float:
    """1 − F1 between the two answers (0 when they are the same text, "" for no answer included)."""
    from elma_utils.squad.metrics import f1_score

    return 0.0 if edge == server else 1.0 - f1_score(edge, server)


def stored_offloads(
    store_path: str | Path, model_versions: Sequence[str] | None, device_ids: Sequence[str] | None = None
) -> list[StoredOffload]:
    """Every stored offload (first request of each, not retries) made by one of
    ``model_versions`` (None: any; entropies are comparable only between versions with the same
    weights) on one of ``device_ids`` (None: any). Offloads without entropies are skipped."""
    from elma_utils.server.store import HardQuestionStore

    with HardQuestionStore(store_path) as store, store.db.read() as conn:
        rows = conn.execute(
            "SELECT edge_entropies, edge_text, server_text, no_answer, edge_model_version, device_id"
            " FROM offloads"
        ).fetchall()
    versions = None if model_versions is None else set(model_versions)
    devices = None if device_ids is None else set(device_ids)
    out = []
    for entropies, edge_text, server_text, no_answer, version, device in rows:
        if (versions is not None and version not in versions) or (
            devices is not None and device not in devices
        ):
            continue
        entropies = json.loads(entropies)
        if not entropies:
            continue
        out.append(
            StoredOffload(float(entropies[-1]), disagreement(edge_text, "" if no_answer else server_text))
        )
    return out


def gain_per_disagreement(
    edge_f1: Sequence[float], server_f1: Sequence[float], disagreement: Sequence[float], *,
    percentile: float = 90.0, resamples: int = 400, seed: int = 0, min_disagreements: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """F1 (0..1) the server's answer gains over the edge's per unit of disagreement, on
    labelled questions: the ratio Σ gain / Σ disagreement, and ``upper``, the larger of the
    ratio and its ``percentile`` over bootstrap resamples (what ``learn_offload_threshold``
    uses), clipped to 0..1. With fewer than ``min_disagreements`` disagreements there is too
    little to learn from: ``upper`` is 1 (the server is assumed right whenever it differs)."""
    e, s, d = (np.asarray(v, dtype=np.float64) for v in (edge_f1, server_f1, disagreement))
    if not (len(e) == len(s) == len(d)):
        raise ValueError("edge_f1, server_f1 and disagreement need one value per question")
    gain = s - e
    differ = int(np.count_nonzero(d > 0))
    out: dict[str, Any] = {
        "questions": len(d),
        "disagreements": differ,
        "mean_disagreement": float(d.mean()) if len(d) else 0.0,
        "ratio": float(gain.sum() / d.sum()) if differ else None,
        "percentile": percentile,
    }
    if differ < max(min_disagreements, 1):
        return {
            **out,
            "upper": 1.0,
            "why": f"fewer than {min_disagreements} disagreements: the server is assumed right",
        }
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        idx = rng.integers(0, len(d), len(d))
        total = d[idx].sum()
        samples.append(gain[idx].sum() / total if total > 0 else 1.0)
    return {**out, "upper": float(np.clip(max(np.percentile(samples, percentile), out["ratio"]), 0.0, 1.0))}


def learn_offload_threshold(
    offloads: Sequence[StoredOffload], questions_asked: int, gain: float, *,
    e_t: float, current: float | None = None, spent: float = 0.0, budget: float = 0.3,
    percentile: float = 90.0, resamples: int = 400, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The largest observed last-layer entropy E_offload (≥ ``current``, else ≥ ``e_t``) such that
    keeping on the device the stored offloads up to it costs at most ``budget`` F1 points over
    the ``questions_asked`` questions those offloads came from, ``spent`` (the cost of the
    current E_offload) included. ``gain``: F1 gained per unit of disagreement
    (``gain_per_disagreement``'s ``upper``). Each threshold's cost is its ``percentile`` over
    bootstrap resamples of the stored rows (they both price and choose it, so the plain sum,
    ``cost_plain``, is optimistic; never below it; ``resamples=0``: the plain sum).
    ``E_offload`` is None when no stored offload fits."""
    if questions_asked <= 0:
        raise ValueError(f"questions_asked must be > 0, got {questions_asked}")
    if not 0.0 <= gain <= 1.0:
        raise ValueError(f"gain per disagreement must lie in 0..1, got {gain}")
    floor = e_t if current is None else max(e_t, current)
    above = sorted((o for o in offloads if o.entropy > floor), key=lambda o: o.entropy)
    each = np.array([100.0 * gain * o.disagreement / questions_asked for o in above])
    upper = np.cumsum(each)  # resamples=0: the plain sum
    if above and resamples:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(len(above), np.full(len(above), 1 / len(above)), resamples)
        upper = np.maximum(np.percentile(np.cumsum(counts * each, axis=1), percentile, axis=0), upper)
    chosen, kept, steps = None, 0, []
    for i, o in enumerate(above):
        if i + 1 < len(above) and above[i + 1].entropy == o.entropy:
            continue  # ties are kept or offloaded together
        cost = spent + float(upper[i])
        if cost > budget + 1e-12:
            break
        chosen, kept = o.entropy, i + 1
        steps.append((round(o.entropy, 5), round(cost, 4)))
    return {
        OFFLOAD_KEY: chosen,
        COST_KEY: round(spent + (float(upper[kept - 1]) if kept else 0.0), 6),
        "cost_plain": round(spent + float(each[:kept].sum()), 6),
        "previous": current,
        "E_T": e_t,
        "stored_offloads": len(offloads),
        "above_current": len(above),
        "kept_on_device": kept,
        "disagreeing_kept": int(sum(o.disagreement > 0 for o in above[:kept])),
        "questions_asked": questions_asked,
        "gain_per_disagreement": gain,
        "budget": budget,
        "cost_steps": steps,
    }


def _rewrite_thresholds(src: Path, dst: Path, thresholds: dict[str, Any], version: str) -> Path:
    """A copy of bundle ``src`` at ``dst`` (replaced) with other thresholds, the same weights."""
    shutil.rmtree(dst, ignore_errors=True)
    return with_thresholds(src, dst, thresholds, version)


def offload_candidate(current_bundle: str | Path, out_dir: str | Path, learned: dict[str, Any]) -> Path:
    """A copy of ``current_bundle`` whose thresholds.json carries the learned E_offload (and
    its estimated cost); the manifest lists the new file's sha256 and size."""
    if learned.get(OFFLOAD_KEY) is None:
        raise ValueError("no E_offload was learned: there is no candidate to write")
    src, dst = Path(current_bundle), Path(out_dir)
    thresholds = {**read_thresholds(src), OFFLOAD_KEY: learned[OFFLOAD_KEY], COST_KEY: learned[COST_KEY]}
    return _rewrite_thresholds(src, dst, thresholds, f"candidate-offload-{dst.parent.name}")


def without_offload_threshold(bundle: str | Path, out_dir: str | Path) -> Path:
    """``bundle`` itself when it has no E_offload, else a copy without it: the same weights
    offloading everything no exit settles (what the gate compares a threshold against)."""
    src = Path(bundle)
    thresholds = read_thresholds(src)
    if thresholds.get(OFFLOAD_KEY) is None:
        return src
    dst = Path(out_dir)
    return _rewrite_thresholds(src, dst, for_new_weights(thresholds), f"base-{dst.parent.name}")


# thresholds.json keys that decide *whether* to offload, not what the last layer answers: bundles
# that differ only in them have comparable entropies and the same last-layer answers
DECISION_KEYS = frozenset({"policy", "E_T", "patience", "predictor", OFFLOAD_KEY, COST_KEY})


def weights_fingerprint(bundle: str | Path) -> str:
    """sha256 over what makes a bundle's last-layer answers and entropies: its files (not
    thresholds.json), the manifest's other settings (not its version names) and the thresholds
    that are not decisions (``rule``, ``null_threshold`` ...). Equal for bundles that differ
    only in when they offload."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = sorted((name, f["sha256"]) for name, f in manifest["files"].items() if name != THRESHOLDS)
    settings = {
        k: v for k, v in manifest.items() if k not in ("files", "model_version", "source_model_version")
    }
    answers = {k: v for k, v in read_thresholds(bundle).items() if k not in DECISION_KEYS}
    text = json.dumps([files, settings, answers], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def offload_floor(bundle: str | Path) -> float:
    """The entropy above which ``bundle`` offloads what no exit settles: max(E_T, E_offload)."""
    th = read_thresholds(bundle)
    return max(float(th.get("E_T", float("-inf"))), float(th.get(OFFLOAD_KEY) or float("-inf")))


def same_weights_versions(server_root: str | Path, version: str) -> list[str]:
    """Every published version whose weights are ``version``'s and which offloaded at least what
    ``version`` offloads (its floor no higher: a version that kept more on the device counts
    questions the store never saw), ``version`` first: their stored offloads are priced
    together. A version whose bundle cannot be read is skipped."""
    bundles = publish.bundles_dir(server_root)
    mine, floor = weights_fingerprint(bundles / version), offload_floor(bundles / version)
    out = [version]
    for d in sorted(bundles.iterdir()):
        if not d.is_dir() or d.name == version or d.name.startswith(".") or not (d / MANIFEST).is_file():
            continue
        try:
            if weights_fingerprint(d) == mine and offload_floor(d) <= floor:
                out.append(d.name)
        except (OSError, ValueError, KeyError, TypeError):  # BundleError is a ValueError
            log.warning("%s: not readable as a bundle; left out of the offload pricing", d)
    return out


def reported_questions(
    store_path: str | Path, model_versions: Sequence[str], device_ids: Sequence[str] | None = None
) -> tuple[dict[str, int], list[str]]:
    """(device_id -> questions it asked with ``model_versions``, devices left out): a device
    whose stored offloads under some version come without a reported count cannot be priced
    (the denominator is unknown), so it is left out rather than guessed."""
    from elma_utils.server.store import HardQuestionStore

    with HardQuestionStore(store_path) as store:
        per_device = store.questions_asked(model_versions)
    counted, left_out = {}, []
    for device, per_version in sorted(per_device.items()):
        if device_ids is not None and device not in device_ids:
            continue
        if any(n is None for n in per_version.values()):
            left_out.append(device)
        else:
            counted[device] = int(sum(per_version.values()))
    return counted, left_out


def _last_layer_answers(bundle: Path, examples: Sequence, cache_dir: Path) -> dict[str, tuple[str, float]]:
    """qas_id -> (the bundle's last-layer answer, its entropy), kept in ``cache_dir`` keyed by
    the weights and the questions (the offload step runs again and again on the same weights)."""
    from elma_utils.atomic_files import write_bytes_atomic

    key = publish.answers_cache_key(examples, weights_fingerprint(bundle))
    cached = Path(cache_dir) / f"edge-last-layer-{key}.json"
    if cached.is_file():
        try:
            return {k: (v[0], float(v[1])) for k, v in json.loads(cached.read_text()).items()}
        except (OSError, ValueError, TypeError, IndexError):
            pass
    from elma_utils.early_exit.policies import NeverExit
    from elma_utils.edge.runtime import EdgeModel

    model = EdgeModel.load(bundle)
    answers = model.answer_features(examples, model.features_for(examples), NeverExit())
    out = {e.qas_id: (a.text, float(a.entropy)) for e, a in zip(examples, answers, strict=True)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cached, json.dumps(out).encode())
    return out


def calibration_gain(
    bundle: str | Path, calibration: publish.EvalSet, full_model_dir: str | Path, cache_dir: str | Path,
    floor: float,
) -> dict[str, Any]:  # fmt: skip
    """``gain_per_disagreement`` on the labelled questions the bundle would offload (last-layer
    entropy above ``floor``): its last-layer answers against the server's, both scored
    against the gold answers (the server answers only those)."""
    from elma_utils.squad.metrics import per_question_scores

    last = _last_layer_answers(Path(bundle), calibration.examples, Path(cache_dir))
    above = [e for e in calibration.examples if last[e.qas_id][1] > floor]
    edge = {e.qas_id: last[e.qas_id][0] for e in above}
    server = publish.server_answers_for(full_model_dir, above, cache_dir) if above else {}
    edge_scores = per_question_scores(calibration.raw, edge, calibration.version)
    server_scores = per_question_scores(calibration.raw, server, calibration.version)
    ids = [e.qas_id for e in above]
    out = gain_per_disagreement(
        [edge_scores[i][1] for i in ids],
        [server_scores[i][1] for i in ids],
        [disagreement(edge[i], server[i]) for i in ids],
    )
    return {**out, "entropy_above": floor, "of_questions": len(calibration.examples)}


@dataclass
class OffloadResult:
    """What ``grow_offload_threshold`` did; ``reason`` says why it published or kept the current version."""

    published: bool
    reason: str
    current_version: str
    version: str | None = None
    learned: dict = field(default_factory=dict)  # learn_offload_threshold's record
    gain: dict = field(default_factory=dict)  # calibration_gain's record
    base: dict = field(default_factory=dict)  # evaluate_bundle on the guard questions: no E_offload
    candidate: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    candidate_probe: Any = None
    asked_by_device: dict = field(default_factory=dict)  # learn_from_store: the devices' reports
    left_out_devices: list = field(default_factory=list)  # devices that stored offloads but sent no count
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def grow_offload_threshold(
    store_path: str | Path, server_root: str | Path, *, full_model_dir: str | Path,
    calibration: publish.EvalSet, guard: publish.EvalSet, questions_asked: int,
    model_versions: Sequence[str], device_ids: Sequence[str] | None = None, budget: float = 0.3,
    tolerance: float = 0.3, on_candidate: Callable[[Path], Any] | None = None,
) -> OffloadResult:  # fmt: skip
    """Learn E_offload from the store and publish it when the gate agrees (module note).

    ``questions_asked``: how many questions ``device_ids`` (None: every device) asked while
    making the stored offloads of ``model_versions`` (the published versions with the current
    weights). The gate judges whole-system F1 on ``guard`` (labelled, never used to learn)
    against the same weights without E_offload, within ``tolerance`` F1 points; the candidate
    never settles fewer questions (E_offload only rises)."""
    t0 = time.perf_counter()
    server_root = Path(server_root)
    pointer = publish.read_latest(server_root)
    if pointer is None:
        raise publish.PublishError(f"{publish.bundles_dir(server_root)} has nothing published yet")
    current = publish.bundles_dir(server_root) / pointer.version
    thresholds = read_thresholds(current)
    result = OffloadResult(False, "", pointer.version)
    if "entropy" not in thresholds["policy"]:
        result.reason = f"kept {pointer.version}: its policy has no E_T, so nothing is offloaded by entropy"
        return _done(result, t0)
    offloads = stored_offloads(store_path, model_versions, device_ids)
    if not offloads:
        result.reason = f"kept {pointer.version}: no stored offloads from the current weights"
        return _done(result, t0)
    e_t, now = float(thresholds["E_T"]), thresholds.get(OFFLOAD_KEY)
    floor = e_t if now is None else max(e_t, float(now))
    cache = server_root / publish.SERVER_ANSWERS_DIR
    result.gain = calibration_gain(current, calibration, full_model_dir, cache, floor)
    result.learned = learn_offload_threshold(
        offloads, questions_asked, result.gain["upper"], e_t=e_t, current=now,
        spent=float(thresholds.get(COST_KEY) or 0.0), budget=budget,
    )  # fmt: skip
    if not result.learned["above_current"]:
        result.reason = (
            f"kept {pointer.version}: no stored offload lies above the current threshold {floor:.4f}"
        )
        return _done(result, t0)
    if result.learned[OFFLOAD_KEY] is None:
        result.reason = (
            f"kept {pointer.version}: keeping even the least uncertain stored offload above {floor:.4f} "
            f"on the device would cost more than {budget:g} F1 points"
        )
        return _done(result, t0)
    run_dir = server_root / publish.RUNS_DIR / f"offload-{int(time.time() * 1000):x}"
    candidate = offload_candidate(current, run_dir / "candidate", result.learned)
    try:
        if guard.server_answers is None:
            guard.server_answers = publish.server_answers_for(full_model_dir, guard.examples, cache)
        result.base = publish.evaluate_bundle(without_offload_threshold(current, run_dir / "base"), [guard])
        result.candidate = publish.evaluate_bundle(candidate, [guard])
        if on_candidate is not None:
            result.candidate_probe = on_candidate(candidate)
        result.gate = publish.gate_report(
            result.base, result.candidate, tolerance=tolerance, max_share_drop=0.0
        )
        if result.gate["refusal"]:
            result.reason = f"kept {pointer.version}: {result.gate['refusal']}"
            return _done(result, t0)
        exits = server_root / publish.EXITS_DIR / pointer.version
        notes = {"previous": pointer.version, "E_offload": result.learned[OFFLOAD_KEY],
                 "system_f1": round(result.candidate["system_f1"], 3)}  # fmt: skip
        result.version = publish.publish_candidate(
            server_root, pointer.version, candidate, exits if exits.is_dir() else None, notes
        )
        result.published = True
        result.reason = (
            f"published {result.version}: E_offload {result.learned[OFFLOAD_KEY]:.4f} keeps "
            f"{result.learned['kept_on_device']} of {len(offloads)} stored offloads on the device "
            f"(estimated cost {result.learned[COST_KEY]:.3f} F1); guard whole-system F1 "
            f"{result.candidate['system_f1']:.2f} vs {result.base['system_f1']:.2f} without it, settles "
            f"{result.candidate['share_solved']:.1f} % vs {result.base['share_solved']:.1f} %"
        )
        return _done(result, t0)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def learn_from_store(
    store_path: str | Path, server_root: str | Path, *, full_model_dir: str | Path,
    calibration: publish.EvalSet, guard: publish.EvalSet, budget: float = 0.3, tolerance: float = 0.3,
    device_ids: Sequence[str] | None = None, on_candidate: Callable[[Path], Any] | None = None,
) -> OffloadResult:  # fmt: skip
    """``grow_offload_threshold`` as the server runs it (the growth step, the rounds): the
    offloads of every published version with the current weights, over what the devices
    reported asking with them (``edge.asked``); devices that sent no count are left out."""
    t0 = time.perf_counter()
    pointer = publish.read_latest(server_root)
    if pointer is None:
        raise publish.PublishError(f"{publish.bundles_dir(server_root)} has nothing published yet")
    versions = same_weights_versions(server_root, pointer.version)
    asked, left_out = reported_questions(store_path, versions, device_ids)
    if not asked:
        result = OffloadResult(False, "", pointer.version, left_out_devices=left_out)
        result.reason = (
            f"kept {pointer.version}: no device reported how many questions it asked with the current "
            "weights (edge.asked)" + (f"; left out, no count: {', '.join(left_out)}" if left_out else "")
        )
        return _done(result, t0)
    result = grow_offload_threshold(
        store_path, server_root, full_model_dir=full_model_dir, calibration=calibration, guard=guard,
        questions_asked=sum(asked.values()), model_versions=versions, device_ids=sorted(asked),
        budget=budget, tolerance=tolerance, on_candidate=on_candidate,
    )  # fmt: skip
    result.asked_by_device, result.left_out_devices = asked, left_out
    return result


def _done(result: OffloadResult, t0: float) -> OffloadResult:
    result.seconds = time.perf_counter() - t0
    return result
