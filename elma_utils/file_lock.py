"""One holder at a time for a folder's work (sync, publish, growth): an flock on a lock file.

The kernel drops the lock when the holder dies, so a crashed sync or publisher never leaves a
stale lock behind for a person to delete by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def exclusive_lock(path: str | Path, blocking: bool = True) -> Iterator[IO[bytes] | None]:
    """Hold an exclusive flock on ``path`` (created, with its folder) for the ``with`` block.

    Yields the open lock file; with ``blocking=False`` yields None at once when another process
    holds the lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        try:
            yield fh
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
