"""Energy per question where the hardware tells, CPU time where it does not; peak memory.

One API for every machine::

    with EnergyMeter() as m:
        answer_questions()
    m.result(items=n)   # {"source": "tegrastats" | "rapl" | "cpu_time", "joules": ..., ...}

Sources, in the order ``source="auto"`` tries them:

- ``tegrastats`` (a Jetson): the board's input rail (VDD_IN), integrated over the window
  (``elma_utils.bench.tegrastats``). This is whole-board power, idle draw included.
- ``rapl`` (Linux on Intel/AMD): ``/sys/class/powercap/intel-rapl:N/energy_uj`` counters
  of the CPU packages (or the platform ``psys`` domain when present), with wraparound at
  ``max_energy_range_uj``. Often readable by root only.
- ``cpu_time``: no energy counter; ``joules`` is None and only CPU seconds are reported.

The report always names its source, so numbers from different machines are never mixed up.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elma_utils.bench.tegrastats import TegrastatsSampler, find_tegrastats

SOURCES = ("tegrastats", "rapl", "cpu_time")
DEFAULT_POWERCAP = "/sys/class/powercap"
_TOP_ZONE = re.compile(r"^intel-rapl:\d+$")  # packages / psys; sub-zones (intel-rapl:0:0) overlap them


@dataclass
class RaplDomain:
    """One top-level RAPL zone: its counter file and wraparound range (µJ)."""

    name: str
    energy_file: Path
    max_range_uj: int

    def read_uj(self) -> int:
        return int(self.energy_file.read_text().strip())


def powercap_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$ELMA_POWERCAP_ROOT``, else /sys/class/powercap."""
    return Path(root or os.environ.get("ELMA_POWERCAP_ROOT") or DEFAULT_POWERCAP)


def rapl_domains(root: str | os.PathLike | None = None) -> tuple[list[RaplDomain], str]:
    """Readable top-level RAPL domains to sum, and a note on what was found.

    When a ``psys`` (whole platform) domain is readable it is used alone, since it already
    contains the packages; otherwise every readable package domain is summed.
    """
    base = powercap_root(root)
    if not base.is_dir():
        return [], f"{base} does not exist"
    found: list[RaplDomain] = []
    problems: list[str] = []
    for zone in sorted(p for p in base.iterdir() if _TOP_ZONE.match(p.name)):
        try:
            name = (zone / "name").read_text().strip() if (zone / "name").exists() else zone.name
            domain = RaplDomain(name, zone / "energy_uj", int((zone / "max_energy_range_uj").read_text()))
            domain.read_uj()
        except (OSError, ValueError) as err:
            problems.append(f"{zone.name}: {err.__class__.__name__}: {err}")
            continue
        found.append(domain)
    psys = [d for d in found if d.name == "psys"]
    chosen = psys or found
    if chosen:
        return chosen, "domains " + ", ".join(d.name for d in chosen)
    if problems:
        return [], "RAPL zones present but unreadable (" + "; ".join(problems) + ")"
    return [], f"no intel-rapl zones under {base}"


def rapl_delta_uj(start: int, end: int, max_range_uj: int) -> int:
    """Energy between two counter readings, allowing one wraparound."""
    return end - start if end >= start else end + max_range_uj - start


@dataclass
class _CpuClock:
    wall: float
    user: float
    system: float

    @classmethod
    def now(cls) -> _CpuClock:
        """This process and its waited-for children (getrusage: microseconds, not clock ticks)."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(time.perf_counter(), me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime)


def peak_rss_mb(status_path: str | os.PathLike = "/proc/self/status") -> float:
    """Peak resident memory of this process in MiB: VmHWM from /proc, else ru_maxrss."""
    try:
        for line in Path(status_path).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, kB on Linux


def describe_energy_sources(
    powercap: str | os.PathLike | None = None, tegrastats: str | None = None
) -> dict[str, Any]:
    """What this machine offers: tegrastats path, RAPL domains (or why not), and the pick."""
    exe = find_tegrastats(tegrastats)
    domains, note = rapl_domains(powercap)
    pick = "tegrastats" if exe else ("rapl" if domains else "cpu_time")
    return {
        "tegrastats": exe,
        "rapl": [d.name for d in domains],
        "rapl_note": note,
        "powercap_root": str(powercap_root(powercap)),
        "auto_source": pick,
    }


class EnergyMeter:
    """Measure one block of work: energy (when the machine tells), CPU and wall time.

    ``source``: "auto" (tegrastats, else RAPL, else CPU time) or one of ``SOURCES``, which
    then must work (RuntimeError otherwise). ``sampler``: a running ``TegrastatsSampler`` to
    share across many measurements (it is left running); otherwise one is started here and
    stopped on exit. ``tegrastats`` / ``powercap`` override where those are looked for.
    """

    def __init__(
        self,
        source: str = "auto",
        interval_ms: int = 100,
        tegrastats: str | None = None,
        powercap: str | os.PathLike | None = None,
        sampler: TegrastatsSampler | None = None,
        rail: str | None = None,
    ):
        if source not in ("auto", *SOURCES):
            raise ValueError(f"source must be 'auto' or one of {SOURCES}, got {source!r}")
        self.requested = source
        self.interval_ms = int(interval_ms)
        self.tegrastats = tegrastats
        self.powercap = powercap
        self.rail = rail
        self.source: str | None = None
        self.notes: list[str] = []
        self._sampler = sampler
        self._own_sampler = False
        self._domains: list[RaplDomain] = []
        self._rapl_start: list[int] = []
        self._result: dict[str, Any] | None = None

    # ----------------------------------------------------------------- choosing
    def _try_tegrastats(self) -> bool:
        if self._sampler is not None:
            if not self._sampler.running:
                raise RuntimeError("the tegrastats sampler given is not running")
            return True
        if find_tegrastats(self.tegrastats) is None:
            self.notes.append("tegrastats: not found")
            return False
        sampler = TegrastatsSampler(self.interval_ms, self.tegrastats, self.rail)
        try:
            sampler.start()
            timeout = max(3.0, 10 * self.interval_ms / 1000.0)
            if not sampler.wait_for_reading(after=float("-inf"), timeout_s=timeout):
                raise RuntimeError(f"tegrastats printed no line with an input rail within {timeout:.1f} s")
        except RuntimeError as err:
            sampler.stop()
            self.notes.append(f"tegrastats: {err}")
            return False
        self._sampler, self._own_sampler = sampler, True
        return True

    def _try_rapl(self) -> bool:
        domains, note = rapl_domains(self.powercap)
        if not domains:
            self.notes.append(f"rapl: {note}")
            return False
        self._domains = domains
        self.notes.append(f"rapl: {note}")
        return True

    def _choose(self) -> str:
        order = SOURCES if self.requested == "auto" else (self.requested,)
        for name in order:
            if name == "cpu_time":
                return name
            if name == "tegrastats" and self._try_tegrastats():
                return name
            if name == "rapl" and self._try_rapl():
                return name
        raise RuntimeError(f"energy source {self.requested!r} is not available here: {'; '.join(self.notes)}")

    # ------------------------------------------------------------------ measure
    def __enter__(self) -> EnergyMeter:
        self._result = None
        self.source = self._choose()
        if self.source == "rapl":
            self._rapl_start = [d.read_uj() for d in self._domains]
        self._clock = _CpuClock.now()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        t1 = time.monotonic()
        clock = _CpuClock.now()
        joules: float | None = None
        extra: dict[str, Any] = {}
        if self.source == "rapl":
            ends = [d.read_uj() for d in self._domains]
            joules = 1e-6 * sum(
                rapl_delta_uj(a, b, d.max_range_uj)
                for a, b, d in zip(self._rapl_start, ends, self._domains, strict=True)
            )
            extra["rapl_domains"] = [d.name for d in self._domains]
        elif self.source == "tegrastats":
            assert self._sampler is not None
            # wait for the reading that covers the end of the window
            self._sampler.wait_for_reading(
                after=t1, timeout_s=max(2.0, 3 * self._sampler.interval_ms / 1000.0)
            )
            if self._own_sampler:
                self._sampler.stop()
            joules, covered = self._sampler.energy(self._t0, t1)
            extra.update(
                rail=self._sampler.rail_name(),
                interval_ms=self._sampler.interval_ms,
                samples=self._sampler.readings_between(self._t0, t1),
                covered_seconds=round(covered, 4),
            )
            if covered < 0.9 * (t1 - self._t0):
                self.notes.append(
                    f"tegrastats readings covered {covered:.3f} s of {t1 - self._t0:.3f} s; "
                    "the rest was filled from the nearest reading"
                )
        wall = clock.wall - self._clock.wall
        self._result = {
            "source": self.source,
            "joules": joules,
            "average_watts": (joules / wall) if joules is not None and wall > 0 else None,
            "cpu_seconds": (clock.user - self._clock.user) + (clock.system - self._clock.system),
            "cpu_user_seconds": clock.user - self._clock.user,
            "cpu_system_seconds": clock.system - self._clock.system,
            "wall_seconds": wall,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **extra,
            "notes": list(self.notes),
        }

    def result(self, items: int | None = None) -> dict[str, Any]:
        """The measurement; with ``items`` also per-item joules and seconds."""
        if self._result is None:
            raise RuntimeError("no measurement yet: use EnergyMeter as a context manager first")
        out = dict(self._result)
        if items is not None:
            if items <= 0:
                raise ValueError(f"items must be positive, got {items}")
            out["items"] = items
            out["joules_per_item"] = None if out["joules"] is None else out["joules"] / items
            out["wall_seconds_per_item"] = out["wall_seconds"] / items
            out["cpu_seconds_per_item"] = out["cpu_seconds"] / items
        return out
