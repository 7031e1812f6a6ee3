"""The device program never imports TensorFlow or Keras: each module of `elma_utils.edge` (and
the speech front end the device uses) is imported alone in a fresh interpreter, as the board
would, and the test fails if a heavy framework came with it."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import elma_utils.edge

HEAVY = ("tensorflow", "keras", "keras_hub", "tensorflow_text", "tensorflow_hub", "jax", "torch")
DEVICE_MODULES = sorted(
    [f"elma_utils.edge.{m.name}" for m in pkgutil.iter_modules(elma_utils.edge.__path__)]
    + [
        "elma_utils.edge",
        "elma_utils.speech",
        "elma_utils.speech.audio",
        "elma_utils.speech.recognizers",
        "elma_utils.speech.speech_gate",
        "elma_utils.speech.nbest",
        "elma_utils.speech.question_lm",
        "elma_utils.speech.wer",
        "elma_utils.speech.spoken_qa",
    ]
)

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def test_the_device_package_lists_its_parts():
    names = {m.rsplit(".", 1)[1] for m in DEVICE_MODULES if m.startswith("elma_utils.edge.")}
    assert {"runtime", "tokenizer", "client", "ssh_client", "outbox", "sync", "protocol", "identity"} <= names


@pytest.mark.parametrize("module", DEVICE_MODULES)
def test_device_module_imports_no_tensorflow_or_keras(module):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), module], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], f"{module} pulls in a heavy framework"
