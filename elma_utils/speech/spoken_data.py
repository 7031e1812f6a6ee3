"""Spoken test questions: SQuAD questions read aloud by espeak-ng, with a manifest.

Recorded speech for SQuAD does not exist offline, so the speech benchmark speaks the dev
questions with a formant synthesiser in several voices and speeds, optionally with white
noise mixed in at a chosen SNR. Each utterance becomes a 16 kHz mono 16-bit WAV; a JSON-lines
manifest lists question id, text, voice, speed, SNR, path (relative to the manifest) and
duration. Files that already exist are kept, so a re-run only speaks what is missing, and
noise is seeded by the item itself, so a regenerated file is identical.

Synthetic voices are cleaner and more regular than people: WERs measured on them are a
lower bound for real speakers, useful to compare engines and settings, not to promise accuracy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elma_utils.speech.audio import SAMPLE_RATE, trim_silence

ESPEAK = "espeak-ng"
DEFAULT_VOICES = ("en-us", "en-gb", "en-us+f3")  # American male, British male, American female variant
DEFAULT_SPEED = 160  # words per minute (espeak-ng's own default is 175)
MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class SpokenItem:
    """One utterance of one question: what was said, how, and where the audio is."""

    qas_id: str
    text: str
    voice: str
    speed: int
    snr_db: float | None  # None: clean
    path: Path
    duration: float  # seconds

    def to_json(self, base_dir: Path) -> dict:
        record = {k: getattr(self, k) for k in ("qas_id", "text", "voice", "speed", "snr_db", "duration")}
        record["path"] = Path(os.path.relpath(self.path, base_dir)).as_posix()
        return record

    @classmethod
    def from_json(cls, record: dict, base_dir: Path) -> SpokenItem:
        snr = record.get("snr_db")
        return cls(
            qas_id=str(record["qas_id"]),
            text=str(record["text"]),
            voice=str(record["voice"]),
            speed=int(record["speed"]),
            snr_db=None if snr is None else float(snr),
            path=(base_dir / record["path"]).resolve(),
            duration=float(record["duration"]),
        )


def speak(
    text: str, voice: str = "en-us", speed: int = DEFAULT_SPEED, *, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 mono samples at `sample_rate`."""
    import librosa
    import soundfile as sf

    text = " ".join(text.split())
    if not text:
        raise ValueError("nothing to speak: the text is empty")
    command = [ESPEAK, "-v", voice, "-s", str(int(speed)), "--stdout"]
    try:  # text on stdin, so a question starting with "-" is never read as an option
        done = subprocess.run(command, input=text.encode(), capture_output=True, timeout=60)
    except FileNotFoundError as exc:
        raise RuntimeError(
            f"{ESPEAK} is not installed; install it (Debian: apt-get install espeak-ng)"
        ) from exc
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise RuntimeError(
            f"{ESPEAK} -v {voice} -s {speed} failed: {message} (list voices with `{ESPEAK} --voices=en`)"
        )
    y, sr = sf.read(io.BytesIO(done.stdout), dtype="float32")
    if sr != sample_rate:
        y = librosa.resample(y, orig_sr=sr, target_sr=sample_rate)
    return np.asarray(y, dtype=np.float32)


def add_noise(
    y: np.ndarray, snr_db: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """White Gaussian noise over the whole clip at `snr_db` below the speech power.

    Speech power is measured between the first and last non-silent frame, so the pauses espeak
    leaves around an utterance do not lower it. The result is scaled down if it would clip.
    """
    speech = trim_silence(y, sample_rate, pad=0.0)
    power = float(np.mean(np.square(speech, dtype=np.float64))) if speech.size else 0.0
    if power <= 0:
        raise ValueError("cannot set an SNR on silent audio")
    noise = rng.standard_normal(y.size) * np.sqrt(power / 10 ** (snr_db / 10))
    mixed = y.astype(np.float64) + noise
    peak = float(np.max(np.abs(mixed)))
    if peak > 0.99:
        mixed *= 0.99 / peak
    return mixed.astype(np.float32)


def write_wav(path: Path, y: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM WAV, written to a temporary name and renamed, so no half file is ever 'done'."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".wav", dir=path.parent)
    os.close(fd)
    try:
        sf.write(tmp, y, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "x"


def item_path(out_dir: Path, qas_id: str, voice: str, speed: int, snr_db: float | None) -> Path:
    noise = "clean" if snr_db is None else f"snr{snr_db:g}db"
    return Path(out_dir) / _slug(voice) / f"{_slug(qas_id)}_s{int(speed)}_{noise}.wav"


def _item_seed(qas_id: str, voice: str, speed: int, snr_db: float | None) -> int:
    return zlib.crc32(f"{qas_id}|{voice}|{speed}|{snr_db}".encode())


def synthesize_item(
    qas_id: str, text: str, out_dir: Path, voice: str, speed: int = DEFAULT_SPEED, snr_db: float | None = None
) -> SpokenItem:
    """Speak one question to its WAV file (kept as is when it already exists)."""
    import soundfile as sf

    path = item_path(out_dir, qas_id, voice, speed, snr_db)
    if not path.is_file():
        y = speak(text, voice, speed)
        if snr_db is not None:
            y = add_noise(y, snr_db, np.random.default_rng(_item_seed(qas_id, voice, speed, snr_db)))
        write_wav(path, y)
    info = sf.info(str(path))
    return SpokenItem(
        qas_id, " ".join(text.split()), voice, int(speed), snr_db, path.resolve(), float(info.duration)
    )


def pick_questions(
    examples: Iterable, n: int | None = None, *, seed: int | None = None
) -> list[tuple[str, str]]:
    """(qas_id, question) pairs from SquadExamples or pairs: the first `n`, or with `seed` a
    random sample of `n` kept in file order. Repeated ids are kept once."""
    pairs: dict[str, str] = {}
    for ex in examples:
        qas_id, text = (ex.qas_id, ex.question) if hasattr(ex, "qas_id") else ex
        pairs.setdefault(str(qas_id), str(text))
    items = list(pairs.items())
    if n is None or n >= len(items):
        return items
    if seed is None:
        return items[:n]
    chosen = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return [items[i] for i in sorted(chosen)]


def generate_spoken_questions(
    questions: Iterable,
    out_dir: str | Path,
    *,
    voices: Sequence[str] = DEFAULT_VOICES,
    speeds: Sequence[int] = (DEFAULT_SPEED,),
    snrs_db: Sequence[float | None] = (None,),
    manifest_name: str = MANIFEST_NAME,
    progress: bool = True,
) -> Path:
    """Speak every question in every voice x speed x SNR under `out_dir`; returns the manifest.

    `questions` holds SquadExamples or (qas_id, text) pairs. Existing audio files are reused;
    the manifest is rewritten to list exactly this call's items.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    pairs = pick_questions(questions)
    jobs = [(q, t, v, s, n) for q, t in pairs for v in voices for s in speeds for n in snrs_db]
    items = [
        synthesize_item(q, t, out_dir, v, s, n)
        for q, t, v, s, n in tqdm(jobs, desc="speaking questions", unit="utt", disable=not progress)
    ]
    manifest = out_dir / manifest_name
    write_manifest(items, manifest)
    return manifest


def write_manifest(items: Iterable[SpokenItem], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item.to_json(base), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_manifest(path: str | Path) -> list[SpokenItem]:
    """Items of a JSON-lines manifest; paths resolved against the manifest's directory."""
    path = Path(path)
    base = path.parent.resolve()
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(SpokenItem.from_json(json.loads(line), base))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a manifest record ({exc})") from exc
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """python -m elma_utils.speech.spoken_data --n 20 --out data/spoken/dev-v1.1"""
    from elma_utils.squad.data import load_squad

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for the WAV files and the manifest"
    )
    parser.add_argument("--n", type=int, default=20, help="number of dev questions")
    parser.add_argument("--seed", type=int, default=None, help="sample questions at random with this seed")
    parser.add_argument("--version", default="1.1", help="SQuAD version of the dev file")
    parser.add_argument("--voices", nargs="+", default=list(DEFAULT_VOICES))
    parser.add_argument("--speeds", nargs="+", type=int, default=[DEFAULT_SPEED])
    parser.add_argument("--snrs", nargs="+", default=["clean"], help="SNRs in dB, or 'clean'")
    args = parser.parse_args(argv)
    dataset = load_squad(args.version, "dev")
    questions = pick_questions(dataset.examples, args.n, seed=args.seed)
    snrs = [None if s == "clean" else float(s) for s in args.snrs]
    manifest = generate_spoken_questions(
        questions, args.out, voices=args.voices, speeds=args.speeds, snrs_db=snrs
    )
    print(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
