"""What an exits artifact is on disk, for readers with and without Keras (training, the server).

An exits artifact is a directory with the exit heads' weights and ``exits.json``, which names
the full model the heads sit on, twice: relative to the exits directory (``full_model``), so an
artifact and its full model can be moved or copied together, and absolute as written
(``full_model_at_write``), for a copy of the exits alone (the server keeps each published
version's exits under its root while the full model stays where it is). Older artifacts wrote
one absolute ``full_model``, which is read as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

EXITS_CONFIG = "exits.json"
EXITS_WEIGHTS = "exits.weights.h5"


def full_model_entry(full_model_dir: str | os.PathLike, exits_dir: str | os.PathLike) -> dict[str, str]:
    """``exits.json``'s entries naming the full model (relative and absolute; see the module note)."""
    full = Path(full_model_dir).resolve()
    return {"full_model": os.path.relpath(full, Path(exits_dir).resolve()), "full_model_at_write": str(full)}


def full_model_path(exits_dir: str | os.PathLike, exits_config: dict) -> Path:
    """The full model an exits config names: beside the exits if it is there, else where it was."""
    path = Path(exits_config["full_model"])
    if path.is_absolute():
        return path
    beside = (Path(exits_dir) / path).resolve()
    written = exits_config.get("full_model_at_write")
    return Path(written) if not beside.is_dir() and written and Path(written).is_dir() else beside
