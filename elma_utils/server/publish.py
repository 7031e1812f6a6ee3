"""`elma publish`: grow the edge model from the offloaded questions and publish it for `elma sync`.

Server layout (``server_root``)::

    bundles/                 the SFTP root edge devices read (``SSHEndpoint(sftp_root=…)``, sshd)
      LATEST.json            pointer: version, manifest sha256 + size, serial (``sync.LatestPointer``)
      edge-000002-…/         one bundle per published version, never changed afterwards
    exits/<version>/         the Keras exits weights behind each published bundle (next retrain starts here)
    retrain/run-…/           one directory per retraining: the store export and report.json

``retrain_edge`` exports the hard-question store (server answers as pseudo-labels: the full
model is the teacher), optionally mixes in original training questions, trains the current
edge's exit heads (``distill``) or heads and kept layers (``joint_distill``) from the
current exits weights, exports a candidate bundle with the current bundle's exit policy and
windows (its E_T chosen again on ``calibration`` questions when given: retrained heads are
more or less sure than the old ones, see ``early_exit.recalibrate``), and scores candidate
and current bundle with the edge runtime on the same held-out questions (the export's eval
contexts and/or SQuAD dev questions).

The gate prices what the candidate changes (``gate_report``): by default (``price_offloads``)
it judges the *whole system's* answers, the edge's for the questions it settles and the
server's full-model answers for those it offloads (the store's pseudo-labels for its eval
contexts; the full model run once, cached under ``server-answers/``, for the dev questions).
An edge-only F1 would reward a candidate that settles more questions with worse answers, and
punish one that offloads the questions it gets wrong. The candidate is published only when
that F1 is not lower than the current one's by more than ``tolerance`` points and it settles
on the edge no fewer of those questions than the current one, less ``max_share_drop`` points
(an edge that offloads more costs the server time and the device a round trip per question);
otherwise the current version stays and the result says why (``publish_refusal``), with every
check's numbers in ``RetrainResult.gate``.

Publishing is atomic for readers: the bundle is complete and verified in a hidden staging
directory, renamed to ``bundles/<version>/``, and only then is LATEST.json replaced
(temp file + ``os.replace``). Versions are ``edge-<serial>-<UTC time>-<content sha>``, the
serial one more than any published before, so they increase and never repeat.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from elma_utils.atomic_files import fsync_dir, write_bytes_atomic
from elma_utils.early_exit.exits_artifact import (
    EXITS_CONFIG,
    EXITS_WEIGHTS,
    full_model_entry,
    full_model_path,
)
from elma_utils.edge.sync import LATEST_NAME, LatestPointer, SyncError, parse_latest, version_serial
from elma_utils.export.bundle import (
    MANIFEST,
    copy_listed,
    for_new_weights,
    read_thresholds,
    sha256_file,
    verify_bundle,
)
from elma_utils.file_lock import exclusive_lock

BUNDLES_DIR = "bundles"
EXITS_DIR = "exits"
RUNS_DIR = "retrain"
SERVER_ANSWERS_DIR = "server-answers"
LOCK_NAME = ".publish.lock"


class PublishError(RuntimeError):
    """Publishing or retraining cannot go ahead (missing current bundle, exits, data …)."""


# ---------------------------------------------------------------- publishing


def bundles_dir(server_root: str | os.PathLike) -> Path:
    """The directory to serve over SFTP."""
    return Path(server_root) / BUNDLES_DIR


def read_latest(server_root: str | os.PathLike) -> LatestPointer | None:
    """The published pointer, or None before the first publication."""
    path = bundles_dir(server_root) / LATEST_NAME
    if not path.is_file():
        return None
    try:
        return parse_latest(path.read_bytes())
    except SyncError as err:
        raise PublishError(f"{path}: {err}") from err


def latest_bundle(server_root: str | os.PathLike) -> Path | None:
    pointer = read_latest(server_root)
    return None if pointer is None else bundles_dir(server_root) / pointer.version


@contextlib.contextmanager
def _publish_lock(server_root: Path) -> Iterator[None]:
    """One publisher at a time, so serials stay unique."""
    with exclusive_lock(server_root / LOCK_NAME):
        yield


def _next_serial(bundles: Path) -> int:
    serials = [version_serial(p.name) or 0 for p in bundles.iterdir()] if bundles.is_dir() else []
    pointer_file = bundles / LATEST_NAME
    if pointer_file.is_file():
        with contextlib.suppress(SyncError):
            serials.append(parse_latest(pointer_file.read_bytes()).serial or 0)
    return max(serials, default=0) + 1


def _copy_tree_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.rename(tmp, dst)


def _promote(staging: Path, server_root: Path, exits_dir: Path | None, notes: dict | None) -> str:
    """Name the staged bundle, move it into ``bundles/``, then point LATEST.json at it (under the lock)."""
    bundles = bundles_dir(server_root)
    manifest = verify_bundle(staging)
    content = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    serial = _next_serial(bundles)
    version = f"edge-{serial:06d}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{content[:8]}"
    manifest.setdefault("source_model_version", manifest["model_version"])
    manifest["model_version"] = version  # the edge checks that the manifest names the published version
    write_bytes_atomic(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
    verify_bundle(staging)
    if exits_dir is not None:
        (server_root / EXITS_DIR).mkdir(parents=True, exist_ok=True)
        _copy_tree_atomic(exits_dir, server_root / EXITS_DIR / version)
    os.rename(staging, bundles / version)
    fsync_dir(bundles)
    mpath = bundles / version / MANIFEST
    pointer = LatestPointer(
        version,
        sha256_file(mpath),
        mpath.stat().st_size,
        serial,
        datetime.now(UTC).isoformat(timespec="seconds"),
        notes or {},
    )
    write_bytes_atomic(bundles / LATEST_NAME, pointer.to_json())
    return version


def publish_bundle(
    bundle_dir: str | os.PathLike,
    server_root: str | os.PathLike,
    *,
    exits_dir: str | os.PathLike | None = None,
    notes: dict | None = None,
) -> str:
    """Publish a copy of an existing bundle as the next version; returns the version.

    ``exits_dir``: the exits artifact the bundle was exported from (``exits.json`` +
    weights), kept as ``exits/<version>`` so that ``retrain_edge`` can continue from it.
    The source directory is not changed; the published copy's manifest names the new version
    (the old name is kept as ``source_model_version``).
    """
    server_root, bundle_dir = Path(server_root), Path(bundle_dir)
    verify_bundle(bundle_dir)
    if exits_dir is not None and not (Path(exits_dir) / EXITS_WEIGHTS).is_file():
        raise PublishError(f"{exits_dir} holds no {EXITS_WEIGHTS}")
    bundles = bundles_dir(server_root)
    bundles.mkdir(parents=True, exist_ok=True)
    with _publish_lock(server_root):
        staging = bundles / f".staging-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            copy_listed(bundle_dir, staging)
            return _promote(staging, server_root, Path(exits_dir) if exits_dir else None, notes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- evaluation with the edge runtime


@dataclass
class EvalSet:
    """Held-out questions: examples, the SQuAD json they score against, and its version.

    ``server_answers`` (qas_id -> text, "" for no answer): what the server's full model says,
    so that ``evaluate_bundle`` can also score the whole system."""

    name: str
    examples: list
    raw: dict
    version: str
    server_answers: dict[str, str] | None = None


def evaluate_bundle(bundle: str | os.PathLike, eval_sets: Sequence[EvalSet]) -> dict:
    """F1/EM (percent) of a bundle's edge answers, with its own exit policy, per set and pooled.

    ``f1``/``exact``: the edge's answer to every question; questions no layer settles are
    scored with the last kept layer's answer (what the edge says before offloading), so the
    number measures the edge model, not the server. ``settled_f1``: the same over the settled
    questions only. For sets with ``server_answers``: ``system_f1``/``system_exact``, the
    answers the user gets (the edge's where it settles, the server's where it offloads);
    pooled only when every set has them.
    """
    from elma_utils.edge.runtime import EdgeModel
    from elma_utils.squad.metrics import per_question_scores

    model = EdgeModel.load(bundle)
    pooled: dict[str, list[float]] = {}
    sets = {}
    for s in eval_sets:
        answers = model.answer_features(s.examples, model.features_for(s.examples))
        scores = per_question_scores(
            s.raw, {e.qas_id: a.text for e, a in zip(s.examples, answers, strict=True)}, s.version
        )
        rows = {
            "f1": [100 * scores[e.qas_id][1] for e in s.examples],
            "exact": [100 * scores[e.qas_id][0] for e in s.examples],
            "solved": [100.0 * a.solved for a in answers],
            "layer": [float(a.exit_layer) for a in answers],
        }
        if s.server_answers is not None:
            missing = [e.qas_id for e in s.examples if e.qas_id not in s.server_answers]
            if missing:
                raise PublishError(f"eval set {s.name}: no server answer for {len(missing)} questions")
            system = {
                e.qas_id: a.text if a.solved else s.server_answers[e.qas_id]
                for e, a in zip(s.examples, answers, strict=True)
            }
            sys_scores = per_question_scores(s.raw, system, s.version)
            rows["system_f1"] = [100 * sys_scores[e.qas_id][1] for e in s.examples]
            rows["system_exact"] = [100 * sys_scores[e.qas_id][0] for e in s.examples]
        sets[s.name] = _summary(rows)
        for k, v in rows.items():
            pooled.setdefault(k, []).extend(v)
    n = sum(len(s.examples) for s in eval_sets)
    pooled = {k: v for k, v in pooled.items() if len(v) == n}  # system_*: only when every set has it
    return {"model_version": model.manifest["model_version"], **_summary(pooled), "sets": sets}


def _summary(rows: dict[str, list[float]]) -> dict:
    n = len(rows.get("f1", []))

    def mean(k: str) -> float:
        return float(sum(rows[k]) / n) if n else 0.0

    settled = [f for f, s in zip(rows.get("f1", []), rows.get("solved", []), strict=True) if s]
    out = {
        "questions": n,
        "f1": mean("f1"),
        "exact": mean("exact"),
        "share_solved": mean("solved"),
        "avg_exit_layer": mean("layer"),
        "settled_f1": float(sum(settled) / len(settled)) if settled else None,
    }
    if "system_f1" in rows:
        out["system_f1"] = mean("system_f1")
        out["system_exact"] = mean("system_exact")
    return out


# ---------------------------------------------------------------- retraining


@dataclass
class RetrainResult:
    """What ``retrain_edge`` did; ``reason`` says why it published or kept the current version."""

    published: bool
    reason: str
    current_version: str
    version: str | None = None  # the new version when published
    mode: str = "distill"
    tolerance: float = 0.0
    max_share_drop: float = 2.0
    current: dict = field(default_factory=dict)  # evaluate_bundle of the current bundle
    candidate: dict = field(default_factory=dict)
    train_questions: int = 0
    original_questions: int = 0
    train: dict = field(default_factory=dict)  # fit_exit_heads stats
    recalibration: dict = field(default_factory=dict)  # the candidate's E_T, chosen again
    gate: dict = field(default_factory=dict)  # gate_report: every check, its numbers, the decision
    price_offloads: bool = True  # the gate judged whole-system answers (see gate_report)
    candidate_probe: Any = None  # what retrain_edge(on_candidate=...) returned for the candidate
    run_dir: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


SYSTEM_ANSWERS = "edge answers for what it settles, the server's for what it offloads"


def gate_report(
    current: dict, candidate: dict, *, tolerance: float = 0.0, max_share_drop: float = 2.0
) -> dict:
    """Every check of the publication gate with its numbers (``evaluate_bundle`` results of
    ``current`` and ``candidate`` on the same held-out questions).

    The F1 check judges the whole system's answers (``system_f1``: the edge's where it
    settles, the server's where it offloads) when both results have them, else the edge's
    answers (``f1``); results that disagree on it (one priced, one not) are refused with a
    ValueError rather than compared on the edge's F1 without saying so. ``refusal``: why the
    candidate must not replace the current version (the first failed check), or None when it may."""
    n = current["questions"]
    system = "system_f1" in current and "system_f1" in candidate
    if system != ("system_f1" in current or "system_f1" in candidate):
        priced = "current" if "system_f1" in current else "candidate"
        raise ValueError(
            f"the gate cannot compare: only the {priced} result has whole-system F1; evaluate both "
            "bundles on the same eval sets (with or without the server's answers)"
        )
    key = "system_f1" if system else "f1"
    cur, new = float(current[key]), float(candidate[key])
    f1_ok = new >= cur - tolerance - 1e-9
    cur_share, new_share = float(current["share_solved"]), float(candidate["share_solved"])
    share_ok = new_share >= cur_share - max_share_drop - 1e-9
    checks = [
        {"check": key, "current": cur, "candidate": new, "limit": cur - tolerance, "passed": f1_ok},
        {
            "check": "share_solved",
            "current": cur_share,
            "candidate": new_share,
            "limit": cur_share - max_share_drop,
            "passed": share_ok,
        },
    ]
    refusal = None
    if not f1_ok:
        what = f"whole-system F1 ({SYSTEM_ANSWERS})" if system else "F1"
        refusal = (
            f"candidate {what} {new:.2f} is below {cur - tolerance:.2f} (current {cur:.2f} minus "
            f"tolerance {tolerance:g}) on {n} held-out questions"
        )
    elif not share_ok:
        refusal = (
            f"candidate settles {new_share:.1f} % of {n} held-out questions on the edge, below "
            f"{cur_share - max_share_drop:.1f} % (current {cur_share:.1f} % minus max share drop "
            f"{max_share_drop:g}): it would offload more"
        )
    return {
        "criterion": key,
        "questions": n,
        "tolerance": tolerance,
        "max_share_drop": max_share_drop,
        "checks": checks,
        "refusal": refusal,
        "decision": "refuse" if refusal else "publish",
    }


def publish_refusal(
    current: dict, candidate: dict, *, tolerance: float = 0.0, max_share_drop: float = 2.0
) -> str | None:
    """Why ``candidate`` must not replace ``current`` (``evaluate_bundle`` results on the same
    held-out questions), or None when it may: it loses more than ``tolerance`` F1 (whole-system
    F1 when both results have it, see ``gate_report``), or it settles more than
    ``max_share_drop`` percentage points fewer questions on the edge (more offloads)."""
    return gate_report(current, candidate, tolerance=tolerance, max_share_drop=max_share_drop)["refusal"]


def save_exits(multi, full_model_dir: str | os.PathLike, out_dir: str | os.PathLike, **notes: Any) -> Path:
    """Save a MultiExitQAModel's weights as an exits artifact (``load_exits`` reads it back).

    The weights go through a fresh, uncompiled copy so no optimizer state is stored."""
    from elma_utils.model import artifacts
    from elma_utils.model.multi_exit import MultiExitQAModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = artifacts.read_config(Path(full_model_dir))["backbone"]
    backbone, _ = artifacts.build_backbone(
        b["kind"], b["kwargs"], dropout=b.get("dropout", 0.1), pretrained=False
    )
    clean = MultiExitQAModel(backbone, multi.num_exits)
    clean.build_for()
    clean.set_weights(multi.get_weights())
    clean.save_weights(out / EXITS_WEIGHTS)
    config = {**full_model_entry(full_model_dir, out), "num_exits": int(multi.num_exits), **notes}
    (out / EXITS_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return out


def _edge_model(exits_dir: Path, full_model_dir: Path | None, num_exits: int):
    """The current edge as a Keras model: exits weights on the full model's backbone, ``num_exits`` kept."""
    from elma_utils.early_exit.experiment import load_exits_model_from
    from elma_utils.model.multi_exit import MultiExitQAModel

    cfg_path = exits_dir / EXITS_CONFIG
    if not cfg_path.is_file() or not (exits_dir / EXITS_WEIGHTS).is_file():
        raise PublishError(f"{exits_dir}: no exits artifact ({EXITS_CONFIG} + {EXITS_WEIGHTS}) to start from")
    ecfg = json.loads(cfg_path.read_text())
    full = Path(full_model_dir) if full_model_dir else full_model_path(exits_dir, ecfg)
    if int(ecfg["num_exits"]) < num_exits:
        raise PublishError(f"{exits_dir} has {ecfg['num_exits']} exits; the edge keeps {num_exits} layers")
    multi, tokenizer, _ = load_exits_model_from(full, int(ecfg["num_exits"]))
    multi.load_weights(exits_dir / EXITS_WEIGHTS)
    if multi.num_exits > num_exits:  # exits trained at full depth; the edge keeps the first layers
        edge = MultiExitQAModel(multi.backbone, num_exits)
        edge.build_for()
        for mine, theirs in zip(edge.exit_heads, multi.exit_heads, strict=False):
            mine.set_weights(theirs.get_weights())
        multi = edge
    return multi, tokenizer, full


def full_model_of(exits_dir: str | os.PathLike, full_model_dir: str | os.PathLike | None = None) -> Path:
    """The full model an exits artifact sits on (``full_model_dir`` when given)."""
    if full_model_dir is not None:
        return Path(full_model_dir)
    cfg_path = Path(exits_dir) / EXITS_CONFIG
    if not cfg_path.is_file():
        raise PublishError(f"{exits_dir}: no {EXITS_CONFIG} naming the full model")
    return full_model_path(Path(exits_dir), json.loads(cfg_path.read_text()))


def answers_cache_key(examples: Sequence, *model_key: Any) -> str:
    """A file-name-safe key for a model's answers to ``examples``: ``model_key`` (what makes
    the model's answers, JSON-able) and every question's id, text and context."""
    items = list(model_key) + [[e.qas_id, e.question, e.context] for e in examples]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:24]


def server_answers_for(
    full_model_dir: str | os.PathLike, examples: Sequence, cache_dir: str | os.PathLike | None = None
) -> dict[str, str]:
    """qas_id -> the full model's answer ("" for no answer), as the server would give it
    (``ModelAnswerer``). Kept in ``cache_dir`` keyed by the model's weights file and the
    questions, so a growth loop pays for each held-out set once (the server model never changes)."""
    from elma_utils.model import artifacts

    full = Path(full_model_dir)
    weights = full / artifacts.WEIGHTS_FILE
    st = weights.stat() if weights.is_file() else None
    key = answers_cache_key(examples, str(full.resolve()), st and [st.st_size, st.st_mtime_ns])
    cached = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads(cached.read_text())
    from elma_utils.server.service import ModelAnswerer

    answerer = ModelAnswerer.load(full)
    replies = answerer.answer_batch([(e.question, e.context) for e in examples])
    answers = {e.qas_id: ("" if a.no_answer else a.text) for e, a in zip(examples, replies, strict=True)}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cached, json.dumps(answers).encode())
    return answers


def _with_server_answers(eval_sets: list[EvalSet], full_model_dir: Path, cache_dir: Path) -> None:
    """Give every held-out set the server's answers: the store's own pseudo-labels for its eval
    contexts (they are the server's answers), the full model's for the others."""
    for s in eval_sets:
        if s.server_answers is not None:
            continue
        if s.name == "store_eval":
            s.server_answers = {e.qas_id: (e.answers[0].text if e.answers else "") for e in s.examples}
        else:
            s.server_answers = server_answers_for(full_model_dir, s.examples, cache_dir)


def load_eval_set(path: Path, name: str, limit: int | None = None) -> EvalSet:
    """The first ``limit`` questions of a SQuAD json as an ``EvalSet`` named ``name``."""
    from elma_utils.squad.data import load_squad_file

    ds = load_squad_file(path, limit=limit)
    return EvalSet(name, ds.examples, ds.raw, ds.version)


@dataclass
class _GrownData:
    train: list  # SquadExample: stored questions (pseudo-labelled), then original ones
    eval_sets: list[EvalSet]
    stored: int
    original: int

    @property
    def held_out(self) -> int:
        return sum(len(s.examples) for s in self.eval_sets)


def _grown_data(
    store_path, run_dir: Path, eval_fraction: float, seed: int, squad_version: str, original_train,
    original_limit: int | None, dev_eval, dev_limit: int | None,
) -> _GrownData:  # fmt: skip
    """Export the store (split by context) and gather the training and held-out questions."""
    from elma_utils.server.store import HardQuestionStore

    with HardQuestionStore(store_path) as store:
        summary = store.export_squad(
            run_dir / "train.json", run_dir / "eval.json", eval_fraction, seed, version=squad_version
        )
    eval_sets = [load_eval_set(run_dir / "eval.json", "store_eval")] if summary.eval_questions else []
    if dev_eval is not None:
        eval_sets.append(load_eval_set(Path(dev_eval), "dev", dev_limit))
    stored = load_eval_set(run_dir / "train.json", "store_train").examples if summary.train_questions else []
    original = (
        load_eval_set(Path(original_train), "original", original_limit).examples if original_train else []
    )
    return _GrownData(stored + original, eval_sets, len(stored), len(original))


def _train_candidate(
    exits: Path, full_model_dir, manifest: dict, thresholds: dict, examples: list, run_dir: Path, *,
    mode: str, epochs: float, learning_rate: float, batch_size: int, seed: int, verbose,
    calibration: EvalSet | None = None, max_f1_loss: float = 1.0, skim=None,
) -> tuple[Path, Path, dict, dict]:  # fmt: skip
    """Train from the current exits; returns (candidate bundle, its exits artifact, training
    stats, the E_T recalibration report — empty without ``calibration``). ``skim``: the current
    bundle's skim head, carried into the candidate (its E_T chosen on skimmed statistics)."""
    import keras

    from elma_utils.export.bundle import write_bundle
    from elma_utils.model.exit_training import fit_exit_heads
    from elma_utils.squad.features import build_features

    keras.utils.set_random_seed(seed)
    multi, tokenizer, full = _edge_model(
        exits, Path(full_model_dir) if full_model_dir else None, manifest["num_layers"]
    )
    seq_len = int(manifest["seq_len"])
    windows = {
        "doc_stride": int(manifest.get("doc_stride", 128)),
        "max_query_len": int(manifest.get("max_query_len", 64)),
    }
    feats = build_features(examples, tokenizer, max_seq_len=seq_len, progress=False, **windows)
    stats = fit_exit_heads(
        multi, feats, mode=mode, batch_size=batch_size, epochs=epochs, learning_rate=learning_rate, seed=seed,
        verbose=verbose,
    )  # fmt: skip
    recalibration: dict = {}
    if calibration is not None:
        from elma_utils.early_exit.recalibrate import recalibrate_entropy_threshold

        thresholds, recalibration = recalibrate_entropy_threshold(
            multi, tokenizer, calibration.examples, calibration.raw, calibration.version, thresholds,
            seq_len=seq_len, max_f1_loss=max_f1_loss, skim=skim, **windows,
        )  # fmt: skip
    exits_out = save_exits(
        multi, full, run_dir / "exits", mode=mode, init_exits=str(exits), train=stats, epochs=epochs,
        learning_rate=learning_rate, train_questions=len(examples),
    )  # fmt: skip
    bundle = write_bundle(
        multi, tokenizer, run_dir / "candidate", seq_len=seq_len, precision=manifest["precision"],
        thresholds=thresholds, model_version=f"candidate-{run_dir.name}",
        dynamic_length=bool(manifest.get("dynamic_length", True)), skim=skim, **windows,
    )  # fmt: skip
    return bundle, exits_out, stats, recalibration


def skim_head_kept(bundle: Path, manifest: dict, mode: str):
    """The skim head a retrained candidate of ``bundle`` keeps (None: the bundle skims nothing).

    A head reads the hidden states of its layer, so it stays valid only while the layers up to
    it are not trained: retraining the exit heads (``distill``, ``two_stage``) keeps it; a mode
    that trains the backbone is refused before any training, rather than publishing an edge
    that silently lost its adaptive width."""
    from elma_utils.edge.runtime import skim_from_manifest
    from elma_utils.model.multi_exit import BACKBONE_TRAINING_MODES

    head = skim_from_manifest(bundle, manifest)
    if head is not None and mode in BACKBONE_TRAINING_MODES:
        raise PublishError(
            f"{bundle.name} skims the passage after layer {head.layer}; mode {mode!r} retrains the layers its "
            "skim head reads: retrain the exit heads only (mode 'distill', growth target 'exits') or publish "
            "a bundle without skimming first"
        )
    return head


def publish_candidate(server_root: Path, based_on: str, candidate: Path, exits: Path, notes: dict) -> str:
    """Promote the candidate unless another version was published since it was compared."""
    with _publish_lock(server_root):
        now = read_latest(server_root)
        if now is None or now.version != based_on:
            raise PublishError(
                f"{LATEST_NAME} moved from {based_on} to {now and now.version} while retraining; "
                "run the retraining again against the new version"
            )
        staging = bundles_dir(server_root) / f".staging-{candidate.parent.name}"
        try:
            shutil.move(candidate, staging)
            return _promote(staging, server_root, exits, notes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def retrain_edge(
    store_path: str | os.PathLike,
    server_root: str | os.PathLike,
    *,
    mode: str = "distill",
    full_model_dir: str | os.PathLike | None = None,
    current_exits: str | os.PathLike | None = None,
    original_train: str | os.PathLike | None = None,
    original_limit: int | None = None,
    dev_eval: str | os.PathLike | None = None,
    dev_limit: int | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_limit: int | None = None,
    max_f1_loss: float = 1.0,
    eval_fraction: float = 0.2,
    squad_version: str = "2.0",
    epochs: float = 1.0,
    learning_rate: float = 5e-4,
    batch_size: int = 16,
    tolerance: float = 0.0,
    max_share_drop: float = 2.0,
    price_offloads: bool = True,
    seed: int = 0,
    verbose: int | str = 0,
    on_candidate: Callable[[Path], Any] | None = None,
) -> RetrainResult:
    """Retrain the published edge model on the grown data set; publish it only if it is no worse.

    ``mode``: "distill" trains the exit heads, "joint_distill" the kept layers too (any
    ``EXIT_MODES`` works). ``current_exits``: the exits artifact to start from (default
    ``exits/<current version>``); ``full_model_dir`` overrides the backbone it names.
    ``original_train``: SQuAD json whose first ``original_limit`` questions join the stored
    ones. Held-out: the store export's eval contexts (``eval_fraction`` of them) and, when
    given, the first ``dev_limit`` questions of ``dev_eval``. ``calibration``: SQuAD json whose
    first ``calibration_limit`` questions (trained on by neither model, disjoint from the
    held-out ones) choose the candidate's E_T anew, the cheapest within ``max_f1_loss`` F1 of
    its own full depth; without it the candidate keeps the current E_T. ``tolerance``: F1 points
    the candidate may lose (negative: it must win by that much); ``max_share_drop``: percentage
    points of held-out questions it may settle fewer on the edge (see ``publish_refusal``).
    ``price_offloads``: the gate judges the whole system's answers (edge where it settles,
    server where it offloads; ``gate_report``), not the edge's alone. ``on_candidate``: called
    with the candidate bundle before the gate decides (an experiment measuring candidates the
    gate refuses); its return value is kept as ``candidate_probe``. Trains under the current Keras dtype policy and seeds Keras' random generators with
    ``seed``. See the module note.
    """
    from elma_utils.model.multi_exit import EXIT_MODES

    if mode not in EXIT_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {EXIT_MODES}")
    t0 = time.perf_counter()
    server_root = Path(server_root)
    pointer = read_latest(server_root)
    if pointer is None:
        raise PublishError(
            f"{bundles_dir(server_root)} has no {LATEST_NAME}: publish a first bundle (publish_bundle)"
        )
    current = bundles_dir(server_root) / pointer.version
    manifest = verify_bundle(current)
    skim = skim_head_kept(current, manifest, mode)
    exits = Path(current_exits) if current_exits else server_root / EXITS_DIR / pointer.version
    run_dir = server_root / RUNS_DIR / f"run-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{os.urandom(2).hex()}"
    run_dir.mkdir(parents=True)
    result = RetrainResult(
        False, "", pointer.version, mode=mode, tolerance=tolerance, max_share_drop=max_share_drop,
        price_offloads=price_offloads, run_dir=str(run_dir),
    )  # fmt: skip
    data = _grown_data(
        store_path,
        run_dir,
        eval_fraction,
        seed,
        squad_version,
        original_train,
        original_limit,
        dev_eval,
        dev_limit,
    )
    result.train_questions, result.original_questions = data.stored, data.original
    if not data.stored or not data.held_out:
        result.reason = (
            f"kept {pointer.version}: the store gave {data.stored} training and {data.held_out} held-out "
            "questions; both are needed"
        )
        return _finish(result, run_dir, t0)
    calibration_set = (
        load_eval_set(Path(calibration), "calibration", calibration_limit) if calibration else None
    )
    candidate, candidate_exits, result.train, result.recalibration = _train_candidate(
        exits, full_model_dir, manifest, for_new_weights(read_thresholds(current)), data.train, run_dir, mode=mode,
        epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed, verbose=verbose,
        calibration=calibration_set, max_f1_loss=max_f1_loss, skim=skim,
    )  # fmt: skip
    try:
        if price_offloads:
            _with_server_answers(
                data.eval_sets, full_model_of(exits, full_model_dir), server_root / SERVER_ANSWERS_DIR
            )
        result.current = evaluate_bundle(current, data.eval_sets)
        result.candidate = evaluate_bundle(candidate, data.eval_sets)
        if on_candidate is not None:
            result.candidate_probe = on_candidate(candidate)
        result.gate = gate_report(
            result.current, result.candidate, tolerance=tolerance, max_share_drop=max_share_drop
        )
        key, n = result.gate["criterion"], result.current["questions"]
        cur, new = result.current[key], result.candidate[key]
        refusal = result.gate["refusal"]
        if refusal:
            result.reason = f"kept {pointer.version}: {refusal}"
            return _finish(result, run_dir, t0)
        notes = {"retrain": run_dir.name, "f1": round(result.candidate["f1"], 3), "previous": pointer.version,
                 "mode": mode}  # fmt: skip
        if key == "system_f1":
            notes["system_f1"] = round(new, 3)
        result.version = publish_candidate(server_root, pointer.version, candidate, candidate_exits, notes)
        result.published = True
        what = "whole-system F1" if key == "system_f1" else "F1"
        result.reason = (
            f"published {result.version}: candidate {what} {new:.2f} vs current {cur:.2f} on {n} held-out "
            f"questions (tolerance {tolerance:g}); settles {result.candidate['share_solved']:.1f} % vs "
            f"{result.current['share_solved']:.1f} %"
        )
        return _finish(result, run_dir, t0)
    finally:  # published: copied to bundles/ and exits/; refused: not kept
        shutil.rmtree(candidate, ignore_errors=True)
        shutil.rmtree(candidate_exits, ignore_errors=True)


def _finish(result: RetrainResult, run_dir: Path, t0: float) -> RetrainResult:
    result.seconds = time.perf_counter() - t0
    (run_dir / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result
