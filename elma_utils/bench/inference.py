"""`elma bench`: latency of one question at batch 1 and evaluation throughput.

Numbers come from repeated runs after warm-up (p50/p95/p99 of wall-clock time), on
whatever machine runs it; they are reported, never asserted.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from elma_utils.model.artifacts import load_span_model


def machine_description() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import keras

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "keras_backend": keras.backend.backend(),
        "keras": keras.__version__,
    }


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "runs": len(ms),
    }


def benchmark_inference(
    model_dir: str | Path,
    seq_len: int = 384,
    runs: int = 50,
    warmup: int = 5,
    eval_examples: int = 500,
    data_dir: Path | None = None,
) -> dict:
    """Batch-1 latency at a fixed sequence length, plus dev-set evaluation throughput."""
    model, tokenizer, config = load_span_model(Path(model_dir))
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (1, seq_len)).astype("int32")
    seg = np.zeros_like(ids)
    seg[:, 32:] = 1
    x = {"token_ids": ids, "segment_ids": seg, "padding_mask": np.ones_like(ids)}
    for _ in range(warmup):
        model.predict_on_batch(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - t0)
    result = {
        "model": str(model_dir),
        "parameters": int(model.count_params()),
        "weights_mb": round((Path(model_dir) / "model.weights.h5").stat().st_size / 1e6, 1),
        "batch1_latency": {"seq_len": seq_len, **percentiles(times)},
        "machine": machine_description(),
    }
    if eval_examples:
        from elma_utils.model.evaluation import evaluate_dataset
        from elma_utils.squad.data import load_squad

        ds = load_squad("1.1", "dev", data_dir=data_dir, limit=eval_examples)
        t0 = time.perf_counter()
        ev = evaluate_dataset(model, tokenizer, config, ds, progress=False)
        total = time.perf_counter() - t0
        result["evaluation_throughput"] = {
            "questions": ev["questions"],
            "features": ev["features"],
            "model_questions_per_s": ev["questions_per_second"],
            "end_to_end_questions_per_s": round(ev["questions"] / total, 2),
            "f1_on_sample": round(ev["scores"]["f1"], 2),
        }
    return result
