"""Writes that a crash cannot leave half done: a reader sees the old file or the new one.

Used wherever another process may read while we write (the published LATEST.json, the
edge's installed-version records): write a temporary sibling, fsync it, ``os.replace`` it
over the target, fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NEW_FILE_MODE = 0o644  # mkstemp makes 0600 files; these are reports and manifests, not secrets


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` in one step (temp file + fsync + rename + dir fsync).

    The result keeps the replaced file's permissions, or gets ``mode`` (default 0644) when
    there was none, so an atomic write reads like a plain one to other users and tools.
    """
    path = Path(path)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), mode)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, mode: int | None = None) -> None:
    """``write_bytes_atomic`` of ``obj`` as indented UTF-8 JSON."""
    write_bytes_atomic(path, json.dumps(obj, indent=2).encode("utf-8"), mode)
