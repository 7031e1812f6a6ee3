"""`elma device run`: the long-running program on one board.

    ready = check_config(load_config("device.toml"))     # everything checked, nothing loaded
    sys.exit(DeviceProgram(ready, json_lines=True).run())

1. The recogniser (only for audio input), the edge bundle and its tokenizer are loaded once;
   the SSH connection to the server (``SSHTunnelClient``) is opened on first use and kept.
2. Questions come one at a time from a :mod:`.question_sources` source; each is answered by
   ``EdgeQA`` (early exit on the device, the rest offloaded, the edge's own answer kept in the
   outbox when the server is away) and printed as one line on stdout (``--json``: one strict
   JSON object). Log lines go to stderr.
3. A drain thread sends the outbox's due items every ``drain_seconds``.
4. A sync thread fetches a newer bundle every ``interval_seconds`` (``sync.sync_with_client``:
   verified, smoke-tested and switched atomically, or refused and the old one kept). The new
   ``EdgeModel`` is loaded in that thread and swapped in under the answer lock, so a question is
   always answered, and reported, by one model version.
5. SIGTERM, SIGINT or EOF on stdin: the current question is finished, the threads stopped, the
   connection and the outbox closed; exit status 0. A second signal interrupts at once.

Each answer record (``--json``: one object per line, every key always present): ``item`` (stdin
line, file name), ``question`` (for audio: the ``transcript``, with ``transcript_empty`` and
``transcript_unreliable`` + ``unreliable_reason``; status ``ask_repeat`` and no answer when the
recogniser's guard still doubts the transcript after its fallback decode), ``answer``,
``source`` (``edge``, ``server``, ``edge-fallback`` with ``queued``, or ``none`` when nothing
was answered, ``status`` and ``error`` saying why), ``below_offload_threshold`` (no exit was
sure, but the published offload threshold says the server would not do better), ``where`` in words,
``exit_layer``/``num_layers``, ``timings_ms`` (``audio`` decode, ``asr``, ``edge``, ``offload``,
``total``) and ``model_version``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from elma_utils.edge.device_config import DeviceConfigError, ReadyConfig
from elma_utils.edge.question_sources import (
    FolderSource,
    MicrophoneSource,
    Question,
    QuestionSource,
    StdinSource,
)

log = logging.getLogger("elma.device")
# a transcript this long found word for word in the context: Whisper echoing its prompt
UNRELIABLE_ECHO_WORDS = 6
ASK_REPEAT = "please repeat the question"


# ---------------------------------------------------------------- small parts


def transcript_doubt(transcript: str, context: str) -> str | None:
    """Why a non-empty transcript is probably not what was asked, or None when nothing suggests it."""
    words = re.findall(r"[\w']+", transcript.lower())
    if not words:
        return "no words, only punctuation or noise marks"
    if len(words) == 1:
        return "a single word"
    context_words = " ".join(re.findall(r"[\w']+", context.lower()))
    if len(words) >= UNRELIABLE_ECHO_WORDS and " ".join(words) in context_words:
        return "it repeats the context word for word (the recogniser echoing its prompt)"
    return None


class Speaker:
    """Says answers with espeak-ng; a missing program is a warning at start-up, a failure one warning."""

    def __init__(self, enabled: bool, voice: str = "en-us"):
        self.voice = voice
        self.program = shutil.which("espeak-ng") if enabled else None
        self._warned = False

    def say(self, text: str) -> None:
        if self.program is None or not text:
            return
        try:
            done = subprocess.run(
                [self.program, "-v", self.voice, "--", text], capture_output=True, timeout=60, check=False
            )
            said = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
            failed = done.returncode != 0 or any("error" in line.lower() for line in said)  # ALSA: exit 0
            problem = (said[-1] if said else f"exit status {done.returncode}") if failed else None
        except (OSError, subprocess.TimeoutExpired) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem and not self._warned:
            self._warned = True
            log.warning("espeak-ng could not say the answer (%s); answers are still printed", problem)


class _Every(threading.Thread):
    """Run ``fn`` every ``interval`` seconds (first after ``first``) until ``stop``; errors are logged."""

    def __init__(
        self, name: str, interval: float, fn: Callable[[], None], stop: threading.Event, first: float
    ):
        super().__init__(name=name, daemon=True)
        self.interval, self.fn, self.stop, self.first = interval, fn, stop, first

    def run(self) -> None:
        delay = self.first
        while not self.stop.wait(delay):
            try:
                self.fn()
            except Exception as err:  # noqa: BLE001 - a worker must outlive one bad round
                log.error("%s: %s: %s", self.name, type(err).__name__, err)
                log.debug("%s failed", self.name, exc_info=True)
            delay = self.interval


def _ms(value: float | None) -> float:
    value = float(value or 0.0)
    return round(value, 3) if math.isfinite(value) else 0.0


# ---------------------------------------------------------------- the program


class DeviceProgram:
    """One board: load once, answer questions from a source, drain the outbox, sync the bundle."""

    def __init__(self, ready: ReadyConfig, *, json_lines: bool = False, out: TextIO | None = None):
        self.ready, self.cfg = ready, ready.config
        self.context = ready.context
        self.json_lines = json_lines
        self.out = out if out is not None else sys.stdout
        self.stop = threading.Event()
        self.answer_lock = threading.Lock()  # held for each answer; a model swap waits for it
        self.recognizer = None
        self.tunnel = None
        self.outbox = None
        self.qa = None
        self.source: QuestionSource | None = None
        self.speaker = Speaker(self.cfg.speak, self.cfg.voice)
        self._threads: list[threading.Thread] = []
        self._last_sync_problem: str | None = None
        self._signals = 0

    # -------------------------------------------------------------- loading
    def load(self) -> None:
        """Recogniser, edge bundle and tokenizer once; the outbox; the (lazily connected) tunnel."""
        from elma_utils.edge.client import EdgeQA
        from elma_utils.edge.outbox import Outbox
        from elma_utils.edge.ssh_client import SSHTunnelClient

        cfg = self.cfg
        if cfg.needs_speech:
            from elma_utils.speech.recognizers import get_recognizer

            options: dict[str, Any] = {}
            if cfg.engine == "whisper":
                options["lm"] = cfg.lm
                if cfg.speech_model:
                    options["model"] = cfg.speech_model
            started = time.perf_counter()
            self.recognizer = get_recognizer(cfg.engine, **options)
            log.info("speech: %s loaded in %.1f s", cfg.engine, time.perf_counter() - started)
        from elma_utils.native_logs import native_noise_filtered

        with native_noise_filtered():  # LiteRT's start-up lines; no other thread logs yet
            model = self._load_model(self.ready.bundle)
        try:
            self.outbox = Outbox(
                cfg.outbox,
                backoff_base_s=min(1.0, cfg.retry_max_seconds),
                backoff_cap_s=cfg.retry_max_seconds,
            )
        except Exception as err:  # noqa: BLE001 - sqlite3.Error, OSError, a file that is not an outbox
            raise DeviceConfigError(f"{cfg.path}: [outbox] path {cfg.outbox}: cannot open it: {err}") from err
        self.tunnel = SSHTunnelClient(
            cfg.host, cfg.ssh_port, cfg.user, cfg.key, cfg.known_hosts, cfg.service,
            timeout=max(5.0, cfg.deadline_ms / 1000),
        )  # fmt: skip
        self.qa = EdgeQA(
            model, self.tunnel, self.outbox, device_id=cfg.device_id, deadline_ms=cfg.deadline_ms
        )
        self.qa.model_version = self._version_of(model)

    def _load_model(self, bundle: Path):
        from elma_utils.edge.runtime import EdgeModel

        started = time.perf_counter()
        try:
            model = EdgeModel.load(bundle, num_threads=self.cfg.num_threads)
            model.tokenizer  # noqa: B018 - load the tokenizer now, not inside the first question
        except Exception as err:  # noqa: BLE001 - BundleError, a part LiteRT cannot open, a bad vocabulary
            raise DeviceConfigError(
                f"edge bundle {bundle} does not load: {type(err).__name__}: {err}"
            ) from err
        log.info(
            "model %s (%d layers) loaded from %s in %.1f s",
            self._version_of(model), model.num_layers, bundle, time.perf_counter() - started,
        )  # fmt: skip
        return model

    @staticmethod
    def _version_of(model) -> str:
        return str(model.manifest.get("model_version") or Path(model.bundle_dir).name)

    def _open_source(self) -> QuestionSource:
        cfg = self.cfg
        if cfg.input_kind == "folder":
            return FolderSource(
                cfg.input_folder, poll_seconds=cfg.poll_seconds, settle_seconds=cfg.settle_seconds
            )
        if cfg.input_kind == "microphone":
            return MicrophoneSource(cfg.microphone_index)
        return StdinSource()

    # -------------------------------------------------------------- background work
    def drain_once(self) -> None:
        """Send what the outbox holds and is due (nothing when it is empty or waiting out a backoff)."""
        if not self.outbox.due(1):
            return
        result = self.qa.flush_outbox()
        if result.sent or result.set_aside:
            log.info(
                "outbox: %d queued question(s) sent, %d set aside, %d left",
                result.sent,
                result.set_aside,
                result.remaining,
            )
        elif result.error:
            log.debug("outbox: server still away: %s", result.error)

    def sync_once(self) -> None:
        """Fetch a newer bundle; when one was installed, load it here and swap it in between questions."""
        from elma_utils.edge.ssh_client import OffloadUnavailable
        from elma_utils.edge.sync import SyncError, current_bundle, sync_with_client

        root = self.cfg.model_root
        try:
            result = sync_with_client(self.tunnel, self.cfg.remote_root, root, timeout=60.0)
        except SyncError as err:
            self._sync_problem(f"sync: no new version installed, keeping {self.qa.model_version}: {err}")
            return
        except (OffloadUnavailable, OSError) as err:
            self._sync_problem(f"sync: server unavailable ({type(err).__name__}: {err}); will try again")
            return
        self._last_sync_problem = None
        if not result.updated:
            log.debug("sync: %s %s", result.status, result.message)
            return
        log.info("sync: %s", result.message)
        model = self._load_model(current_bundle(root))
        self.swap(model)

    def _sync_problem(self, message: str) -> None:
        """Once per distinct problem at WARNING; repeats of it at DEBUG."""
        level = logging.DEBUG if message == self._last_sync_problem else logging.WARNING
        self._last_sync_problem = message
        log.log(level, "%s", message)

    def swap(self, model) -> None:
        """Make ``model`` answer from the next question on (never inside one)."""
        new = self._version_of(model)
        with self.answer_lock:
            old = self.qa.model_version
            self.qa.edge = model
            self.qa.model_version = new
        log.info("model version %s → %s", old, new)

    def _start_workers(self) -> None:
        cfg = self.cfg
        self._threads.append(
            _Every("outbox-drain", cfg.drain_seconds, self.drain_once, self.stop, cfg.drain_seconds)
        )
        if cfg.model_root is not None and cfg.sync_interval_seconds > 0:
            self._threads.append(
                _Every("bundle-sync", cfg.sync_interval_seconds, self.sync_once, self.stop, 0.5)
            )
        for t in self._threads:
            t.start()

    # -------------------------------------------------------------- answering
    def _blank_record(self, question: Question) -> dict[str, Any]:
        """The output record before anything is known (every key present, so JSON lines share a schema)."""
        return {
            "device_id": self.cfg.device_id,
            "input": question.origin,
            "item": question.label,
            "status": "answered",  # or empty_transcript, ask_repeat, unreadable_audio, failed
            "question": question.text,
            "transcript": None,
            "transcript_empty": False,
            "transcript_unreliable": False,
            "unreliable_reason": None,
            "answer": "",
            "no_answer": False,
            "source": "none",
            "where": "",
            "exit_layer": None,
            "num_layers": None,
            "edge_solved": None,
            "below_offload_threshold": None,
            "queued": None,
            "error": None,
            "request_id": None,
            "char_start": None,
            "char_end": None,
            "timings_ms": {"audio": 0.0, "asr": 0.0, "edge": 0.0, "offload": 0.0, "total": 0.0},
            "model_version": self.qa.model_version,
        }

    def answer(self, question: Question) -> dict[str, Any]:
        """One question → its record (what is printed); never raises for a bad recording."""
        from elma_utils.speech.audio import SAMPLE_RATE, AudioError, load_audio, prepare_audio

        started = time.perf_counter()
        record = self._blank_record(question)
        timings = record["timings_ms"]
        text = question.text
        if question.is_audio:
            t0 = time.perf_counter()
            try:
                if question.path is not None:
                    samples = load_audio(question.path)
                else:
                    samples = prepare_audio(question.samples, SAMPLE_RATE, name="the microphone recording")
            except AudioError as err:
                timings["audio"] = _ms((time.perf_counter() - t0) * 1000)
                return self._unanswered(record, "unreadable_audio", str(err), started)
            timings["audio"] = _ms((time.perf_counter() - t0) * 1000)
            transcript = self.recognizer.transcribe(samples, context=self.context)
            timings["asr"] = _ms(transcript.seconds * 1000)
            text = transcript.text.strip()
            record["transcript"] = record["question"] = text
            if not text:
                record["transcript_empty"] = True
                why = "no speech" if transcript.details.get("no_speech") else "nothing recognised"
                return self._unanswered(
                    record, "empty_transcript", f"{why}: the question was not answered", started
                )
            guard = transcript.details.get("unreliable")  # the recogniser's hallucination guard
            doubt = guard or transcript_doubt(text, self.context)
            record["transcript_unreliable"], record["unreliable_reason"] = doubt is not None, doubt
            if guard:  # still doubtful after the fallback decode: ask again rather than answer it
                return self._unanswered(record, "ask_repeat", f"{ASK_REPEAT} (unreliable: {guard})", started)
        with self.answer_lock:  # a model swap happens before or after, never during
            result = self.qa.answer(text, self.context)
            record["model_version"] = self.qa.model_version
            record["num_layers"] = int(self.qa.edge.num_layers)
        record.update(
            answer=result.text,
            no_answer=bool(result.no_answer or not result.text),
            source=result.source,
            exit_layer=int(result.exit_layer),
            edge_solved=bool(result.edge_solved),
            below_offload_threshold=bool(result.kept_below_offload_threshold),
            error=result.error,
            request_id=result.request_id,
            char_start=result.char_start,
            char_end=result.char_end,
        )
        if result.source == "edge-fallback":
            record["queued"] = bool(result.queued)
        timings["edge"] = _ms(result.edge_ms)
        timings["offload"] = _ms(result.offload_ms)
        timings["total"] = _ms((time.perf_counter() - started) * 1000)
        record["where"] = self._where(record)
        return record

    def _answer_safely(self, question: Question) -> dict[str, Any]:
        """``answer``, with an unexpected failure reported as that question's record, not a crash."""
        started = time.perf_counter()
        try:
            return self.answer(question)
        except Exception as err:  # noqa: BLE001 - one bad question must not end the device
            log.error("%s: %s: %s", question.label, type(err).__name__, err)
            log.debug("%s failed", question.label, exc_info=True)
            record = self._blank_record(question)
            return self._unanswered(record, "failed", f"{type(err).__name__}: {err}", started)

    def _unanswered(self, record: dict[str, Any], status: str, why: str, started: float) -> dict[str, Any]:
        record.update(status=status, error=why, where=f"not answered: {why}")
        record["timings_ms"]["total"] = _ms((time.perf_counter() - started) * 1000)
        return record

    @staticmethod
    def _where(r: dict[str, Any]) -> str:
        layers = f"{r['exit_layer']}/{r['num_layers']}"
        if r["source"] == "edge":
            why = ", kept below the offload threshold" if r.get("below_offload_threshold") else ""
            return f"edge layer {layers}{why}"
        if r["source"] == "server":
            return f"server (edge stopped at layer {layers})"
        kept = "queued for the server" if r["queued"] else "NOT queued"
        return f"edge-fallback layer {layers}, {kept} ({r['error']})"

    def emit(self, record: dict[str, Any]) -> None:
        if self.json_lines:
            line = json.dumps(record, allow_nan=False, ensure_ascii=False)
        else:
            t = record["timings_ms"]
            if record["input"] == "stdin":
                asked = f"Q: {record['question']}"
            else:
                doubt = (
                    f" (unreliable: {record['unreliable_reason']})" if record["transcript_unreliable"] else ""
                )
                asked = f"heard: {json.dumps(record['transcript'], ensure_ascii=False)}{doubt}"
            answer = record["answer"] if record["answer"] else "(no answer)"
            line = (
                f"{record['item']} | {asked} | A: {answer} | {record['where']} | "
                f"asr {t['asr']:.0f} ms, edge {t['edge']:.1f} ms, offload {t['offload']:.1f} ms, "
                f"total {t['total']:.1f} ms | model {record['model_version']}"
            )
        print(line, file=self.out, flush=True)

    # -------------------------------------------------------------- the loop
    def _on_signal(self, signum: int, _frame) -> None:
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt
        log.info("%s: stopping after the current question", signal.Signals(signum).name)
        self.stop.set()

    def run(self) -> int:
        """Load, answer until a signal or EOF, shut down cleanly; the exit status."""
        for warning in self.ready.warnings:
            log.warning("%s", warning)
        previous = {}
        if threading.current_thread() is threading.main_thread():  # a signal while loading stops it too
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        status = 0
        try:
            self.load()
            self.source = self._open_source()
            self._start_workers()
            cfg = self.cfg
            where = cfg.input_folder if cfg.input_kind == "folder" else cfg.input_kind
            log.info(
                "device %s ready: model %s, questions from %s, server %s → %s:%d, sync %s",
                cfg.device_id, self.qa.model_version, where, self.tunnel.name, *cfg.service,
                f"every {cfg.sync_interval_seconds:g} s" if cfg.model_root and cfg.sync_interval_seconds else "off",
            )  # fmt: skip
            while not self.stop.is_set():
                question = self.source.next(self.stop)
                if question is None:
                    break
                record = self._answer_safely(question)
                try:
                    self.source.done(question, record)
                except OSError as err:  # the ledger or the move failed: exactly-once cannot be kept
                    log.error("cannot record %s as answered (%s); stopping", question.label, err)
                    self.emit(record)
                    status = 1
                    break
                self.emit(record)
                if record["source"] != "none":
                    self.speaker.say(record["answer"])
                elif record["status"] == "ask_repeat":
                    self.speaker.say(f"Sorry, I did not catch that: {ASK_REPEAT}.")
            error = getattr(self.source, "error", None)
            if error:
                log.error("%s", error)
                status = 1
        finally:
            self.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def close(self) -> None:
        """Stop the workers, then close the source, the connection and the outbox."""
        self.stop.set()
        for t in self._threads:
            t.join(timeout=10.0)
            if t.is_alive():
                log.warning("%s still busy at shutdown; closing the connection under it", t.name)
        if self.source is not None:
            self.source.close()
        if self.tunnel is not None:
            self.tunnel.close()
        if self.outbox is not None:
            if self.qa is not None:
                self.qa.save_count()  # the questions answered since the last offload count too
            with contextlib.suppress(Exception):
                pending = len(self.outbox)
                if pending:
                    log.info("outbox: %d question(s) kept for the server until the next start", pending)
            self.outbox.close()
        log.info("device %s stopped", self.cfg.device_id)


def configure_logging(level: str) -> None:
    """Log lines to stderr; paramiko's chatter only at DEBUG."""
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().setLevel(getattr(logging, level))
    if level != "DEBUG":
        logging.getLogger("paramiko").setLevel(logging.WARNING)


def run_device(config: str | Path, *, json_lines: bool = False) -> int:
    """``elma device run``: check everything (one-line ``DeviceConfigError``), then run until stopped."""
    from elma_utils.edge.device_config import check_config, load_config

    cfg = load_config(config)
    configure_logging(cfg.log_level)
    ready = check_config(cfg)
    try:
        return DeviceProgram(ready, json_lines=json_lines).run()
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM: stop now (the connection and outbox are closed)
        log.warning("interrupted")
        return 130
