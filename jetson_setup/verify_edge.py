"""Check the edge Python environment and answer a sample question with an edge bundle.

Run by 04_verify.sh with the edge environment's Python (it works on any machine with
elma_utils, NumPy and a LiteRT interpreter):

    python jetson_setup/verify_edge.py --versions --expect-python 3.11 --expect numpy==2.4.6
    python jetson_setup/verify_edge.py --bundle DIR [--question Q --context C] [--repeat N]

Prints one JSON object per check. Exit status: 0 fine, 1 a version differs from the pin,
2 the bundle is refused or cannot answer.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata

CONTEXT = (
    "The Jetson TX2 is an embedded computer made by NVIDIA. It has a 256-core Pascal GPU, "
    "six ARM CPU cores and 8 GB of memory shared by the CPU and the GPU. It was released "
    "in March 2017 and runs Ubuntu as part of NVIDIA's JetPack."
)
QUESTION = "When was the Jetson TX2 released?"
INTERPRETER_PACKAGES = ("ai-edge-litert", "tflite-runtime", "tensorflow")


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
    parser.add_argument("--bundle", help="an edge bundle directory (elma_utils.export)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--context", default=CONTEXT)
    parser.add_argument("--repeat", type=int, default=3, help="measured answers after one warm-up")
    parser.add_argument("--energy-source", default="auto", choices=("auto", "tegrastats", "rapl", "cpu_time"))
    args = parser.parse_args(argv)
    if not args.versions and not args.bundle:
        parser.error("give --versions, --bundle DIR, or both")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    status = 0
    if args.versions:
        found = versions()
        wrong = version_mismatches(found, args.expect_python, args.expect)
        print(json.dumps({"versions": found, "mismatches": wrong}, indent=1))
        status = 1 if wrong else 0
    if args.bundle:
        try:
            report = answer_sample(args.bundle, args.question, args.context, args.repeat, args.energy_source)
        except (ValueError, OSError, RuntimeError) as err:  # BundleError is a ValueError
            print(f"edge bundle check failed: {err}", file=sys.stderr)
            return 2
        print(json.dumps({"edge_answer": report}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
