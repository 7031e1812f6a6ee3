"""Measured batch-1 speed-up of early exit: the same questions through all layers and with
early exit, timed **interleaved**.

Timing the two runs one after the other let anything else on the machine (a test run, a
backup, thermal throttling) land on one run only: notebook 03 once recorded 0.83× for an
early exit that leaves at 5.3 of 6 layers, because a test run shared the two cores during
the early-exit half. Here every question runs through both runners back to back, in an order
that alternates, so a disturbance lands on both; the median speed-up is recorded beside the
mean's, since one stall moves the mean alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def interleaved_times(runs: dict[str, Callable[[Any], Any]], items: Sequence[Any]) -> dict[str, Any]:
    """Seconds per item for each run, the runs taking turns on every item (first run first on
    even items, last first on odd ones). Returns ``{"times": {name: [s]}, "outputs": {name: [..]}}``."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [0.0] * len(items) for n in names}
    outputs: dict[str, list[Any]] = {n: [None] * len(items) for n in names}
    for i, item in enumerate(items):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            outputs[name][i] = runs[name](item)
            times[name][i] = time.perf_counter() - t0
    return {"times": times, "outputs": outputs}


def speedup_summary(base_s: Sequence[float], fast_s: Sequence[float]) -> dict[str, float]:
    """Mean and median time (ms) of both runs and the speed-ups they give (base / fast)."""
    base, fast = np.asarray(base_s, dtype=np.float64), np.asarray(fast_s, dtype=np.float64)
    return {
        "speedup": float(base.mean() / fast.mean()),
        "speedup_p50": float(np.median(base) / np.median(fast)),
    }


def measure_speedup(
    exits_dir: Path,
    threshold: float,
    version: str = "1.1",
    n_questions: int = 300,
    offset: int = 0,
    data_dir: Path | None = None,
    no_answer_margin: float | None = None,
    null_thresholds: list[float] | None = None,
) -> dict:
    """Wall-clock time per question at batch 1: early exit at ``threshold`` vs all layers.

    The questions are ``n_questions`` from ``offset`` on, within the article of the question
    at ``offset`` (so a threshold cross-fitted over articles stays held-out for all of them).
    SQuAD 2.0: ``null_thresholds`` (one per layer) and ``no_answer_margin`` as calibrated by
    ``squad2.cross_fitted_squad2_exit``; both runs use the same no-answer thresholds.
    Tokenisation is done before timing."""
    from elma_utils.early_exit.experiment import load_exits
    from elma_utils.early_exit.policies import EntropyPolicy, NeverExit
    from elma_utils.early_exit.runtime import EarlyExitRunner
    from elma_utils.squad.data import load_squad
    from elma_utils.squad.features import build_features
    from elma_utils.squad.metrics import per_question_scores

    multi, tokenizer, config, _ = load_exits(exits_dir)
    ds = load_squad(version, "dev", data_dir=data_dir)
    title = ds.examples[offset].title
    examples = [e for e in ds.examples[offset:] if e.title == title][:n_questions]
    windows = [
        build_features(
            [e],
            tokenizer,
            config["max_seq_len"],
            config["doc_stride"],
            config["max_query_len"],
            progress=False,
        )
        for e in examples
    ]
    early = EntropyPolicy(threshold, no_answer_margin=no_answer_margin, null_threshold=null_thresholds or 0.0)
    runners = {
        name: EarlyExitRunner(multi, policy, null_threshold=null_thresholds)
        for name, policy in (("full_depth", NeverExit()), ("early_exit", early))
    }
    pairs = list(zip(examples, windows, strict=True))
    runs = {name: (lambda pair, r=runner: r.run([pair[0]], pair[1])[0]) for name, runner in runners.items()}
    interleaved_times(runs, pairs[:5])  # warm-up: trace the shapes
    timed = interleaved_times(runs, pairs)
    result: dict[str, Any] = {}
    for name in runs:
        answers = {e.qas_id: a for e, a in zip(examples, timed["outputs"][name], strict=True)}
        scores = per_question_scores(ds.raw, {q: a.text for q, a in answers.items()}, version)
        seconds = np.asarray(timed["times"][name])
        result[name] = {
            "ms_per_question": float(seconds.mean() * 1000),
            "p50_ms": float(np.median(seconds) * 1000),
            "f1": float(100 * np.mean([scores[q][1] for q in answers])),
            "avg_exit_layer": float(np.mean([a.exit_layer for a in answers.values()])),
        }
    result.update(speedup_summary(timed["times"]["full_depth"], timed["times"]["early_exit"]))
    result.update(questions=len(examples), threshold=threshold, timing="interleaved per question")
    return result
