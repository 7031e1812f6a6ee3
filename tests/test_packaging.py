"""The install groups in pyproject.toml say what each program needs, with the project's pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return pins


def test_every_extra_pins_what_requirements_pin():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == {"edge", "whisper-base", "server", "train", "notebooks"}
    pins = _pins()
    for group, reqs in extras.items():
        for req in reqs:
            if req.startswith("elma["):
                assert req[5:-1] in extras, f"{group}: {req} names no group"
                continue
            name, version = req.split("==")
            key = re.sub(r"[-_.]+", "-", name).lower()
            assert pins.get(key) == version, f"[{group}] {req} but requirements.txt pins {pins.get(key)}"


def test_the_edge_group_has_no_training_framework():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[=\[]", r)[0].lower() for r in extras["edge"]}
    assert names.isdisjoint({"tensorflow", "keras", "keras-hub", "tensorflow-text", "torch", "jax"})
    assert {"ai-edge-litert", "paramiko", "faster-whisper", "numpy"} <= names
