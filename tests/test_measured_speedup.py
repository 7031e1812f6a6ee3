"""Interleaved batch-1 timing: both runs share every disturbance, and the real runners answer."""

from __future__ import annotations

import time

import pytest

from elma_utils.early_exit.measured_speedup import interleaved_times, measure_speedup, speedup_summary


def test_runs_take_turns_on_every_item_in_alternating_order():
    calls = []
    runs = {"a": lambda x: calls.append(("a", x)) or x * 10, "b": lambda x: calls.append(("b", x)) or -x}
    out = interleaved_times(runs, [1, 2, 3])
    assert calls == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    assert out["outputs"] == {"a": [10, 20, 30], "b": [-1, -2, -3]}
    assert all(len(t) == 3 and min(t) >= 0 for t in out["times"].values())


def test_a_stall_during_the_measurement_lands_on_both_runs():
    """A 30 ms disturbance over items 4-7 (as a test run sharing the cores would make) slows
    whichever run is timed then; interleaved, both get it and the ratio stays near 2."""
    start = time.perf_counter()

    def work(ms):
        def run(i):
            stall = 0.03 if 4 <= i < 8 else 0.0
            time.sleep(ms / 1000 + stall / 2)
            return time.perf_counter() - start

        return run

    out = interleaved_times({"slow": work(8), "fast": work(4)}, list(range(12)))
    s = speedup_summary(out["times"]["slow"], out["times"]["fast"])
    assert 1.0 < s["speedup"] < 2.0  # the stall is shared: no inversion, no inflation
    assert s["speedup_p50"] == pytest.approx(2.0, rel=0.35)


def test_speedup_summary_of_known_times():
    s = speedup_summary([0.02, 0.02, 0.02, 0.2], [0.01, 0.01, 0.01, 0.01])
    assert s["speedup_p50"] == pytest.approx(2.0)
    assert s["speedup"] == pytest.approx(0.065 / 0.01)


def test_measure_speedup_on_a_tiny_exits_artifact(minilm_tokenizer, tmp_path):
    """All layers (threshold 0: never confident) against exit-at-once (threshold 1) on real
    dev questions of one article; both runs answer every question."""
    from qa_fixtures import save_tiny_exits

    exits = save_tiny_exits(tmp_path, minilm_tokenizer, num_layers=3)
    r = measure_speedup(exits, 1.0, "1.1", n_questions=8)
    assert r["questions"] == 8 and r["timing"] == "interleaved per question"
    assert r["full_depth"]["avg_exit_layer"] == 3.0 and r["early_exit"]["avg_exit_layer"] == 1.0
    assert 0 <= r["full_depth"]["f1"] <= 100 and r["speedup"] > 0 and r["speedup_p50"] > 0
    never = measure_speedup(exits, 0.0, "1.1", n_questions=8)
    assert never["early_exit"]["avg_exit_layer"] == 3.0
    assert never["early_exit"]["f1"] == pytest.approx(never["full_depth"]["f1"])
