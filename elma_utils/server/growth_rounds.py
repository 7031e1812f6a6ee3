"""The growth loop, round by round, on a deployment domain: does it pay?

    domain = split_domain(dev.examples, DomainSizes(articles=12, rounds=3))
    out = run_growth_rounds(full_model, bundle, exits, work_dir, domain, replay, RoundsSettings("exits"))
    out["rounds"]        # one record per round (round 0: before any growth)

Per target (what is retrained, ``RETRAIN_TARGETS``) a fresh server root publishes the initial
bundle, and one ``LoopbackDeployment`` runs the whole experiment: the real edge client
(``EdgeQA``), ELMA's SSH endpoint and the offload server on loopback. Every round:

1. **ask**: the device asks the round's questions (``domain.asked_rounds``); those it cannot
   settle go over SSH to the server, which answers with the full model and stores them;
2. **grow**: ``publish.retrain_edge`` trains the edge from every stored question (the server's
   answers as labels) plus ``replay`` questions of the original training data, re-chooses E_T
   on the calibration questions, and the gate (whole-system F1 and share settled, on the
   store's held-out contexts and the guard questions) publishes the candidate or keeps the
   current version; decision and reasons go in the record;
   **offload threshold** (``learn_offload``, when the retrained edge was not published): the
   server prices the stored offloads (how often its answer differed from the device's, over
   the questions the device reported asking, and what a difference was worth on labelled
   other-article questions: the calibration questions and ``domain.offload_pool``) and publishes the
   current weights with a learned ``E_offload`` when the gate (whole-system F1 on the guard
   questions, within ``max_system_f1_loss``) agrees (``server.offload_threshold``);
3. **sync**: the device fetches what is published over SFTP (``sync.sync_with_client``) and
   swaps the new model in between questions, as ``elma device`` does;
4. **measure** (``round_measure``): the device's model on the later, never asked questions of
   the deployment articles and on other articles (forgetting); the candidate too, published
   or not (``candidate``), so a refused candidate still shows what it would have done.

Record keys (every round, ``ROUND_KEYS``): target, round, device_version, asked, offloaded,
fallbacks, stored_questions, grow (None in round 0), offload (None in round 0 or when not
tried), sync, deployment, other, change (from round 0), seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from elma_utils.server import publish
from elma_utils.server.deployment_domain import DeploymentDomain
from elma_utils.server.offload_threshold import OffloadResult, learn_from_store
from elma_utils.server.round_measure import change, measure, measure_sets, targets_met

# what the growth loop retrains: name -> retrain_edge keyword arguments
RETRAIN_TARGETS: dict[str, dict[str, Any]] = {
    "exits": {"mode": "distill", "learning_rate": 5e-4},  # exit heads only
    # the edge's copy of the layers too; the server's full model is never changed
    "exits+layers": {"mode": "joint_distill", "learning_rate": 3e-5},
}
ROUND_KEYS = (
    "target", "round", "device_version", "asked", "offloaded", "fallbacks", "stored_questions", "grow",
    "offload", "sync", "deployment", "other", "change", "seconds",
)  # fmt: skip


def register_retrain_target(name: str, **retrain_options: Any) -> None:
    """Add a target: ``retrain_edge`` keyword arguments (``mode`` at least). The hook for what
    other parts of the edge learn to retrain (a skimming bundle keeps its skim head through
    ``exits``; a target that retrains the head with the layers it reads would go here)."""
    if "mode" not in retrain_options:
        raise ValueError(f"retrain target {name!r} needs a mode")
    RETRAIN_TARGETS[name] = dict(retrain_options)


@dataclass
class RoundsSettings:
    """How each round grows the edge (the data sizes are ``DomainSizes``)."""

    target: str = "exits"
    epochs: float = 1.0
    learning_rate: float | None = None  # None: the target's
    batch_size: int = 16
    tolerance: float = 0.0  # gate: whole-system F1 points the candidate may lose
    max_share_drop: float = 2.0  # gate: share settled it may lose
    eval_fraction: float = 0.2  # stored contexts held out from training for the gate
    max_f1_loss: float = 1.0  # E_T: the cheapest within this F1 of the edge's full depth
    forgetting_tolerance: float = 0.5  # F1 points other articles may lose (stated target)
    min_share_gain: float = 5.0  # target: points more settled on the deployment articles
    max_system_f1_loss: float = 0.3  # target: whole-system F1 no lower, within this
    ask_entropy_threshold: float | None = None  # the asking device's E_T instead of the bundle's
    learn_offload: bool = True  # learn and publish E_offload when the retrained edge is refused
    # F1 points E_offload may cost, estimated pessimistically from the store: the stated tolerance
    offload_budget: float = 0.3
    seed: int = 0

    def retrain_options(self) -> dict[str, Any]:
        if self.target not in RETRAIN_TARGETS:
            raise ValueError(
                f"unknown retrain target {self.target!r}; choose one of {sorted(RETRAIN_TARGETS)}"
            )
        options = dict(RETRAIN_TARGETS[self.target])
        if self.learning_rate is not None:
            options["learning_rate"] = self.learning_rate
        return options


def _offload_record(r: OffloadResult) -> dict[str, Any]:
    out = r.to_dict()
    out["decision"] = "publish" if r.published else "refuse"
    return out


def _write_squad(path: Path, examples: Sequence) -> Path:
    from elma_utils.squad.data import examples_to_squad_json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(examples_to_squad_json(examples)))
    return path


class RoundDevice:
    """The device side of a ``LoopbackDeployment``: ask through ``EdgeQA``, sync over SFTP, swap."""

    def __init__(self, deployment, model_root: Path, ask_entropy_threshold: float | None = None):
        self.dep, self.root = deployment, Path(model_root)
        self.ask_entropy_threshold = ask_entropy_threshold

    @property
    def version(self) -> str:
        return self.dep.edge.model_version

    def sync(self) -> dict[str, Any]:
        """Fetch the published version; when a new one was installed, load it and swap it in."""
        from elma_utils.edge import sync
        from elma_utils.edge.runtime import EdgeModel

        before = self.version
        result = sync.sync_with_client(self.dep.tunnel, ".", self.root)
        if result.updated or before != result.version:
            model = EdgeModel.load(sync.current_bundle(self.root))
            if self.ask_entropy_threshold is not None:
                from elma_utils.early_exit.policies import EntropyPolicy

                model.policy = EntropyPolicy(self.ask_entropy_threshold)
                model.offload_threshold = None  # the asking device offloads all it does not settle
            self.dep.edge.edge = model
            self.dep.edge.model_version = str(model.manifest["model_version"])
        return {
            "status": result.status,
            "version": result.version,
            "previous": before,
            "bytes": result.bytes,
            "seconds": result.seconds,
            "picked_up": self.version == result.version and self.version != before,
        }

    def bundle(self) -> Path:
        from elma_utils.edge.sync import current_bundle

        return current_bundle(self.root)

    def ask(self, examples: Sequence) -> dict[str, int]:
        sources = [self.dep.edge.answer(e.question, e.context).source for e in examples]
        return {
            "asked": len(sources),
            "offloaded": sources.count("server"),
            "fallbacks": sources.count("edge-fallback"),
        }


def _grow_record(r: publish.RetrainResult) -> dict[str, Any]:
    recal = r.recalibration or {}
    return {
        "published": r.published,
        "decision": (r.gate or {}).get("decision", "refuse" if not r.published else "publish"),
        "reason": r.reason,
        "gate": r.gate,
        "version": r.version,
        "mode": r.mode,
        "train_questions": r.train_questions,
        "original_questions": r.original_questions,
        "E_T": recal.get("E_T"),
        "E_T_before": recal.get("E_T_before"),
        "recalibration": recal,
        "gate_sets": {
            "current": (r.current or {}).get("sets"),
            "candidate": (r.candidate or {}).get("sets"),
        },
        "candidate": r.candidate_probe,
        "train": r.train,
        "seconds": r.seconds,
    }


def _domain_sets(
    domain: DeploymentDomain, full_model_dir: str | Path, answers_dir: Path
) -> list[publish.EvalSet]:
    """The measuring sets of a domain: its later deployment questions and the other ones."""
    return measure_sets({"deployment": domain.later, "other": domain.other}, full_model_dir, answers_dir)


def run_target(
    full_model_dir: str | Path,
    bundle_dir: str | Path,
    exits_dir: str | Path,
    work_dir: str | Path,
    domain: DeploymentDomain,
    replay: Sequence,
    settings: RoundsSettings,
    *,
    measure_on: list | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """The rounds for one target (module note); returns the round records, round 0 first."""
    from elma_utils.bench.loopback import LoopbackDeployment

    options = settings.retrain_options()
    work = Path(work_dir) / settings.target.replace("+", "_")
    shutil.rmtree(work, ignore_errors=True)  # every run starts from the initial bundle
    server_root, data = work / "server", work / "data"
    publish.publish_bundle(bundle_dir, server_root, exits_dir=exits_dir)
    calibration = _write_squad(data / "calibration.json", domain.calibration)
    guard = _write_squad(data / "guard.json", domain.guard)
    original = _write_squad(data / "replay.json", replay) if replay else None
    sets = measure_on or _domain_sets(domain, full_model_dir, server_root / publish.SERVER_ANSWERS_DIR)
    rounds: list[dict[str, Any]] = []
    with LoopbackDeployment(
        full_model_dir, bundle_dir, work / "loop", device_id=f"growth-{work.name}",
        sftp_root=publish.bundles_dir(server_root),
    ) as dep:  # fmt: skip
        device = RoundDevice(dep, work / "device", settings.ask_entropy_threshold)
        store_path = dep.server.store.db.path
        if settings.learn_offload:  # loaded once: the guard keeps the server's answers between rounds
            pricing = _write_squad(data / "offload_pricing.json", domain.gain_questions)
            pricing_set = publish.load_eval_set(pricing, "offload pricing")
            guard_set = publish.load_eval_set(guard, "guard")
        for index in range(len(domain.asked_rounds) + 1):
            t0 = time.perf_counter()
            record: dict[str, Any] = {
                "target": settings.target,
                "round": index,
                "grow": None,
                "offload": None,
            }
            if index == 0:
                record.update(asked=0, offloaded=0, fallbacks=0, sync=device.sync())
            else:
                record.update(device.ask(domain.asked_rounds[index - 1]))
                result = publish.retrain_edge(
                    store_path, server_root, full_model_dir=full_model_dir, original_train=original,
                    dev_eval=guard, calibration=calibration, max_f1_loss=settings.max_f1_loss,
                    eval_fraction=settings.eval_fraction, squad_version="1.1", epochs=settings.epochs,
                    batch_size=settings.batch_size, tolerance=settings.tolerance,
                    max_share_drop=settings.max_share_drop, seed=settings.seed + index,
                    on_candidate=lambda bundle: measure(bundle, sets), **options,
                )  # fmt: skip
                record["grow"] = _grow_record(result)
                if not result.published and settings.learn_offload:  # as the server's growth step does
                    offload = learn_from_store(
                        store_path, server_root, full_model_dir=full_model_dir, calibration=pricing_set,
                        guard=guard_set, budget=settings.offload_budget, tolerance=settings.max_system_f1_loss,
                        device_ids=[dep.edge.device_id], on_candidate=lambda bundle: measure(bundle, sets),
                    )  # fmt: skip
                    record["offload"] = _offload_record(offload)
                record["sync"] = device.sync()
            record["stored_questions"] = dep.server.store.stats().questions
            record["device_version"] = device.version
            record.update(measure(device.bundle(), sets))
            record.pop("model_version", None)
            first = rounds[0] if rounds else record
            record["change"] = {g: change(record[g], first[g]) for g in ("deployment", "other")}
            record["seconds"] = time.perf_counter() - t0
            rounds.append(record)
            log(_round_line(record))
    return rounds


def _round_line(r: dict[str, Any]) -> str:
    d, o, g = r["deployment"], r["other"], r["grow"]
    what = "start" if g is None else ("published" if g["published"] else "kept") + f" ({g['reason'][:90]})"
    if r.get("offload"):
        what += f"; offload threshold: {r['offload']['reason'][:120]}"
    return (
        f"[{r['target']}] round {r['round']}: asked {r['asked']}, offloaded {r['offloaded']}, stored "
        f"{r['stored_questions']}; {what}; device {r['device_version']}; deployment: "
        f"{d['share_on_device']:.1f} % on device, system F1 {d['system_f1']:.2f}, device F1 "
        f"{d['device_f1']:.2f}; other: {o['share_on_device']:.1f} %, system F1 {o['system_f1']:.2f} "
        f"({r['seconds']:.0f} s)"
    )


def run_growth_rounds(
    full_model_dir: str | Path,
    bundle_dir: str | Path,
    exits_dir: str | Path,
    work_dir: str | Path,
    domain: DeploymentDomain,
    replay: Sequence,
    settings: RoundsSettings,
    targets: Sequence[str] = ("exits",),
    log=print,
) -> dict[str, Any]:
    """Every target's rounds, from the same initial bundle on the same domain.

    Returns ``{"rounds": [...every target's records...], "summary": {target: ...},
    "domain": domain.describe(), "settings": ...}``. The measuring questions' server answers
    are computed once and shared by the targets."""
    t0 = time.perf_counter()
    work = Path(work_dir)
    sets = _domain_sets(domain, full_model_dir, work / "server-answers")
    rounds: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for target in targets:
        s = RoundsSettings(**{**asdict(settings), "target": target})
        mine = run_target(
            full_model_dir, bundle_dir, exits_dir, work, domain, replay, s, measure_on=sets, log=log
        )
        rounds += mine
        summary[target] = summarise(mine, s)
    return {
        "rounds": rounds,
        "summary": summary,
        "domain": domain.describe(),
        "settings": {**asdict(settings), "targets": list(targets), "replay_questions": len(replay)},
        "retrain_targets": {t: RETRAIN_TARGETS[t] for t in targets},
        "seconds": time.perf_counter() - t0,
    }


def summarise(rounds: Sequence[dict[str, Any]], settings: RoundsSettings) -> dict[str, Any]:
    """One target's rounds in a few numbers: publications, pick-ups, the targets of the issue,
    and what the stored questions taught against what replay cost (train sizes per round)."""
    grown = [r["grow"] for r in rounds if r["grow"] is not None]
    offload_published = sum(bool(r.get("offload") and r["offload"]["published"]) for r in rounds)
    return {
        "rounds": len(grown),
        # every publication the device could pick up: a retrained edge or a learned offload threshold
        "published": sum(g["published"] for g in grown) + offload_published,
        "retrained_published": sum(g["published"] for g in grown),
        "offload_thresholds_published": offload_published,
        "offload_thresholds": [(r["offload"] or {}).get("learned", {}).get("E_offload") for r in rounds[1:]],
        "picked_up_by_device": sum(bool(r["sync"]["picked_up"]) for r in rounds[1:]),
        "versions": [r["device_version"] for r in rounds],
        "stored_questions": rounds[-1]["stored_questions"],
        "train_questions": [g["train_questions"] for g in grown],
        "replay_questions": [g["original_questions"] for g in grown],
        "decisions": [g["decision"] for g in grown],
        "targets": targets_met(
            rounds[0],
            rounds[-1],
            min_share_gain=settings.min_share_gain,
            max_system_f1_loss=settings.max_system_f1_loss,
            forgetting_tolerance=settings.forgetting_tolerance,
        ),  # fmt: skip
        "best_candidate": _best_candidate(rounds),
    }


def _best_candidate(rounds: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate (retrained edge or offload threshold, published or not) that settled most of
    the deployment questions, with its change from round 0: what the loop could reach if the gate
    let everything through."""
    first = rounds[0]
    probes = [
        (r["round"], kind, r[key][probe])
        for r in rounds
        for kind, key, probe in (
            ("retrained", "grow", "candidate"),
            ("offload threshold", "offload", "candidate_probe"),
        )
        if r.get(key) is not None and isinstance(r[key].get(probe), dict)
    ]
    if not probes:
        return None
    index, kind, best = max(probes, key=lambda p: p[2]["deployment"]["share_on_device"])
    return {
        "round": index,
        "kind": kind,
        "deployment_change": change(best["deployment"], first["deployment"]),
        "other_change": change(best["other"], first["other"]),
    }
