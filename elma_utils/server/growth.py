"""The growth loop: retrain/distil → gate → publish by itself, beside the server that answers.

``elma serve --server-root DIR --grow-after N [--grow-every S]`` starts a ``GrowthSupervisor``
thread. After ``N`` new stored hard questions since the last run (or every ``S`` seconds when
there are new ones) it launches one *step* in a separate process at the lowest CPU priority
(``nice -n 19``): by default ``python -m elma_utils.server.growth run``, which calls
``publish.retrain_edge`` on the store and the root (the gate publishes only a candidate that
is no worse). The server keeps answering: its model lives in its own process and threads;
the step only reads the store (SQLite WAL) and writes below ``retrain/``, ``exits/`` and
``bundles/`` (atomic for readers, see ``publish``).

One run at a time: runs are serial in the supervisor, and each holds ``growth/run.lock``
(flock, also passed to the step, so a step that outlives its server still holds it).
Every run is recorded atomically in ``growth/state.json``::

    {"offloads_seen": 812, "runs": 3, "settings": {...},
     "running": null | {"pid", "server_pid", "started_at", "trigger", "log", "result"},
     "last_run": {"outcome": "published" | "kept" | "failed" | "interrupted", "reason", "version",
                  "numbers": {...}, "started_at", "finished_at", "duration_s", "exit_status", "log"},
     "last_published": {...}}

``offloads_seen`` is the store's last offload row when the latest run started: questions
stored after it count toward the next run. The step gets its inputs from the environment
(``ELMA_STORE``, ``ELMA_SERVER_ROOT``, ``ELMA_FULL_MODEL``, ``ELMA_GROWTH_OPTIONS``: JSON of
``retrain_edge`` keyword arguments) and writes its result as JSON to ``ELMA_GROWTH_RESULT``;
a custom step (``--grow-command``) gets the same. Exit status 0: published, 3: kept the
current version, anything else: failed.

When the retrained edge is refused, the default step tries the other thing the store can
teach (``server.offload_threshold.learn_from_store``): the offload threshold ``E_offload``
the devices should use, priced from the stored offloads over the questions the devices
reported asking, on the growth options' ``calibration`` (what a disagreement is worth) and
``dev_eval`` (the gate) questions; the same weights with it are published when the gate
agrees. ``ELMA_GROWTH_OFFLOAD`` (JSON ``{"learn", "budget", "tolerance"}``, the config's
``[offload]`` table) sets it; ``learn = false`` turns it off.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from elma_utils.atomic_files import write_json_atomic
from elma_utils.file_lock import exclusive_lock
from elma_utils.server.status import ServerLayout, iso

log = logging.getLogger(__name__)

EXIT_PUBLISHED, EXIT_FAILED, EXIT_KEPT = 0, 1, 3
ENV_STORE, ENV_ROOT, ENV_FULL_MODEL = "ELMA_STORE", "ELMA_SERVER_ROOT", "ELMA_FULL_MODEL"
ENV_OPTIONS, ENV_RESULT = "ELMA_GROWTH_OPTIONS", "ELMA_GROWTH_RESULT"
ENV_OFFLOAD, ENV_SERVER_MODEL = "ELMA_GROWTH_OFFLOAD", "ELMA_SERVER_MODEL"
# the offload-threshold step after a refused retraining: on, within 0.3 F1 (estimated, and on the gate)
OFFLOAD_DEFAULTS: dict[str, Any] = {"learn": True, "budget": 0.3, "tolerance": 0.3}
NICENESS = 19
STOPPED = "the server stopped during the run"
# retrain_edge's own arguments, given by the supervisor, not by the options
# (on_candidate: a Python callable, for experiments that call retrain_edge directly)
_FIXED = {"store_path", "server_root", "full_model_dir", "on_candidate"}
_PATH_OPTIONS = {"current_exits", "original_train", "dev_eval", "calibration"}


def retrain_options() -> dict[str, Any]:
    """The ``retrain_edge`` keyword arguments a growth config may set, with their defaults."""
    from elma_utils.server.publish import retrain_edge

    return {
        name: p.default
        for name, p in inspect.signature(retrain_edge).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _FIXED
    }


def check_options(options: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """``options`` validated against ``retrain_edge`` (names, types, files that must exist);
    relative paths are taken from ``base``. Raises ValueError with one line saying what is wrong."""
    known = retrain_options()
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name not in known:
            raise ValueError(f"unknown growth option {name!r}; choose from {', '.join(sorted(known))}")
        default = known[name]
        if name in _PATH_OPTIONS:
            if not isinstance(value, str):
                raise ValueError(f"growth option {name} must be a path, got {value!r}")
            path = Path(value) if base is None or Path(value).is_absolute() else base / value
            if not path.exists():
                raise ValueError(f"growth option {name}: {path} not found")
            value = str(path.resolve())
        elif default is not None and not isinstance(value, type(default)):
            if not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(
                    f"growth option {name} must be {type(default).__name__} (like {default!r}), got {value!r}"
                )
            value = float(value)
        out[name] = value
    if "mode" in out:
        from elma_utils.model.multi_exit import EXIT_MODES

        if out["mode"] not in EXIT_MODES:
            raise ValueError(f"growth option mode {out['mode']!r}: choose one of {', '.join(EXIT_MODES)}")
    return out


def check_offload(offload: dict[str, Any]) -> dict[str, Any]:
    """The offload-threshold settings (``OFFLOAD_DEFAULTS`` filled in); ValueError saying what is wrong."""
    unknown = sorted(set(offload) - set(OFFLOAD_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown offload setting(s) {', '.join(unknown)}; use {', '.join(sorted(OFFLOAD_DEFAULTS))}"
        )
    out = {**OFFLOAD_DEFAULTS, **offload}
    if not isinstance(out["learn"], bool):
        raise ValueError(f"offload setting learn must be true or false, got {out['learn']!r}")
    for name in ("budget", "tolerance"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
            raise ValueError(f"offload setting {name} must be F1 points between 0 and 100, got {value!r}")
        out[name] = float(value)
    return out


@dataclass
class GrowthSettings:
    """When the growth loop runs and what its step does."""

    after: int | None = None  # run after this many new stored questions since the last run
    every_s: float | None = None  # or this often, when there are new ones
    full_model: Path | None = None  # retrain_edge(full_model_dir=): the backbone the exits sit on
    options: dict[str, Any] = field(default_factory=dict)  # retrain_edge keyword arguments
    offload: dict[str, Any] = field(default_factory=dict)  # the offload-threshold step (OFFLOAD_DEFAULTS)
    server_model: Path | None = None  # the model the server answers with (`elma serve --model`)
    command: list[str] | None = None  # the step; default: python -m elma_utils.server.growth run
    check_s: float = 5.0  # how often the schedule is looked at (a stored question wakes it at once)
    stop_timeout_s: float = 10.0  # a step interrupted by shutdown: SIGTERM, then SIGKILL after this
    max_run_s: float | None = 6 * 3600.0  # a step running longer is stopped and recorded as failed

    def check(self) -> GrowthSettings:
        if self.after is None and self.every_s is None:
            raise ValueError("the growth loop needs --grow-after N and/or --grow-every SECONDS")
        if self.after is not None and self.after < 1:
            raise ValueError(f"--grow-after must be at least 1, got {self.after}")
        if self.every_s is not None and not self.every_s > 0:
            raise ValueError(f"--grow-every must be a positive number of seconds, got {self.every_s}")
        if self.full_model is not None and not Path(self.full_model).is_dir():
            raise ValueError(f"--full-model {self.full_model}: no such model directory")
        if self.command is not None and not self.command:
            raise ValueError("--grow-command is empty")
        if self.max_run_s is not None and not self.max_run_s > 0:
            raise ValueError(f"max_run_seconds must be a positive number, got {self.max_run_s}")
        self.options = check_options(self.options)
        self.offload = check_offload(self.offload)
        return self

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["full_model"] = None if self.full_model is None else str(self.full_model)
        d["server_model"] = None if self.server_model is None else str(self.server_model)
        return d


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """A growth config (TOML): ``after``, ``every``, ``full_model``, ``command`` (a list),
    ``max_run_seconds`` at the top,
    ``retrain_edge`` keyword arguments in a ``[retrain]`` table; relative paths are taken from
    the file's directory. Returns GrowthSettings keyword arguments."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"growth config {path} not found") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"growth config {path}: {exc}") from exc
    allowed = {"after", "every", "full_model", "command", "max_run_seconds", "retrain", "offload"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(
            f"growth config {path}: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}"
        )
    out: dict[str, Any] = {"options": check_options(dict(raw.get("retrain", {})), path.parent)}
    if "offload" in raw:
        try:
            out["offload"] = check_offload(dict(raw["offload"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"growth config {path}: [offload]: {exc}") from exc
    if "after" in raw:
        out["after"] = raw["after"]
    if "every" in raw:
        out["every_s"] = float(raw["every"])
    if "max_run_seconds" in raw:
        out["max_run_s"] = float(raw["max_run_seconds"])
    if "full_model" in raw:
        out["full_model"] = (path.parent / raw["full_model"]).resolve()
    if "command" in raw:
        if not (isinstance(raw["command"], list) and all(isinstance(a, str) for a in raw["command"])):
            raise ValueError(f"growth config {path}: command must be a list of strings")
        out["command"] = raw["command"]
    return out


def _default_command() -> list[str]:
    return [sys.executable, "-m", "elma_utils.server.growth", "run"]


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _numbers(result: dict) -> dict[str, Any]:
    """The numbers of a ``RetrainResult`` worth keeping in the state file; when the offload
    step published instead, its candidate against the same weights without the threshold."""
    offload = result.get("offload") or {}
    cur, cand = result.get("current") or {}, result.get("candidate") or {}
    recal = result.get("recalibration") or {}
    if offload.get("published"):
        cur, cand, recal = offload.get("base") or {}, offload.get("candidate") or {}, {}
    return {
        "current_version": result.get("current_version"),
        "current_f1": cur.get("f1"),
        "candidate_f1": cand.get("f1"),
        "current_share_solved": cur.get("share_solved"),
        "candidate_share_solved": cand.get("share_solved"),
        "current_avg_exit_layer": cur.get("avg_exit_layer"),
        "candidate_avg_exit_layer": cand.get("avg_exit_layer"),
        "current_system_f1": cur.get("system_f1"),
        "candidate_system_f1": cand.get("system_f1"),
        "gate_criterion": (result.get("gate") or {}).get("criterion"),
        "held_out_questions": cur.get("questions"),
        "train_questions": result.get("train_questions"),
        "original_questions": result.get("original_questions"),
        "E_T": recal.get("E_T"),
        "retrain_seconds": result.get("seconds"),
        "run_dir": result.get("run_dir"),
        "E_offload": (offload.get("learned") or {}).get("E_offload") if offload.get("published") else None,
        "offload_reason": offload.get("reason"),
    }


class GrowthSupervisor:
    """Watches the store and runs the growth step now and then, one run at a time (module note)."""

    def __init__(
        self, server_root: str | os.PathLike, store_path: str | os.PathLike, settings: GrowthSettings
    ):
        self.layout = ServerLayout(Path(server_root))
        self.store_path = Path(store_path)
        self.settings = settings.check()  # fail at start, not at the first run; normalised once
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._started = time.time()
        self._said_unpublished = False
        self.layout.growth_logs.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = self._load_state()

    # -- state -------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        from elma_utils.server.status import read_growth_state

        state = read_growth_state(self.layout)
        state.setdefault("offloads_seen", 0)
        state.setdefault("runs", 0)
        running = state.get("running")
        if running:  # left by a server that stopped mid-run: interrupted, unless the step still runs
            with self._lock(blocking=False) as held:
                if held:
                    state["last_run"] = {
                        **running,
                        "outcome": "interrupted",
                        "reason": STOPPED,
                        "finished_at": None,
                    }
                    state["running"] = None
        return state

    def _save(self) -> None:
        self.state["settings"] = self.settings.describe()
        write_json_atomic(self.layout.growth_state, self.state)

    @contextlib.contextmanager
    def _lock(self, blocking: bool = True):
        """Yields the open lock file when this process holds ``growth/run.lock``, else None."""
        with exclusive_lock(self.layout.growth_lock, blocking) as fh:
            yield fh

    def stored_rows(self) -> int:
        """The store's last offload row (0 while it is empty); read-only, beside the server's writes."""
        if not self.store_path.is_file():
            return 0
        from elma_utils.server.status import _open_read_only

        conn = _open_read_only(self.store_path)
        try:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM offloads").fetchone()[0])
        finally:
            conn.close()

    def new_questions(self) -> int:
        return self.stored_rows() - int(self.state.get("offloads_seen", 0))

    # -- the thread --------------------------------------------------------------------------------
    def start(self) -> GrowthSupervisor:
        self._save()
        self._thread = threading.Thread(target=self._loop, name="elma-growth", daemon=True)
        self._thread.start()
        return self

    def notify_stored(self) -> None:
        """A new question was stored (called by the service): look again now."""
        with self._wake:
            self._wake.notify()

    def request_stop(self) -> None:
        """Stop starting runs and interrupt the one in progress (SIGTERM to its process group)."""
        self._stopping.set()
        with self._wake:
            self._wake.notify()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        """``request_stop`` and wait for the thread (a step that ignores SIGTERM is killed)."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.settings.stop_timeout_s + 5)

    def _loop(self) -> None:
        last_error = None
        while not self._stopping.is_set():
            with self._wake:
                self._wake.wait(self.settings.check_s)
            if self._stopping.is_set():
                return
            try:
                trigger = self.due()
                if trigger is not None:
                    self.run(trigger)
                last_error = None
            except Exception as exc:  # the loop outlives a bad store or pointer; the server goes on answering
                if repr(exc) != last_error:  # once, not every check_s
                    log.exception("growth: the supervisor's check failed (it keeps trying)")
                last_error = repr(exc)

    def due(self) -> str | None:
        """Why a run is due now, or None."""
        new = self.new_questions()
        if new <= 0:
            return None
        s = self.settings
        if s.after is not None and new >= s.after:
            return f"{new} new stored questions (--grow-after {s.after})"
        last = (self.state.get("last_run") or {}).get("started_ts") or self._started
        if s.every_s is not None and time.time() - float(last) >= s.every_s:
            return f"schedule (--grow-every {s.every_s:g} s), {new} new stored questions"
        return None

    # -- one run -----------------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        base = list(self.settings.command or _default_command())
        nice = shutil.which("nice")
        return [nice, "-n", str(NICENESS), *base] if nice else base

    def _env(self, result: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                ENV_STORE: str(self.store_path.resolve()),
                ENV_ROOT: str(self.layout.root.resolve()),
                ENV_OPTIONS: json.dumps(self.settings.options),
                ENV_OFFLOAD: json.dumps(self.settings.offload),
                ENV_RESULT: str(result),
            }
        )
        for name, path in (
            (ENV_FULL_MODEL, self.settings.full_model),
            (ENV_SERVER_MODEL, self.settings.server_model),
        ):
            if path is not None:
                env[name] = str(Path(path).resolve())
            else:
                env.pop(name, None)
        return env

    def run(self, trigger: str) -> dict | None:
        """Run the step once now (waits for it); returns the recorded run, or None when skipped
        (another run holds the lock, nothing is published yet, or the supervisor is stopping)."""
        from elma_utils.server.publish import read_latest

        with self._lock(blocking=False) as lock:
            if lock is None:
                log.info("growth: another run holds %s; skipped (%s)", self.layout.growth_lock, trigger)
                return None
            if self._stopping.is_set():
                return None
            if read_latest(self.layout.root) is None:
                if not self._said_unpublished:
                    log.warning(
                        "growth: nothing published in %s yet: runs wait for a first `elma publish bundle`",
                        self.layout.bundles,
                    )
                    self._said_unpublished = True
                return None
            return self._run_locked(trigger, lock)

    def _run_locked(self, trigger: str, lock) -> dict:
        started = time.time()
        name = f"run-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}-{self.state['runs'] + 1}"
        log_path = self.layout.growth_logs / f"{name}.log"
        result_path = self.layout.growth_logs / f"{name}.result.json"
        seen = self.stored_rows()
        with open(log_path, "ab") as log_fh:
            log_fh.write(f"growth run {name}: {trigger}\n".encode())
            log_fh.flush()
            proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=self._env(result_path),
                start_new_session=True,  # its own process group: stopped as a whole
                pass_fds=(lock.fileno(),),  # the lock stays held while the step lives
            )
        self._proc = proc
        running = {
            "pid": proc.pid,
            "server_pid": os.getpid(),
            "started_at": iso(started),
            "started_ts": started,
            "trigger": trigger,
            "log": str(log_path),
            "result": str(result_path),
            "offloads_at_start": seen,
        }
        self.state.update(running=running, offloads_seen=seen)
        self._save()
        log.info("growth: run started: %s (pid %d, log %s)", trigger, proc.pid, log_path)
        status, why = self._wait(proc)
        self._proc = None
        finished = time.time()
        record = {
            **running,
            **self._outcome(status, why, result_path, log_path),
            "finished_at": iso(finished),
            "duration_s": round(finished - started, 3),
            "exit_status": status,
        }
        self.state["runs"] = int(self.state.get("runs", 0)) + 1
        self.state["last_run"] = record
        self.state["running"] = None
        if record["outcome"] == "published":
            self.state["last_published"] = record
        self._save()
        log.info(
            "growth: run finished in %.1f s: %s%s",
            record["duration_s"],
            record["outcome"],
            f": {record['reason']}" if record.get("reason") else "",
        )
        return record

    def _wait(self, proc: subprocess.Popen) -> tuple[int, tuple[str, str] | None]:
        """The step's exit status, and (outcome, reason) when it was stopped (None: it ended)."""
        limit = self.settings.max_run_s
        end = None if limit is None else time.monotonic() + limit
        why: tuple[str, str] | None = None
        while why is None:
            try:
                status = proc.wait(0.5)
            except subprocess.TimeoutExpired:
                if self._stopping.is_set():
                    why = ("interrupted", STOPPED)
                elif end is not None and time.monotonic() > end:
                    why = ("failed", f"stopped after running longer than {limit:g} s (max_run_seconds)")
                    log.warning("growth: the step (pid %d) %s", proc.pid, why[1])
            else:  # ended; request_stop may have signalled it already
                return status, ("interrupted", STOPPED) if self._stopping.is_set() else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(self.settings.stop_timeout_s), why
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(), why

    @staticmethod
    def _outcome(
        status: int, stopped: tuple[str, str] | None, result_path: Path, log_path: Path
    ) -> dict[str, Any]:
        """What the run came to: the step's result when it wrote one, else why it was stopped,
        else its exit status and last log line."""
        result: dict | None = None
        if result_path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                result = json.loads(result_path.read_text())
        if isinstance(result, dict) and "published" in result:  # finished, even if stopped right after
            return {
                "outcome": "published" if result["published"] else "kept",
                "reason": result.get("reason", ""),
                "version": result.get("version"),
                "numbers": _numbers(result),
            }
        if stopped is not None:
            return {"outcome": stopped[0], "reason": stopped[1], "version": None}
        if isinstance(result, dict) and "error" in result:
            return {"outcome": "failed", "reason": str(result["error"]), "version": None}
        if status == EXIT_PUBLISHED:
            return {"outcome": "finished", "reason": _last_line(log_path), "version": None}
        return {
            "outcome": "failed",
            "reason": f"exit status {status}: {_last_line(log_path) or 'no output'}",
            "version": None,
        }


# ---------------------------------------------------------------- the step (a separate process)


def _lower_priority(target: int = NICENESS) -> int:
    """Raise this process's niceness to ``target`` (never lower it); returns the niceness."""
    now = os.nice(0)
    return os.nice(target - now) if now < target else now


def run_step(argv: list[str] | None = None) -> int:
    """``python -m elma_utils.server.growth run``: one retrain → gate → publish; the result as JSON."""
    p = argparse.ArgumentParser(prog="python -m elma_utils.server.growth")
    p.add_argument("what", choices=["run"])
    p.add_argument("--store", default=os.environ.get(ENV_STORE))
    p.add_argument("--server-root", default=os.environ.get(ENV_ROOT))
    p.add_argument("--full-model", default=os.environ.get(ENV_FULL_MODEL))
    p.add_argument(
        "--server-model", default=os.environ.get(ENV_SERVER_MODEL), help="the model the server answers with"
    )
    p.add_argument("--options", default=os.environ.get(ENV_OPTIONS, "{}"), help="retrain_edge options, JSON")
    p.add_argument("--result", default=os.environ.get(ENV_RESULT))
    p.add_argument(
        "--offload", default=os.environ.get(ENV_OFFLOAD, "{}"), help="offload-threshold settings, JSON"
    )
    args = p.parse_args(argv)
    if not args.store or not args.server_root:
        p.error(f"needs --store and --server-root (or ${ENV_STORE} and ${ENV_ROOT})")
    niceness = _lower_priority()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"growth step: pid {os.getpid()}, niceness {niceness}", flush=True)

    def report(obj: dict) -> None:
        if args.result:
            write_json_atomic(args.result, obj)

    try:
        from elma_utils.server.publish import retrain_edge

        options = check_options(json.loads(args.options))
        offload = check_offload(json.loads(args.offload))
        result = retrain_edge(args.store, args.server_root, full_model_dir=args.full_model, **options)
        out = result.to_dict()
        if not result.published and offload["learn"]:
            out = with_offload_step(out, offload_step(args, options, offload))
    except Exception as exc:
        traceback.print_exc()
        report({"error": f"{type(exc).__name__}: {exc}"})
        print(f"growth step failed: {type(exc).__name__}: {exc}", flush=True)
        return EXIT_FAILED
    report(json.loads(json.dumps(out, default=str)))
    print(f"growth step: {out['reason']}", flush=True)
    return EXIT_PUBLISHED if out["published"] else EXIT_KEPT


def offload_step(args: argparse.Namespace, options: dict[str, Any], offload: dict[str, Any]) -> dict:
    """The offload threshold after a refused retraining (module note); its record as a dict.
    Its failure is recorded, never raised: the retraining's result stands."""
    from elma_utils.edge.identity import DeviceRegistry
    from elma_utils.server import publish
    from elma_utils.server.offload_threshold import learn_from_store

    missing = [name for name in ("calibration", "dev_eval") if not options.get(name)]
    if missing:
        return {"published": False, "reason": f"offload threshold not learned: needs {', '.join(missing)}"}
    print("growth step: the retrained edge was refused; learning the offload threshold", flush=True)
    try:
        pointer = publish.read_latest(args.server_root)
        model = args.server_model or args.full_model
        if model is None and pointer is not None:  # as retrain_edge does: the model the exits sit on
            model = publish.full_model_of(Path(args.server_root) / publish.EXITS_DIR / pointer.version)
        keys = ServerLayout(Path(args.server_root)).authorized_keys
        devices = sorted(DeviceRegistry(keys).devices()) if keys.is_file() else None  # revoked: left out
        learned = learn_from_store(
            args.store, args.server_root, full_model_dir=model,
            calibration=publish.load_eval_set(Path(options["calibration"]), "calibration",
                                              options.get("calibration_limit")),
            guard=publish.load_eval_set(Path(options["dev_eval"]), "dev_eval", options.get("dev_limit")),
            budget=offload["budget"], tolerance=offload["tolerance"], device_ids=devices,
        )  # fmt: skip
    except Exception as exc:
        traceback.print_exc()
        why = f"{type(exc).__name__}: {exc}"
        return {"published": False, "error": why, "reason": f"offload threshold not learned: {why}"}
    return learned.to_dict()


def with_offload_step(retrained: dict[str, Any], offload: dict[str, Any]) -> dict[str, Any]:
    """The step's result: the retraining's, with the offload step under ``offload``; a published
    threshold makes the step's outcome "published" (its version and reason first)."""
    out = {**retrained, "offload": offload}
    if offload.get("published"):
        out.update(
            published=True,
            version=offload.get("version"),
            reason=f"{offload['reason']} (the retrained edge was refused: {retrained.get('reason')})",
        )
    else:
        out["reason"] = f"{retrained.get('reason')}; {offload.get('reason')}"
    return out


if __name__ == "__main__":
    sys.exit(run_step())
