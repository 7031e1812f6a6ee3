"""tegrastats: parse its lines, integrate the board's input power, and sample it live.

A Jetson has no RAPL; its power monitors (INA3221 on a TX2) are printed by ``tegrastats``
once per ``--interval`` milliseconds, one line each. Every power rail reads ``NAME now/avg``
in milliwatts (instant value, running average since tegrastats started). Two shapes exist:

- L4T R32 (JetPack 4.x, TX2): ``... VDD_IN 2907/2907 VDD_SYS_CPU 229/229 ...``
- newer L4T: a ``MM-DD-YYYY HH:MM:SS`` prefix and units, ``VDD_IN 2907mW/2907mW``.

Energy is the integral of the input rail (``VDD_IN``; ``POM_5V_IN`` on a Nano) over time.
Reading ``i`` stands for the period that ends when it is printed: with a fixed interval
``dt`` a log holds ``sum(P_i) * dt``; with timestamps, reading ``i`` covers
``(t_{i-1}, t_i]``. ``TegrastatsSampler`` runs ``tegrastats --interval N`` in a thread and
keeps (arrival time, reading) pairs, so the energy of any wall-clock window can be taken.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# Input (whole-board) rails, most specific first: TX1/TX2/Xavier NX/Orin Nano, Nano, AGX Orin.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
# NAME now[mW]/avg[mW]; the lookahead keeps "RAM 2144/7854MB" and "IRAM 0/252kB" out.
_RAIL = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*) (\d+(?:\.\d+)?)(?:mW)?/(\d+(?:\.\d+)?)(?:mW)?(?![\w.])")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")


@dataclass
class TegrastatsSample:
    """One tegrastats line: power rails in mW as (instant, average), RAM in MB."""

    rails: dict[str, tuple[float, float]]
    timestamp: datetime | None = None
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None

    def input_rail(self, rail: str | None = None) -> str | None:
        """The rail that measures the whole board (``rail`` when given and present)."""
        if rail is not None:
            return rail if rail in self.rails else None
        return next((r for r in INPUT_RAILS if r in self.rails), None)

    def input_power_mw(self, rail: str | None = None) -> float | None:
        """Instant power of the input rail in milliwatts, or None when the line has none."""
        name = self.input_rail(rail)
        return None if name is None else self.rails[name][0]


def parse_line(line: str) -> TegrastatsSample:
    """Parse one tegrastats line (either format); ValueError for anything else."""
    text = line.strip()
    stamp = None
    m = _TIMESTAMP.match(text)
    if m:
        stamp = datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
        text = text[m.end() :]
    ram = _RAM.search(text)
    rails = {name: (float(now), float(avg)) for name, now, avg in _RAIL.findall(text)}
    if ram is None or not rails:
        raise ValueError(f"not a tegrastats line (needs RAM and power rails): {line.strip()[:80]!r}")
    # "SWAP 0/3927MB" never matches _RAIL (MB lookahead); drop RAM-like names defensively.
    for name in ("RAM", "SWAP", "IRAM"):
        rails.pop(name, None)
    return TegrastatsSample(rails, stamp, int(ram.group(1)), int(ram.group(2)))


def parse_lines(lines: Iterable[str]) -> tuple[list[TegrastatsSample], int]:
    """All tegrastats samples in ``lines`` and how many non-empty lines were skipped."""
    samples: list[TegrastatsSample] = []
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            samples.append(parse_line(line))
        except ValueError:
            skipped += 1
    return samples, skipped


def _input_powers_w(samples: Sequence[TegrastatsSample], rail: str | None) -> list[float]:
    powers = []
    for i, s in enumerate(samples):
        mw = s.input_power_mw(rail)
        if mw is None:
            raise ValueError(f"sample {i} has no input rail ({rail or ' / '.join(INPUT_RAILS)})")
        powers.append(mw / 1000.0)
    return powers


def energy_joules(
    samples: Sequence[TegrastatsSample], interval_ms: float | None = None, rail: str | None = None
) -> float:
    """Energy (J) of a tegrastats log: fixed ``interval_ms``, else the lines' timestamps.

    With an interval every reading covers one interval; with timestamps (one-second
    resolution) reading ``i`` covers the time since reading ``i-1``, so the first one counts
    nothing. Raises ValueError when neither is available or a line lacks the input rail.
    """
    if not samples:
        return 0.0
    powers = _input_powers_w(samples, rail)
    if interval_ms is not None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        return sum(powers) * interval_ms / 1000.0
    stamps = [s.timestamp for s in samples]
    if any(t is None for t in stamps):
        raise ValueError("these lines carry no timestamps: give the tegrastats --interval (ms)")
    seconds = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    if any(d < 0 for d in seconds):
        raise ValueError("timestamps go backwards")
    return sum(p * d for p, d in zip(powers[1:], seconds, strict=True))


def window_energy(
    times_s: Sequence[float], power_w: Sequence[float], start: float, end: float, interval_s: float
) -> tuple[float, float]:
    """Energy (J) over ``[start, end]`` from readings that arrived at ``times_s``.

    Reading ``i`` holds over ``(t_{i-1}, t_i]`` (the first over one ``interval_s`` before
    it). Parts of the window no reading covers take the nearest reading's power. Returns
    ``(joules, covered_seconds)`` so a caller can say how much was measured.
    """
    if end < start:
        raise ValueError(f"window ends ({end}) before it starts ({start})")
    if not times_s:
        raise ValueError("no readings")
    joules = covered = 0.0
    prev = times_s[0] - interval_s
    for t, p in zip(times_s, power_w, strict=True):
        overlap = max(0.0, min(t, end) - max(prev, start))
        joules += p * overlap
        covered += overlap
        prev = t
    head = max(0.0, min(times_s[0] - interval_s, end) - start)
    tail = max(0.0, end - max(times_s[-1], start))
    joules += head * power_w[0] + tail * power_w[-1]
    return joules, covered


def find_tegrastats(executable: str | os.PathLike | None = None) -> str | None:
    """Path of tegrastats: ``executable``, else ``$ELMA_TEGRASTATS``, else on PATH / /usr/bin."""
    for candidate in (executable, os.environ.get("ELMA_TEGRASTATS")):
        if candidate:
            return str(candidate) if os.access(candidate, os.X_OK) else None
    found = shutil.which("tegrastats")
    if found:
        return found
    return "/usr/bin/tegrastats" if os.access("/usr/bin/tegrastats", os.X_OK) else None


@dataclass
class _Reading:
    time_s: float  # time.monotonic() at arrival
    sample: TegrastatsSample


class TegrastatsSampler:
    """``tegrastats --interval N`` in a subprocess, read by a thread; energy per window.

    Use as a context manager, or ``start()`` / ``stop()``. Times are ``time.monotonic()``.
    """

    def __init__(self, interval_ms: int = 100, executable: str | None = None, rail: str | None = None):
        if int(interval_ms) <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        self.interval_ms = int(interval_ms)
        self.executable = executable
        self.rail = rail
        self.readings: list[_Reading] = []
        self.skipped_lines = 0
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> TegrastatsSampler:
        """Start tegrastats; raises RuntimeError when it cannot be found or started."""
        exe = find_tegrastats(self.executable)
        if exe is None:
            raise RuntimeError(
                f"tegrastats not found (looked at {self.executable or '$ELMA_TEGRASTATS, PATH, /usr/bin'})"
            )
        self.executable = exe
        try:
            self._proc = subprocess.Popen(
                [exe, "--interval", str(int(self.interval_ms))],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                start_new_session=True,  # its own process group: stop() ends it and any children
            )
        except OSError as err:
            raise RuntimeError(f"cannot start {exe}: {err}") from err
        self._thread = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.monotonic()
            try:
                sample = parse_line(line)
            except ValueError:
                if line.strip():
                    self.skipped_lines += 1
                continue
            if sample.input_power_mw(self.rail) is None:
                self.skipped_lines += 1
                continue
            with self._cond:
                self.readings.append(_Reading(now, sample))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_reading(self, after: float, timeout_s: float) -> bool:
        """Block until a reading arrived later than ``after`` (monotonic); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not (self.readings and self.readings[-1].time_s > after):
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    return bool(self.readings and self.readings[-1].time_s > after)
                self._cond.wait(min(left, 0.05))
            return True

    def stop(self) -> None:
        """Stop tegrastats (its process group: terminate, then kill) and the reader thread."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=3)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)  # the group we started (start_new_session)

    def energy(self, start: float, end: float) -> tuple[float, float]:
        """``(joules, covered_seconds)`` of the input rail over ``[start, end]`` (monotonic)."""
        with self._cond:
            readings = list(self.readings)
        if not readings:
            raise RuntimeError("tegrastats has printed no reading with an input rail yet")
        times = [r.time_s for r in readings]
        powers = [r.sample.input_power_mw(self.rail) / 1000.0 for r in readings]
        return window_energy(times, powers, start, end, self.interval_ms / 1000.0)

    def readings_between(self, start: float, end: float) -> int:
        """How many readings cover part of ``[start, end]`` (each spans one interval before it)."""
        span = self.interval_ms / 1000.0
        with self._cond:
            return sum(1 for r in self.readings if r.time_s > start and r.time_s - span < end)

    def rail_name(self) -> str | None:
        with self._cond:
            return self.readings[-1].sample.input_rail(self.rail) if self.readings else None

    def __enter__(self) -> TegrastatsSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_log(path: str | os.PathLike) -> tuple[list[TegrastatsSample], int]:
    """Samples of a saved tegrastats log (``tegrastats --logfile``) and lines skipped."""
    return parse_lines(Path(path).read_text(errors="replace").splitlines())
