"""One holder at a time, and a dead holder leaves no lock behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from elma_utils.file_lock import exclusive_lock

HOLD = """
import sys, time
from elma_utils.file_lock import exclusive_lock
with exclusive_lock(sys.argv[1]) as fh:
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_holder_waits_or_is_told_and_a_killed_holder_releases(tmp_path: Path) -> None:
    lock = tmp_path / "deep" / "folder" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the folder was created for it
        with exclusive_lock(lock, blocking=False) as fh:
            assert fh is None  # held by the other process
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, blocking=False) as fh:
        assert fh is not None and not fh.closed  # the kernel released the dead holder's lock
        with exclusive_lock(lock, blocking=False) as again:
            assert again is None  # flock: a second open file in the same process is refused too
    with exclusive_lock(lock) as fh:
        assert fh is not None
