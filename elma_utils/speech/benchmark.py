"""Speech benchmark: WER and real-time factor of each engine over a spoken-question manifest.

Each utterance is loaded like a user's recording (:func:`~elma_utils.speech.audio.load_audio`:
mono, 16 kHz, silence trimmed) and transcribed; the row keeps the transcript, the recognition
time and the length of the audio the engine got. The summary gives corpus WER (after
:func:`~elma_utils.speech.wer.normalize_text`), the share of questions recognised exactly,
and the real-time factor (recognition seconds / audio seconds, model loading excluded and
reported apart) overall and per voice, speed and SNR. Timings depend on the machine and its
load; they are reported, never asserted.

Engines by name: ``whisper``, ``sphinx`` (free dictation) and ``sphinx-grammar`` (sphinx
constrained to the manifest's own questions, i.e. a closed question set).

With `contexts` (question id -> the paragraph it asks about) each utterance is transcribed
with its context (Whisper's initial prompt; see :func:`~elma_utils.speech.recognizers.context_prompt`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from elma_utils.speech.audio import AudioError, load_audio
from elma_utils.speech.recognizers import Recognizer, get_recognizer
from elma_utils.speech.spoken_data import SpokenItem, read_manifest
from elma_utils.speech.wer import WerCounts, normalize_text, wer_counts

BENCHMARK_ENGINES = ("whisper", "sphinx", "sphinx-grammar")


def _items(manifest: str | Path | Sequence[SpokenItem], limit: int | None) -> list[SpokenItem]:
    items = read_manifest(manifest) if isinstance(manifest, str | Path) else list(manifest)
    return items[:limit] if limit is not None else items


def make_engine(name: str, items: Sequence[SpokenItem], **options) -> Recognizer:
    """A recogniser for a benchmark engine name; ``sphinx-grammar`` gets the items' questions."""
    if name == "sphinx-grammar":
        return get_recognizer("sphinx", candidates=list(dict.fromkeys(i.text for i in items)), **options)
    return get_recognizer(name, **options)


def transcribe_manifest(
    manifest: str | Path | Sequence[SpokenItem],
    engine: str | Recognizer = "whisper",
    *,
    limit: int | None = None,
    progress: bool = True,
    contexts: Mapping[str, str] | None = None,
    **engine_options,
) -> list[dict]:
    """One row per utterance: ids and conditions, reference, transcript, seconds, audio seconds,
    and its word errors. An unusable audio file gives a row with `error` set, not an exception.
    `contexts` maps question ids to the text each question is about (given to the recogniser);
    an id missing from it is an error, so a run never mixes prompted and unprompted rows."""
    from tqdm.auto import tqdm

    items = _items(manifest, limit)
    recognizer = make_engine(engine, items, **engine_options) if isinstance(engine, str) else engine
    engine_name = engine if isinstance(engine, str) else recognizer.name
    rows = []
    for item in tqdm(items, desc=f"transcribing ({engine_name})", unit="utt", disable=not progress):
        row = {
            "qas_id": item.qas_id,
            "voice": item.voice,
            "speed": item.speed,
            "snr_db": item.snr_db,
            "engine": engine_name,
            "reference": item.text,
            "file_seconds": item.duration,
            "context": contexts is not None,
        }
        if contexts is not None and item.qas_id not in contexts:
            raise KeyError(f"no context for question {item.qas_id!r}")
        try:
            audio = load_audio(item.path)
        except AudioError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        context = contexts[item.qas_id] if contexts is not None else None
        transcript = recognizer.transcribe(audio, context=context)
        counts = wer_counts(item.text, transcript.text)
        rows.append(
            {
                **row,
                "transcript": transcript.text,
                "seconds": transcript.seconds,
                "audio_seconds": transcript.audio_seconds,
                "substitutions": counts.substitutions,
                "deletions": counts.deletions,
                "insertions": counts.insertions,
                "hits": counts.hits,
                "wer": counts.wer,
                "exact": normalize_text(item.text) == normalize_text(transcript.text),
                "error": None,
            }
        )
    return rows


def _stats(rows: list[dict]) -> dict:
    done = [r for r in rows if r.get("error") is None]
    out: dict = {"items": len(rows), "failed": len(rows) - len(done)}
    if not done:
        return out
    counts = sum(
        (WerCounts(r["substitutions"], r["deletions"], r["insertions"], r["hits"]) for r in done),
        WerCounts(0, 0, 0, 0),
    )
    seconds = np.array([r["seconds"] for r in done])
    audio = float(sum(r["audio_seconds"] for r in done))
    out.update(
        {
            "wer": round(counts.wer, 4),
            "errors": counts.errors,
            "reference_words": counts.reference_words,
            "exact_share": round(float(np.mean([r["exact"] for r in done])), 4),
            "rtf": round(float(seconds.sum()) / audio, 4) if audio else None,
            "audio_seconds": round(audio, 2),
            "mean_seconds": round(float(seconds.mean()), 4),
            "p50_seconds": round(float(np.percentile(seconds, 50)), 4),
            "p95_seconds": round(float(np.percentile(seconds, 95)), 4),
        }
    )
    return out


def summarize(rows: list[dict]) -> dict:
    """Overall numbers plus the same per voice, and per speed / SNR when those vary."""
    summary = {"engine": rows[0]["engine"] if rows else None, **_stats(rows)}
    for key, label in (("voice", "by_voice"), ("speed", "by_speed"), ("snr_db", "by_snr_db")):
        values = list(dict.fromkeys(r[key] for r in rows))
        if key == "voice" or len(values) > 1:
            summary[label] = {str(v): _stats([r for r in rows if r[key] == v]) for v in values}
    return summary


def run_benchmark(
    manifest: str | Path | Sequence[SpokenItem],
    engines: Sequence[str] = ("whisper", "sphinx"),
    *,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Per engine: model load seconds, summary and rows."""
    items = _items(manifest, limit)
    results = {}
    for name in engines:
        start = time.perf_counter()
        recognizer = make_engine(name, items)
        load_seconds = time.perf_counter() - start
        rows = transcribe_manifest(items, recognizer, progress=progress)
        for row in rows:
            row["engine"] = name
        results[name] = {"load_seconds": round(load_seconds, 3), "summary": summarize(rows), "rows": rows}
    return results


def format_summary(results: dict[str, dict]) -> str:
    """A plain-text table: one line per engine and per engine x voice."""
    header = f"{'engine':<16}{'voice':<12}{'items':>6}{'WER':>8}{'exact':>8}{'RTF':>8}{'p50 s':>8}"
    lines = [header, "-" * len(header)]

    def line(engine: str, voice: str, s: dict) -> str:
        if "wer" not in s:
            return f"{engine:<16}{voice:<12}{s['items']:>6}{'failed':>8}"
        return (
            f"{engine:<16}{voice:<12}{s['items']:>6}{s['wer']:>8.3f}{s['exact_share']:>8.2f}"
            f"{s['rtf']:>8.3f}{s['p50_seconds']:>8.3f}"
        )

    for engine, result in results.items():
        summary = result["summary"]
        lines.append(line(engine, "all", summary))
        for voice, stats in summary.get("by_voice", {}).items():
            lines.append(line("", voice, stats))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m elma_utils.speech.benchmark MANIFEST --engines whisper sphinx --out speech.json"""
    parser = argparse.ArgumentParser(description="WER and real-time factor of speech engines over a manifest")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--engines", nargs="+", default=["whisper", "sphinx"], choices=BENCHMARK_ENGINES)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write summaries and rows as JSON")
    args = parser.parse_args(argv)
    results = run_benchmark(args.manifest, args.engines, limit=args.limit)
    print(format_summary(results))
    for name, result in results.items():
        print(f"{name}: model load {result['load_seconds']:.2f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
