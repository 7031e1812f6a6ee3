"""Does this machine train faster with tcmalloc? Training steps under each memory allocator.

    python -m elma_utils.bench.allocator [--profile cpu] [--steps 6] [--warmup 2] [--json FILE]

TensorFlow on the CPU allocates and frees hundreds of MB per training step. glibc's malloc hands
large blocks back to the kernel, so every step touches fresh pages again: on a virtual machine,
where a page fault is expensive, the kernel's share of the time can reach a third (seen on a
2-core AMD EPYC VM: 167,000 minor faults a second during ``elma train``). tcmalloc keeps the
freed memory for the next step. This runs the profile's real training step (its backbone, batch
size and sequence length, ``fit_span_model`` on the first windows of its training questions) in
one child process per allocator, ``LD_PRELOAD`` set or not, and prints the median seconds per
step after ``--warmup`` steps and the minor page faults per step.

``scripts/run_pipeline.sh`` and ``scripts/test.sh`` preload tcmalloc when it is installed
(``scripts/allocator.sh``; ``ELMA_MALLOC=system`` opts out); this measures whether that pays
on a given machine. Allocation does not change arithmetic: the losses printed are the same.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TCMALLOC = "tcmalloc_minimal"


def tcmalloc_path() -> str | None:
    """The tcmalloc library the dynamic linker would load (Debian: libtcmalloc-minimal4)."""
    name = ctypes.util.find_library(TCMALLOC)
    if name is None:
        return None
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/lib"):
        if Path(d, name).is_file():
            return str(Path(d, name))
    return name  # a bare soname: LD_PRELOAD finds it on the linker's path too


def measure_steps(profile_name: str, steps: int, warmup: int, data_dir: Path | None) -> dict[str, Any]:
    """Seconds and minor page faults of each training step of the profile's model (this process)."""
    import keras
    import numpy as np

    from elma_utils import config as cfg
    from elma_utils.model import artifacts
    from elma_utils.model.finetune import training_examples
    from elma_utils.model.qa_model import SpanQAModel
    from elma_utils.model.training import fit_span_model
    from elma_utils.squad.features import cached_features

    profile = cfg.get_profile(profile_name)
    keras.utils.set_random_seed(profile.seed)
    backbone, _ = artifacts.build_backbone(profile.backbone, source=profile.backbone_source)
    tokenizer = artifacts.tokenizer_for(profile.backbone)
    n = steps + warmup
    examples = training_examples(profile, data_dir)[: n * profile.batch_size]
    feats = cached_features(examples, tokenizer, cfg.cache_dir(), max_seq_len=profile.max_seq_len,
                            doc_stride=profile.doc_stride, max_query_len=profile.max_query_len)  # fmt: skip
    feats = feats.subset(np.arange(n * profile.batch_size))
    model = SpanQAModel(backbone)
    model.build_for()
    marks: list[tuple[float, int]] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if not marks:
                marks.append(_now())

        def on_train_batch_end(self, batch, logs=None):
            marks.append(_now())

    with tempfile.TemporaryDirectory() as tmp:
        stats = fit_span_model(model, feats, batch_size=profile.batch_size, epochs=1.0,
                               learning_rate=profile.learning_rate, warmup_fraction=profile.warmup_fraction,
                               weight_decay=profile.weight_decay, checkpoint_every=n,
                               checkpoint_dir=Path(tmp), seed=profile.seed, verbose=0,
                               extra_callbacks=[Clock()])  # fmt: skip
    seconds = np.diff([m[0] for m in marks])[warmup:]
    faults = np.diff([m[1] for m in marks])[warmup:]
    return {
        "steps": int(seconds.size),
        "median_step_s": float(np.median(seconds)),
        "step_s": [round(float(s), 3) for s in seconds],
        "minor_faults_per_step": float(np.median(faults)),
        "train_steps_total": stats["total_steps"],
    }


def _now() -> tuple[float, int]:
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def compare(profile: str, steps: int, warmup: int, data_dir: Path | None) -> dict[str, Any]:
    """One child process per allocator; ``tcmalloc`` is left out where it is not installed."""
    preload = tcmalloc_path()
    runs = {"system malloc": None, **({"tcmalloc": preload} if preload else {})}
    results = {}
    for label, lib in runs.items():
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if lib:
            env["LD_PRELOAD"] = lib
        argv = [sys.executable, "-m", "elma_utils.bench.allocator", "--child", "--profile", profile,
                "--steps", str(steps), "--warmup", str(warmup)]  # fmt: skip
        if data_dir is not None:
            argv += ["--data-dir", str(data_dir)]
        out = subprocess.run(argv, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the {label} run failed:\n{out.stderr[-2000:]}")
        results[label] = {"ld_preload": lib, **json.loads(out.stdout.strip().splitlines()[-1])}
    return {"profile": profile, "tcmalloc": preload, "runs": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m elma_utils.bench.allocator", description=__doc__.split("\n")[0]
    )
    p.add_argument("--profile", default="cpu", help="profile whose model, batch and sequence length train")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per allocator")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (graph tracing)")
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    p.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first step traces the graph)")
    if args.child:
        print(json.dumps(measure_steps(args.profile, args.steps, args.warmup, args.data_dir)))
        return 0
    from elma_utils import config as cfg

    try:
        cfg.get_profile(args.profile)
    except ValueError as e:
        p.error(str(e))
    result = compare(args.profile, args.steps, args.warmup, args.data_dir)
    if result["tcmalloc"] is None:
        print(
            "tcmalloc is not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4): system malloc only"
        )
    for label, r in result["runs"].items():
        print(f"{label}: {r['median_step_s']:.2f} s/step (median of {r['steps']}), "
              f"{r['minor_faults_per_step']:,.0f} minor page faults/step")  # fmt: skip
    runs = result["runs"]
    if len(runs) == 2:
        ratio = runs["system malloc"]["median_step_s"] / runs["tcmalloc"]["median_step_s"]
        result["speedup"] = ratio
        print(f"tcmalloc trains {ratio:.2f}× as fast as system malloc here")
    if args.json is not None:
        from elma_utils.atomic_files import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
