"""Energy measurement: tegrastats lines from real boards, RAPL counters, CPU time, peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest

from elma_utils.bench.energy import (
    EnergyMeter,
    describe_energy_sources,
    peak_rss_mb,
    rapl_delta_uj,
    rapl_domains,
)
from elma_utils.bench.tegrastats import (
    TegrastatsSampler,
    energy_joules,
    parse_line,
    parse_lines,
    read_log,
    window_energy,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"
TX2_LOG = FIXTURES / "tx2_r32_log.txt"
# VDD_IN instant readings (mW) of tx2_r32_log.txt, in order
TX2_LOG_VDD_IN = [3258, 2951, 2798, 3335, 3220, 14131, 14131, 14322]


def _other(n: int) -> str:
    return (FIXTURES / "other_jetsons.txt").read_text().splitlines()[n - 1]


# ----------------------------------------------------------------------------- parsing
def test_tx2_line_rails_ram_and_input_power() -> None:
    s = parse_line(_other(1))
    assert s.rails == {
        "VDD_SYS_GPU": (152.0, 152.0),
        "VDD_SYS_SOC": (687.0, 687.0),
        "VDD_4V0_WIFI": (0.0, 0.0),
        "VDD_IN": (3056.0, 3056.0),
        "VDD_SYS_CPU": (152.0, 152.0),
        "VDD_SYS_DDR": (883.0, 883.0),
    }
    assert (s.ram_used_mb, s.ram_total_mb) == (2344, 7852)
    assert s.timestamp is None
    assert s.input_rail() == "VDD_IN" and s.input_power_mw() == 3056.0


def test_instant_and_average_differ_and_iram_is_not_a_rail() -> None:
    tx1 = parse_line(_other(2))
    assert tx1.rails == {"VDD_IN": (2532.0, 2698.0), "VDD_CPU": (76.0, 178.0), "VDD_GPU": (19.0, 19.0)}
    lab = parse_lines((FIXTURES / "tx2_lab_lines.txt").read_text().splitlines())[0]
    assert [s.rails["VDD_SYS_DDR"] for s in lab] == [(134.0, 134.0), (115.0, 124.0), (134.0, 127.0)]
    assert [s.input_power_mw() for s in lab] == [1876.0] * 3


def test_newer_format_with_timestamp_and_milliwatt_units() -> None:
    s = parse_line(_other(7))
    assert s.timestamp == datetime(2024, 12, 23, 22, 54, 11)
    assert s.rails["VDD_IN"] == (3913.0, 3922.0)
    assert s.rails["VDD_CPU_GPU_CV"] == (598.0, 598.0)  # printed "598mW/598"
    assert s.rails["VDD_SOC"] == (1238.0, 1237.0)
    assert (s.ram_used_mb, s.ram_total_mb) == (3162, 7620)
    assert parse_line(_other(5)).rails["VDD_IN"] == (5299.0, 5299.0)


def test_input_rail_per_board() -> None:
    assert parse_line(_other(3)).input_rail() == "POM_5V_IN"  # Nano
    assert parse_line(_other(3)).input_power_mw() == 1022.0
    assert parse_line(_other(6)).input_rail() == "VIN_SYS_5V0"  # AGX Orin
    agx_xavier = parse_line(_other(4))
    assert set(agx_xavier.rails) == {"GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"}
    assert agx_xavier.input_rail() is None and agx_xavier.input_power_mw() is None
    assert agx_xavier.input_power_mw("SYS5V") == 1482.0  # a named rail still works


@pytest.mark.parametrize(
    "line",
    ["Thu Dec 17 18:16:50 UTC 2020", "RAM 1795/7859MB (lfb 385x4MB) SWAP 518/3929MB", "", "VDD_IN 5/5"],
)
def test_non_tegrastats_lines_are_refused(line: str) -> None:
    with pytest.raises(ValueError, match="not a tegrastats line"):
        parse_line(line)


def test_log_skips_the_date_header_and_keeps_every_reading() -> None:
    samples, skipped = read_log(TX2_LOG)
    assert skipped == 1
    assert [s.input_power_mw() for s in samples] == TX2_LOG_VDD_IN
    assert samples[-1].rails["VDD_SYS_GPU"] == (7326.0, 7104.0)


# --------------------------------------------------------------------------- integrals
def test_energy_of_a_log_with_a_fixed_interval() -> None:
    samples, _ = read_log(TX2_LOG)
    # sum of VDD_IN = 58146 mW; each reading stands for one interval
    assert energy_joules(samples, interval_ms=1000) == pytest.approx(58.146)
    assert energy_joules(samples, interval_ms=500) == pytest.approx(29.073)
    assert energy_joules(samples[:3], interval_ms=100) == pytest.approx(0.9007)
    assert energy_joules([], interval_ms=100) == 0.0
    with pytest.raises(ValueError, match="timestamps"):
        energy_joules(samples)  # R32 lines carry no time: the interval is needed
    with pytest.raises(ValueError, match="positive"):
        energy_joules(samples, interval_ms=0)


def test_energy_from_timestamps() -> None:
    line = _other(7)
    lines = [
        line,
        line.replace("22:54:11", "22:54:12").replace("VDD_IN 3913mW", "VDD_IN 4000mW"),
        line.replace("22:54:11", "22:54:14").replace("VDD_IN 3913mW", "VDD_IN 5000mW"),
    ]
    samples, _ = parse_lines(lines)
    # reading i covers (t_{i-1}, t_i]: 4.000 W * 1 s + 5.000 W * 2 s
    assert energy_joules(samples) == pytest.approx(14.0)
    # a rail with no reading on some line is an error, not a silent zero
    with pytest.raises(ValueError, match="no input rail"):
        energy_joules([parse_line(_other(4))], interval_ms=100)


def test_window_energy_holds_each_reading_over_the_time_before_it() -> None:
    times, watts = [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]
    assert window_energy(times, watts, 0.5, 2.5, 1.0) == pytest.approx((40.0, 2.0))
    # after the last reading: the last power fills the gap, and coverage says so
    assert window_energy(times, watts, 2.5, 4.0, 1.0) == pytest.approx((45.0, 0.5))
    # before the first reading's span: the first power fills it
    assert window_energy(times, watts, -1.0, 0.5, 1.0) == pytest.approx((15.0, 0.5))
    with pytest.raises(ValueError):
        window_energy(times, watts, 2.0, 1.0, 1.0)


# ---------------------------------------------------------------------- live sampling
@pytest.fixture
def fake_tegrastats(tmp_path: Path) -> tuple[Path, Path]:
    """An executable that behaves like tegrastats: replays the TX2 log every --interval ms."""
    args_file = tmp_path / "args.txt"
    exe = tmp_path / "tegrastats"
    exe.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            interval=1000
            printf '%s\\n' "$*" > '{args_file}'
            while [[ $# -gt 0 ]]; do
              case "$1" in --interval) interval="$2"; shift 2 ;; *) shift ;; esac
            done
            pause=$(awk -v ms="$interval" 'BEGIN {{ printf "%.3f", ms / 1000 }}')
            while true; do
              while IFS= read -r line; do echo "$line"; sleep "$pause"; done < '{TX2_LOG}'
            done
            """
        )
    )
    exe.chmod(0o755)
    return exe, args_file


def test_sampler_runs_tegrastats_and_collects_readings(fake_tegrastats) -> None:
    exe, args_file = fake_tegrastats
    with TegrastatsSampler(interval_ms=40, executable=str(exe)) as sampler:
        assert sampler.wait_for_reading(after=float("-inf"), timeout_s=10)
        t0 = time.monotonic()
        assert sampler.wait_for_reading(after=t0 + 0.2, timeout_s=10)
        joules, covered = sampler.energy(t0, t0 + 0.2)
        assert sampler.running
    assert not sampler.running  # stopped on exit
    assert args_file.read_text().split() == ["--interval", "40"]
    powers = [r.sample.input_power_mw() for r in sampler.readings]
    assert len(powers) >= 3 and set(powers) <= set(TX2_LOG_VDD_IN)
    assert sampler.rail_name() == "VDD_IN"
    # every reading of the log lies between 2.798 W and 14.322 W
    assert 2.798 * 0.2 - 1e-9 <= joules <= 14.322 * 0.2 + 1e-9
    assert covered == pytest.approx(0.2)


def test_meter_with_tegrastats(fake_tegrastats) -> None:
    exe, _ = fake_tegrastats
    with EnergyMeter(source="tegrastats", interval_ms=30, tegrastats=str(exe)) as m:
        time.sleep(0.3)
    r = m.result(items=3)
    assert r["source"] == "tegrastats" and r["rail"] == "VDD_IN" and r["interval_ms"] == 30
    assert r["samples"] >= 2
    window = r["wall_seconds"]
    assert 0.29 <= window < 5
    assert 2.798 * window * 0.95 <= r["joules"] <= 14.322 * window * 1.05
    assert r["joules_per_item"] == pytest.approx(r["joules"] / 3)
    assert r["average_watts"] == pytest.approx(r["joules"] / window)


def test_meter_shares_a_running_sampler(fake_tegrastats) -> None:
    exe, _ = fake_tegrastats
    with TegrastatsSampler(interval_ms=30, executable=str(exe)) as sampler:
        sampler.wait_for_reading(after=float("-inf"), timeout_s=10)
        results = []
        for _ in range(2):
            with EnergyMeter(sampler=sampler) as m:
                time.sleep(0.1)
            results.append(m.result())
        assert sampler.running  # a shared sampler is left running
    assert [r["source"] for r in results] == ["tegrastats", "tegrastats"]
    assert all(r["joules"] > 0.2 for r in results)


def test_auto_falls_back_when_tegrastats_prints_nothing_useful(tmp_path: Path) -> None:
    exe = tmp_path / "tegrastats"
    exe.write_text("#!/bin/sh\necho 'tegrastats: permission denied'\n")
    exe.chmod(0o755)
    with EnergyMeter(tegrastats=str(exe), powercap=tmp_path / "none") as m:
        pass
    r = m.result()
    assert r["source"] == "cpu_time" and r["joules"] is None
    assert any(n.startswith("tegrastats: tegrastats printed no line") for n in r["notes"])
    with (
        pytest.raises(RuntimeError, match="not available"),
        EnergyMeter(source="tegrastats", tegrastats="/nonexistent"),
    ):
        pass


# ----------------------------------------------------------------------------- RAPL
def _zone(root: Path, name: str, label: str, energy: int, max_range: int | None = 10**12) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    if max_range is not None:
        (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_rapl_sums_packages_and_ignores_subzones(tmp_path: Path) -> None:
    p0 = _zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    p1 = _zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 7_000_000)  # inside package-0: not added
    (tmp_path / "intel-rapl").mkdir()  # the control type directory, no counter
    assert describe_energy_sources(powercap=tmp_path, tegrastats="/nonexistent")["auto_source"] == "rapl"
    with EnergyMeter(tegrastats="/nonexistent", powercap=tmp_path) as m:
        (p0 / "energy_uj").write_text("3500000\n")
        (p1 / "energy_uj").write_text("5250000\n")
        (core / "energy_uj").write_text("99000000\n")
    r = m.result(items=2)
    assert r["source"] == "rapl" and r["rapl_domains"] == ["package-0", "package-1"]
    assert r["joules"] == pytest.approx(2.75)
    assert r["joules_per_item"] == pytest.approx(1.375)


def test_rapl_counter_wraparound(tmp_path: Path) -> None:
    assert rapl_delta_uj(999_000_000, 500_000, 1_000_000_000) == 1_500_000
    assert rapl_delta_uj(10, 25, 1_000_000_000) == 15
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, max_range=1_000_000_000)
    with EnergyMeter(source="rapl", powercap=tmp_path) as m:
        (zone / "energy_uj").write_text("500000\n")
    assert m.result()["joules"] == pytest.approx(1.5)


def test_rapl_prefers_psys_and_reports_unreadable_zones(tmp_path: Path) -> None:
    _zone(tmp_path / "a", "intel-rapl:0", "package-0", 1)
    _zone(tmp_path / "a", "intel-rapl:1", "psys", 1)
    domains, note = rapl_domains(tmp_path / "a")
    assert [d.name for d in domains] == ["psys"] and "psys" in note
    _zone(tmp_path / "b", "intel-rapl:0", "package-0", 1, max_range=None)  # no max_energy_range_uj
    domains, note = rapl_domains(tmp_path / "b")
    assert domains == [] and "unreadable" in note and "intel-rapl:0" in note
    with (
        pytest.raises(RuntimeError, match="not available"),
        EnergyMeter(source="rapl", powercap=tmp_path / "b"),
    ):
        pass


# ------------------------------------------------------------------------- CPU time
def test_cpu_time_when_no_counter(tmp_path: Path) -> None:
    with EnergyMeter(tegrastats="/nonexistent", powercap=tmp_path) as m:
        t_end = time.process_time() + 0.15
        while time.process_time() < t_end:
            pass
    r = m.result()
    assert r["source"] == "cpu_time" and r["joules"] is None and r["average_watts"] is None
    assert 0.1 <= r["cpu_seconds"] <= r["wall_seconds"] * 2 + 0.05
    assert r["cpu_seconds"] == pytest.approx(r["cpu_user_seconds"] + r["cpu_system_seconds"])
    assert r["peak_rss_mb"] > 10
    assert any("does not exist" in n or "no intel-rapl" in n for n in r["notes"])


def test_result_needs_a_measurement_and_positive_items(tmp_path: Path) -> None:
    meter = EnergyMeter(source="cpu_time")
    with pytest.raises(RuntimeError, match="no measurement"):
        meter.result()
    with meter:
        pass
    with pytest.raises(ValueError, match="positive"):
        meter.result(items=0)
    with pytest.raises(ValueError, match="source"):
        EnergyMeter(source="battery")


# ------------------------------------------------------------------------ peak memory
def test_peak_rss_from_proc_status_and_fallback(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  999999 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 100000 kB\n")
    assert peak_rss_mb(status) == pytest.approx(120.5625)
    assert peak_rss_mb(tmp_path / "missing") > 10  # ru_maxrss of this process


def test_peak_rss_sees_a_large_allocation() -> None:
    code = (
        "import json, numpy as np\n"
        "from elma_utils.bench.energy import peak_rss_mb\n"
        "before = peak_rss_mb()\n"
        "x = np.ones(96 * 2**20 // 8)\n"
        "print(json.dumps([before, peak_rss_mb()]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert after - before >= 90
