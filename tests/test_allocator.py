"""``bench.allocator``: the profile's real training step runs under glibc's malloc and under a
preloaded tcmalloc in child processes, TensorFlow works with tcmalloc, and tcmalloc is what
removes the page faults the scripts preload it for."""

from __future__ import annotations

import json

import pytest

from elma_utils.bench import allocator


def test_both_allocators_train_and_tcmalloc_takes_the_page_faults_away(tmp_path, capsys):
    out = tmp_path / "allocator.json"
    assert allocator.main(["--profile", "smoke", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    system = result["runs"]["system malloc"]
    assert system["ld_preload"] is None and system["steps"] == 2 and system["median_step_s"] > 0
    assert system["train_steps_total"] == 3  # warm-up + timed steps, nothing more
    if allocator.tcmalloc_path() is None:
        pytest.skip("libtcmalloc-minimal4 is not installed (scripts/setup.sh installs it)")
    tc = result["runs"]["tcmalloc"]
    assert tc["ld_preload"] == allocator.tcmalloc_path() and tc["steps"] == 2
    # glibc returns the step's blocks to the kernel, so each step faults them in again
    assert system["minor_faults_per_step"] > 10 * max(tc["minor_faults_per_step"], 1)
    assert result["speedup"] == pytest.approx(system["median_step_s"] / tc["median_step_s"])
    assert "tcmalloc trains" in capsys.readouterr().out


def test_bad_arguments_fail_with_one_line(capsys):
    with pytest.raises(SystemExit):
        allocator.main(["--profile", "nosuch"])
    assert "unknown profile 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        allocator.main(["--steps", "0"])
    assert "--steps and --warmup must be at least 1" in capsys.readouterr().err
