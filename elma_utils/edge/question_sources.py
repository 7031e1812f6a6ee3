"""Where the device's questions come from: typed lines on stdin, a folder of audio files, a microphone.

Every source has ``next(stop) -> Question | None`` (None: the source is exhausted, or ``stop``
was set while waiting) and ``done(question, record)``, called once the question is answered,
and ``close()``. The device's loop asks one question at a time, so nothing is taken from a
source that the device will not finish.

- :class:`StdinSource`: one typed question per line; EOF ends it. It reads the file descriptor
  with ``select`` in the caller's thread (no reader thread that could hold the stdin lock
  at interpreter shutdown, and no line read but never answered).
- :class:`FolderSource`: audio files dropped into a folder, each answered exactly once, across
  restarts too. A file is taken once its size and mtime have not changed for
  ``settle_seconds`` (hidden names and ``*.part``/``*.tmp`` are never taken: write
  ``q.wav.part``, then rename it to ``q.wav``). When it is answered, a line goes to the
  ledger ``done/ledger.jsonl`` (fsynced: the commit point, holding the answer), and then the
  file is moved to ``done/`` (``failed/`` for unreadable audio). A restart finds files whose
  ledger line exists but which were not moved yet and moves them without answering again.
- :class:`MicrophoneSource`: continuous listening, cut into utterances by
  :class:`VadSegmenter` (faster-whisper's Silero VAD, as ``speech.speech_gate`` uses).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from elma_utils.atomic_files import fsync_dir

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
SAMPLE_RATE = 16000  # what the recognisers take (elma_utils.speech.audio.SAMPLE_RATE)
MAX_UTTERANCE_SECONDS = 30.0  # one Whisper window
LEDGER_NAME = "ledger.jsonl"
EMPTY_FILE_GRACE_SECONDS = 30.0  # an empty file is taken (and fails) only after this long unchanged


@dataclass(frozen=True)
class Question:
    """One question: typed ``text``, or audio as a file ``path`` or 16 kHz mono ``samples``."""

    origin: str  # "stdin", "folder" or "microphone"
    label: str  # where it came from, for the output line: "stdin:3", a file name, "mic:2"
    text: str | None = None
    path: Path | None = None
    samples: np.ndarray | None = None

    @property
    def is_audio(self) -> bool:
        return self.text is None


class QuestionSource(Protocol):
    origin: str

    def next(self, stop: threading.Event) -> Question | None: ...

    def done(self, question: Question, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- stdin


class StdinSource:
    """Typed questions, one per line, from a file descriptor (blank lines are skipped)."""

    origin = "stdin"

    def __init__(self, fd: int = 0, poll_seconds: float = 0.2):
        self.fd, self.poll_seconds = fd, poll_seconds
        self._buf = b""
        self._lines = 0
        self.exhausted = False

    def _pop_line(self) -> str | None:
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            self._lines += 1
            text = raw.decode("utf-8", errors="replace").strip()
            if text:
                return text
        return None

    def next(self, stop: threading.Event) -> Question | None:
        while True:
            line = self._pop_line()
            if line is not None:
                return Question("stdin", f"stdin:{self._lines}", text=line)
            if self.exhausted or stop.is_set():
                return None
            readable, _, _ = select.select([self.fd], [], [], self.poll_seconds)
            if not readable:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.exhausted = True
                if self._buf.strip():  # a last line without its newline
                    self._buf += b"\n"
                    continue
                return None
            self._buf += chunk

    def done(self, question: Question, record: dict[str, Any]) -> None:
        """Typed questions need no bookkeeping."""

    def close(self) -> None:
        """The descriptor belongs to the process."""


# ---------------------------------------------------------------- folder


def _file_key(name: str, st: os.stat_result) -> str:
    """Which file a ledger line is about: the same name dropped again later is a new question."""
    return f"{name}|{st.st_size}|{st.st_mtime_ns}"


class FolderSource:
    """Audio files arriving in ``folder``, each answered exactly once (see the module note)."""

    origin = "folder"

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        poll_seconds: float = 0.5,
        settle_seconds: float = 1.0,
        clock=time.monotonic,
    ):
        self.folder = Path(folder)
        self.done_dir, self.failed_dir = self.folder / "done", self.folder / "failed"
        self.ledger_path = self.done_dir / LEDGER_NAME
        self.poll_seconds, self.settle_seconds, self.clock = poll_seconds, settle_seconds, clock
        self.done_dir.mkdir(exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)
        self._ledger = self._read_ledger()
        self._watch: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, unchanged since)
        self._finish_interrupted()

    def _read_ledger(self) -> dict[str, str]:
        """key -> status ("answered" / "failed") of every file the ledger records."""
        out: dict[str, str] = {}
        if not self.ledger_path.is_file():
            return out
        for n, line in enumerate(self.ledger_path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                entry = json.loads(line)
                out[entry["key"]] = entry["status"]
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning(
                    "%s line %d is not a ledger entry (cut off by a crash?); ignored", self.ledger_path, n
                )
        return out

    def _candidates(self) -> list[tuple[str, os.stat_result]]:
        """(name, stat) of the audio files in the folder now (a file removed meanwhile is skipped)."""
        found = []
        with os.scandir(self.folder) as it:
            for e in it:
                if e.name.startswith(".") or not e.name.lower().endswith(AUDIO_SUFFIXES):
                    continue
                try:
                    if e.is_file(follow_symlinks=False):
                        found.append((e.name, e.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
        return found

    def _finish_interrupted(self) -> None:
        """Files answered before a crash or kill but not moved yet: move them, do not answer again."""
        for name, st in self._candidates():
            status = self._ledger.get(_file_key(name, st))
            if status is not None:
                log.info("%s was answered before a restart (ledger); moving it without answering again", name)
                self._move(self.folder / name, self.done_dir if status == "answered" else self.failed_dir)

    def _ready(self) -> list[str]:
        now = self.clock()
        seen, ready = set(), []
        for name, st in self._candidates():
            seen.add(name)
            sig = (st.st_size, st.st_mtime_ns)
            previous = self._watch.get(name)
            if previous is None or previous[:2] != sig:
                self._watch[name] = (*sig, now)
                continue
            waited = now - previous[2]
            if waited >= self.settle_seconds and (st.st_size > 0 or waited >= EMPTY_FILE_GRACE_SECONDS):
                ready.append((st.st_mtime_ns, name))
        for gone in set(self._watch) - seen:
            del self._watch[gone]
        return [name for _, name in sorted(ready)]

    def next(self, stop: threading.Event) -> Question | None:
        """The oldest settled file (the folder is looked at once even when ``stop`` is already set)."""
        while True:
            ready = self._ready()
            if ready:
                return Question("folder", ready[0], path=self.folder / ready[0])
            if stop.wait(self.poll_seconds):
                return None

    def done(self, question: Question, record: dict[str, Any]) -> None:
        """Commit (a fsynced ledger line with the answer), then move the file to done/ (or failed/)."""
        self._watch.pop(question.path.name, None)
        if not question.path.exists():
            log.warning("%s was removed while it was being answered; nothing to record", question.label)
            return
        status = self.commit(question, record)
        self._move(question.path, self.done_dir if status == "answered" else self.failed_dir)

    def commit(self, question: Question, record: dict[str, Any]) -> str:
        """The ledger line that makes ``question`` answered for good; returns its status."""
        path = question.path
        st = path.stat()
        status = "failed" if record.get("status") in ("unreadable_audio", "failed") else "answered"
        entry = {
            "key": _file_key(path.name, st),
            "file": path.name,
            "status": status,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            **{k: record.get(k) for k in ("question", "answer", "source", "model_version", "error")},
        }
        with open(self.ledger_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._ledger[entry["key"]] = status
        return status

    def _move(self, path: Path, into: Path) -> Path:
        dest, n = into / path.name, 1
        while dest.exists():  # the same name answered before: keep both
            dest = into / f"{path.stem}-{n}{path.suffix}"
            n += 1
        os.rename(path, dest)
        fsync_dir(self.folder)
        fsync_dir(into)
        return dest

    def close(self) -> None:
        """Nothing held open between polls."""


# ---------------------------------------------------------------- microphone


class VadSegmenter:
    """Cut a continuous 16 kHz mono stream into utterances with Silero VAD.

    ``feed(samples)`` returns the utterances completed so far: speech followed by at least
    ``min_silence_s`` of silence, or ``max_seconds`` of speech without a pause (cut there).
    The VAD runs every ``check_every_s`` of new audio over what is buffered; between
    utterances only the last ``keep_s`` of silence is kept.
    """

    def __init__(
        self,
        *,
        min_silence_s: float = 0.8,
        max_seconds: float = MAX_UTTERANCE_SECONDS,
        check_every_s: float = 0.3,
        pad_s: float = 0.2,
        keep_s: float = 1.0,
        threshold: float = 0.5,
        min_speech_s: float = 0.25,
    ):
        self.min_silence_s, self.max_seconds, self.check_every_s = min_silence_s, max_seconds, check_every_s
        self.pad_s, self.keep_s, self.threshold, self.min_speech_s = pad_s, keep_s, threshold, min_speech_s
        self._buf = np.zeros(0, dtype=np.float32)
        self._unchecked = 0

    def _segments(self) -> list[tuple[int, int]]:
        from faster_whisper.vad import VadOptions, get_speech_timestamps  # the ONNX model loads once

        found = get_speech_timestamps(
            self._buf,
            VadOptions(
                threshold=self.threshold,
                min_speech_duration_ms=int(self.min_speech_s * 1000),
                min_silence_duration_ms=int(self.min_silence_s * 1000),
                speech_pad_ms=0,
            ),
            sampling_rate=SAMPLE_RATE,
        )
        return [(int(s["start"]), int(s["end"])) for s in found]

    def feed(self, samples: np.ndarray) -> list[np.ndarray]:
        self._buf = np.concatenate([self._buf, np.asarray(samples, dtype=np.float32).reshape(-1)])
        self._unchecked += len(samples)
        if self._unchecked < self.check_every_s * SAMPLE_RATE:
            return []
        self._unchecked = 0
        return self._cut(final=False)

    def flush(self) -> list[np.ndarray]:
        """The utterance still in progress at the end of the stream, if any."""
        out = self._cut(final=True) if self._buf.size else []
        self._buf = np.zeros(0, dtype=np.float32)
        return out

    def _cut(self, final: bool) -> list[np.ndarray]:
        n, sr = self._buf.size, SAMPLE_RATE
        segments = self._segments()
        if not segments:
            self._buf = self._buf[-int(self.keep_s * sr) :]
            return []
        pad, quiet, longest = int(self.pad_s * sr), int(self.min_silence_s * sr), int(self.max_seconds * sr)
        out, keep_from = [], None
        for i, (start, end) in enumerate(segments):
            last = i == len(segments) - 1
            if last and not final and n - end < quiet and end - start < longest:
                keep_from = max(0, start - pad)  # still speaking, or not quiet long enough yet
                break
            out.append(self._buf[max(0, start - pad) : min(n, end + pad)].copy())
            keep_from = min(n, end + pad)
        self._buf = self._buf[keep_from:]
        return out


class MicrophoneSource:
    """Continuous listening on a microphone (SpeechRecognition + PyAudio), cut by :class:`VadSegmenter`."""

    origin = "microphone"

    def __init__(self, device_index: int | None = None, segmenter: VadSegmenter | None = None):
        import speech_recognition as sr

        self.segmenter = segmenter or VadSegmenter()
        self._mic = sr.Microphone(device_index=device_index, sample_rate=SAMPLE_RATE, chunk_size=1024)
        self._queue: queue.Queue[Question | BaseException] = queue.Queue()
        self._closed = threading.Event()
        self._count = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._listen, name="elma-microphone", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            with self._mic as stream:
                width = stream.SAMPLE_WIDTH
                while not self._closed.is_set():
                    data = stream.stream.read(stream.CHUNK)
                    if width != 2:
                        raise OSError(f"the microphone gives {width}-byte samples; 16-bit expected")
                    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
                    for utterance in self.segmenter.feed(samples):
                        self._count += 1
                        self._queue.put(Question("microphone", f"mic:{self._count}", samples=utterance))
        except Exception as err:  # noqa: BLE001 - a device unplugged, a driver error: end the source
            self._queue.put(err)

    def next(self, stop: threading.Event) -> Question | None:
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                self.error = f"the microphone stopped: {type(item).__name__}: {item}"
                return None
            return item
        return None

    def done(self, question: Question, record: dict[str, Any]) -> None:
        """Spoken questions leave nothing to clean up."""

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2.0)
