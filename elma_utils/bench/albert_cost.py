"""What ALBERT-base costs on the device, beside MiniLM-L6: int8 bundle sizes and time per part.

A benchmark, not a test (numbers go to ``reports/metrics/bench_albert_cost.json``). Two edge
bundles are written with the project's exporter (``export.bundle.write_bundle``, int8 =
dynamic-range: int8 weights, float activations, open sequence length):

- **ALBERT-base** (``backbones.ALBERT_BASE``: 12 layers sharing one, 12 heads, hidden 768,
  intermediate 3072, embeddings 128, vocabulary 30000) with *random* weights: no network here
  to fetch the real ones. Part sizes are those of the real model (same shapes, same
  quantisation), and so is the latency: int8 matrix products cost the same whatever the
  weight values. The bundle is ``embeddings.tflite`` + one ``group_1.tflite`` (the shared
  layer, called 12 times) + twelve small ``exit_{i}.tflite`` heads.
- **MiniLM-L6** (all-MiniLM-L6-v2's shape from its ``config.json``, random weights too, so
  the two are measured alike): ``embeddings.tflite`` + six ``layer_{i}.tflite`` (layer and
  exit head together).

Each part is opened with the edge runtime (``EdgeModel.load``: the same interpreter and
thread settings as a device) and called at batch 1 on random token ids at every sequence
length asked for (default 128 and 384); the parts of both bundles take turns, one call each per
round, so that other work on a shared machine slows both models alike (the load average before
and after is recorded); medians are reported. Per layer = one call of the layer part (ALBERT:
the shared group part plus that layer's exit head); all layers = embeddings + every layer,
what a question that never exits costs on the device.

Run: ``python -m elma_utils.bench.albert_cost [--out FILE] [--seq 128 384] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.atomic_files import write_json_atomic
from elma_utils.report import provenance

SEQ_LENS = (128, 384)
COMMAND = "python -m elma_utils.bench.albert_cost"


def _albert_base_model():
    import keras

    from elma_utils.model.albert_weights import build_albert_backbone
    from elma_utils.model.backbones import ALBERT_BASE
    from elma_utils.model.multi_exit import MultiExitQAModel
    from elma_utils.model.qa_model import SpanQAModel

    keras.utils.set_random_seed(0)
    span = SpanQAModel(build_albert_backbone(dropout=0.0, **ALBERT_BASE))
    span.build_for()
    return MultiExitQAModel.from_span_model(span), dict(ALBERT_BASE)


def _minilm_model():
    import keras

    from elma_utils.model.backbones import bert_kwargs_from_hf_config, build_bert_backbone
    from elma_utils.model.minilm import minilm_model_dir
    from elma_utils.model.multi_exit import MultiExitQAModel
    from elma_utils.model.qa_model import SpanQAModel

    keras.utils.set_random_seed(0)
    kwargs = bert_kwargs_from_hf_config(json.loads((minilm_model_dir() / "config.json").read_text()))
    span = SpanQAModel(build_bert_backbone(dropout=0.0, **kwargs))
    span.build_for()
    return MultiExitQAModel.from_span_model(span), kwargs


def write_int8_bundle(model, tokenizer, out_dir: Path, seq_len: int, version: str) -> Path:
    """The model as an int8 edge bundle with open sequence length (no early exit settings)."""
    from elma_utils.export.bundle import write_bundle

    return write_bundle(
        model,
        tokenizer,
        out_dir,
        seq_len=seq_len,
        precision="int8",
        thresholds={"policy": "never"},
        model_version=version,
        doc_stride=min(128, seq_len // 2),
        max_query_len=min(64, seq_len // 4),
        overwrite=True,
    )


def _inputs(name: str, inputs: list[str], seq: int, hidden: int, vocab: int, rng) -> dict[str, np.ndarray]:
    values = {
        "token_ids": rng.integers(5, vocab, size=(1, seq)).astype("int32"),
        "segment_ids": (np.arange(seq) >= seq // 4).astype("int32")[None],
        "padding_mask": np.ones((1, seq), "int32"),
        "hidden": rng.standard_normal((1, seq, hidden)).astype("float32"),
    }
    missing = [k for k in inputs if k not in values]
    if missing:
        raise ValueError(f"{name}: unknown inputs {missing}")
    return {k: values[k] for k in inputs}


def time_parts(bundles: dict[str, Path], seq_lens, repeats: int, warmup: int) -> dict[str, dict]:
    """Median ms per call of every part of every bundle at each sequence length (batch 1):
    {bundle name: {seq: {part: ms}}}. All parts of all bundles take turns, one call each per
    round, so that other work on the machine slows every part alike."""
    from elma_utils.edge.runtime import EdgeModel

    edges = {name: EdgeModel.load(path) for name, path in bundles.items()}
    rng = np.random.default_rng(0)
    out: dict[str, dict] = {name: {} for name in edges}
    for seq in seq_lens:
        calls = []  # (bundle name, part name, part, inputs)
        for name, edge in edges.items():
            specs, hidden = edge.manifest["parts"], int(edge.manifest["hidden"])
            vocab = int(edge.tokenizer.vocab_size)
            for part_name, part in edge.parts.items():
                feed = _inputs(part_name, specs[part_name]["inputs"], seq, hidden, vocab, rng)
                calls.append((name, part_name, part, feed))
        samples: dict[tuple[str, str], list[float]] = {(c[0], c[1]): [] for c in calls}
        for rep in range(warmup + repeats):
            for name, part_name, part, feed in calls:
                t0 = time.perf_counter()
                part(**feed)
                if rep >= warmup:
                    samples[name, part_name].append((time.perf_counter() - t0) * 1e3)
        for (name, part_name), values in samples.items():
            out[name].setdefault(str(seq), {})[part_name] = {
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
            }
    return out


def summarise(parts_ms: dict[str, dict[str, dict]], schedule: list[dict], sizes: dict[str, int]) -> dict:
    """Per sequence length: embeddings, per-layer (layer part + its head) and all-layer totals,
    from the median call of each part and (``best``) from its fastest call: the best is what
    the parts cost when nothing else wants the cores."""
    per_seq = {}
    for seq, parts in parts_ms.items():
        row: dict[str, Any] = {}
        for stat, prefix in (("median", ""), ("min", "best_")):
            ms = {name: v[stat] for name, v in parts.items()}
            layers = [ms[s["layer"]] + (ms[s["head"]] if s.get("head") else 0.0) for s in schedule]
            row[f"{prefix}embeddings_ms"] = ms["embeddings.tflite"]
            row[f"{prefix}layer_ms_median"] = round(statistics.median(layers), 3)
            row[f"{prefix}layer_ms"] = [round(x, 3) for x in layers]
            row[f"{prefix}all_layers_ms"] = round(ms["embeddings.tflite"] + sum(layers), 3)
        row["parts_ms"] = parts
        per_seq[seq] = row
    model_files = {k: v for k, v in sizes.items() if k.endswith(".tflite")}
    return {
        "parts_bytes": model_files,
        "model_bytes": sum(model_files.values()),
        "bundle_bytes": sum(sizes.values()),
        "per_seq_len": per_seq,
    }


def export(model, kwargs: dict, tokenizer, work: Path, name: str, seq_len: int) -> tuple[Path, dict]:
    """Write the int8 bundle; (its path, what is known of it before timing)."""
    t0 = time.perf_counter()
    bundle = write_int8_bundle(model, tokenizer, work / name, seq_len, f"bench-{name}-random")
    calls: dict[str, int] = {}
    manifest = json.loads((bundle / "manifest.json").read_text())
    for step in manifest["layers"]:
        for f in (step["layer"], step.get("head")):
            if f:
                calls[f] = calls.get(f, 0) + 1
    return bundle, {
        "shape": kwargs,
        "parameters": int(model.backbone.count_params()),
        "layer_schedule_calls": calls,  # how many times a question through every layer calls each part
        "export_seconds": round(time.perf_counter() - t0, 1),
    }


def run(
    out: Path, seq_lens=SEQ_LENS, repeats: int = 30, warmup: int = 3, argv: list[str] | None = None
) -> dict:
    from elma_utils.bench.environment import machine_facts
    from elma_utils.model.tokenizers import QATokenizer

    result: dict[str, Any] = {"seq_lens": list(seq_lens), "repeats": repeats, "warmup": warmup}
    models = {
        "albert_base_int8": (_albert_base_model, QATokenizer.albert),
        "minilm_l6_int8": (_minilm_model, QATokenizer.minilm),
    }
    with tempfile.TemporaryDirectory(prefix="elma-albert-cost-") as tmp:
        bundles = {}
        for name, (build, tokenizer) in models.items():
            model, kwargs = build()
            bundles[name], result[name] = export(model, kwargs, tokenizer(), Path(tmp), name, max(seq_lens))
            del model
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]  # other work on the cores
        timings = time_parts(bundles, seq_lens, repeats, warmup)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        for name, path in bundles.items():
            manifest = json.loads((path / "manifest.json").read_text())
            sizes = {k: int(v["bytes"]) for k, v in manifest["files"].items()}
            result[name].update(summarise(timings[name], manifest["layers"], sizes))
    a, m = result["albert_base_int8"]["per_seq_len"], result["minilm_l6_int8"]["per_seq_len"]
    keys = ("embeddings_ms", "layer_ms_median", "all_layers_ms", "best_layer_ms_median", "best_all_layers_ms")
    result["ratio_albert_to_minilm"] = {seq: {k: round(a[seq][k] / m[seq][k], 2) for k in keys} for seq in a}
    result["findings"] = findings(result)
    result["machine"] = machine_facts()
    args = sys.argv[1:] if argv is None else argv
    result[provenance.KEY] = {**provenance.provenance(), "command": shlex.join([*COMMAND.split(), *args])}
    write_json_atomic(out, result)
    return result


def findings(result: dict) -> list[str]:
    """The sentences the docs quote, from the numbers."""
    a, m = result["albert_base_int8"], result["minilm_l6_int8"]
    lines = [
        f"int8 bundle model files: ALBERT-base {a['model_bytes'] / 1e6:.1f} MB "
        f"({a['parameters'] / 1e6:.1f} M parameters, one shared layer) vs MiniLM-L6 "
        f"{m['model_bytes'] / 1e6:.1f} MB ({m['parameters'] / 1e6:.1f} M parameters)"
    ]
    for seq in a["per_seq_len"]:
        sa, sm = a["per_seq_len"][seq], m["per_seq_len"][seq]
        lines.append(
            f"seq {seq}, batch 1, median (fastest) call: ALBERT-base {sa['layer_ms_median']:.1f} "
            f"({sa['best_layer_ms_median']:.1f}) ms per layer, {sa['all_layers_ms']:.0f} "
            f"({sa['best_all_layers_ms']:.0f}) ms for all {len(sa['layer_ms'])} layers; MiniLM-L6 "
            f"{sm['layer_ms_median']:.1f} ({sm['best_layer_ms_median']:.1f}) ms per layer, "
            f"{sm['all_layers_ms']:.0f} ({sm['best_all_layers_ms']:.0f}) ms for all {len(sm['layer_ms'])} "
            f"(ALBERT {sa['all_layers_ms'] / sm['all_layers_ms']:.1f}x)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    from elma_utils.config import PROJECT_ROOT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "reports" / "metrics" / "bench_albert_cost.json"
    )
    p.add_argument("--seq", type=int, nargs="+", default=list(SEQ_LENS), help="sequence lengths to time")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per part and length")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    if min(args.seq) < 8 or max(args.seq) > 512:
        p.error("--seq lengths must be in 8..512")
    result = run(args.out, tuple(args.seq), args.repeats, args.warmup, argv)
    print("\n".join(result["findings"]))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
