"""Listening conditions for the speech benchmark, split into a tuning part and a held-out part.

A condition is how a question reaches the microphone: an espeak-ng voice (accent and
``+f``/``+m`` variant), a speaking rate, a noise (none, white, pink, brown or babble) at an
SNR, and optionally a room (sox reverb). Two disjoint :class:`ConditionSet` s:

- ``TUNING``: the voices, noise kinds and room on which every choice of the front end is made
  (prompt, LM weight, guard thresholds, VAD trimming, noise suppression on or off);
- ``HELDOUT``: other voices, other noise kinds (pink and babble), another room: only measured.

Questions are split too, by SQuAD article (:func:`split_questions`), so no paragraph is asked
about in both parts. Each question gets one condition (:func:`assign_conditions`): the split's
voice × SNR-level cells are filled in turn, so every cell has about the same number of clips,
and the rate, noise kind and room are drawn at random (seeded). Clips are cached under
``<cache>/speech/clips/`` keyed by the text and the condition (:func:`clip_path`); babble is
made of other questions of the *same* part, spoken clean by its other voices.

Noise-only clips (no speech at all, :func:`noise_only_clip`) test that the front end does not
hear a question in a fan.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from elma_utils.speech.audio import SAMPLE_RATE
from elma_utils.speech.noise import babble, coloured_noise, mix_at_snr, reverberate

CLIP_FORMAT = 1  # bump to re-make every cached clip
LEAD_SECONDS = 0.3  # silence before and after the words: a recording starts before the speech
BABBLE_TALKERS = 4
RATES = (130, 160, 200)  # words per minute: slow, espeak-ng's usual, fast
SNRS_DB = (20.0, 10.0, 5.0)
ROOMS = {  # sox reverb: reverberance %, room scale %, HF damping %
    "small-room": {"reverberance": 40, "room_scale": 50, "hf_damping": 50},
    "hall": {"reverberance": 70, "room_scale": 100, "hf_damping": 30},
}


@dataclass(frozen=True)
class Condition:
    """How one clip is spoken: voice, rate (wpm), noise kind or "clean", SNR (dB; None when
    clean) and room (None: dry)."""

    voice: str
    rate: int = 160
    noise: str = "clean"
    snr_db: float | None = None
    room: str | None = None

    def __post_init__(self) -> None:
        if (self.noise == "clean") != (self.snr_db is None):
            raise ValueError(
                f"noise {self.noise!r} with snr_db {self.snr_db}: clean has no SNR, noise needs one"
            )
        if self.room is not None and self.room not in ROOMS:
            raise ValueError(f"unknown room {self.room!r}; choose one of {sorted(ROOMS)}")

    @property
    def snr_level(self) -> str:
        """ "clean" or the SNR as text ("20", "10", "5")."""
        return "clean" if self.snr_db is None else f"{self.snr_db:g}"

    @property
    def key(self) -> str:
        return f"{self.voice}|{self.rate}|{self.noise}|{self.snr_level}|{self.room or 'dry'}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConditionSet:
    """The voices, rates, noise kinds, SNRs and rooms one part of the benchmark draws from."""

    name: str
    voices: tuple[str, ...]
    noises: tuple[str, ...]
    room: str
    rates: tuple[int, ...] = RATES
    snrs_db: tuple[float, ...] = SNRS_DB
    room_share: float = 0.25

    @property
    def snr_levels(self) -> tuple[str, ...]:
        return ("clean", *(f"{s:g}" for s in self.snrs_db))


TUNING = ConditionSet(
    "tuning",
    voices=("en-us", "en-gb", "en-us+f3", "en-gb-scotland+m3"),
    noises=("white", "brown"),
    room="small-room",
)
HELDOUT = ConditionSet(
    "heldout",
    voices=("en-029", "en-gb-x-rp+f2", "en-us-nyc+m2", "en-gb-x-gbclan", "en-gb-x-gbcwmd+f4", "en-us+m7"),
    noises=("pink", "babble"),
    room="hall",
)
SPLITS = {s.name: s for s in (TUNING, HELDOUT)}


def _article_part(title: str, tuning_share: float) -> str:
    return "tuning" if (zlib.crc32(title.encode()) % 1000) / 1000 < tuning_share else "heldout"


def split_questions(dataset_raw, tuning_share: float = 0.35) -> dict[str, list[tuple[str, str]]]:
    """{"tuning": [(qas_id, question)], "heldout": [...]}: each SQuAD article (by a hash of its
    title) goes wholly to one part, so the parts share no paragraph."""
    raw = getattr(dataset_raw, "raw", dataset_raw)
    parts: dict[str, list[tuple[str, str]]] = {"tuning": [], "heldout": []}
    for article in raw["data"]:
        part = _article_part(str(article.get("title", "")), tuning_share)
        for paragraph in article["paragraphs"]:
            parts[part].extend((qa["id"], " ".join(qa["question"].split())) for qa in paragraph["qas"])
    return parts


def sample(pairs: Sequence[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """`n` pairs drawn at random (seeded), in their original order; all when fewer."""
    if n >= len(pairs):
        return list(pairs)
    chosen = np.random.default_rng(seed).choice(len(pairs), size=n, replace=False)
    return [pairs[i] for i in sorted(chosen)]


def assign_conditions(
    questions: Sequence[tuple[str, str]], conditions: ConditionSet, seed: int = 0
) -> list[tuple[str, str, Condition]]:
    """One condition per question: voice × SNR-level cells in turn (a shuffled order of the
    questions), rate and noise kind at random, a room for `room_share` of the clips."""
    rng = np.random.default_rng(seed)
    cells = [(v, s) for v in conditions.voices for s in conditions.snr_levels]
    order = rng.permutation(len(questions))
    out: list[tuple[str, str, Condition] | None] = [None] * len(questions)
    for turn, index in enumerate(order):
        voice, level = cells[turn % len(cells)]
        rate = int(rng.choice(conditions.rates))
        noise = "clean" if level == "clean" else str(rng.choice(conditions.noises))
        room = conditions.room if rng.random() < conditions.room_share else None
        snr = None if level == "clean" else float(level)
        qas_id, text = questions[index]
        out[index] = (qas_id, text, Condition(voice, rate, noise, snr, room))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- making the clips


def _digest(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:20]


def clip_path(cache: Path, text: str, condition: Condition) -> Path:
    return Path(cache) / "clips" / f"{_digest(str(CLIP_FORMAT), text, condition.key)}.wav"


def _seed(text: str, condition: Condition) -> int:
    return zlib.crc32(f"{text}|{condition.key}".encode())


def _read(path: Path) -> np.ndarray:
    import soundfile as sf

    y, sr = sf.read(str(path), dtype="float32")
    if sr != SAMPLE_RATE:
        raise ValueError(f"{path}: {sr} Hz, expected {SAMPLE_RATE}")
    return y


def spoken_clean(text: str, voice: str, rate: int, cache: Path) -> np.ndarray:
    """`text` spoken by espeak-ng in `voice` at `rate`, with silence around it (cached)."""
    from elma_utils.speech.spoken_data import speak, write_wav

    path = clip_path(cache, text, Condition(voice, rate))
    if path.is_file():
        return _read(path)
    pad = np.zeros(int(LEAD_SECONDS * SAMPLE_RATE), dtype=np.float32)
    y = np.concatenate([pad, speak(text, voice, rate), pad])
    write_wav(path, y)
    return _read(path)  # as written (16-bit), so a cached and a fresh clip are the same samples


def make_clip(
    text: str,
    condition: Condition,
    cache: Path,
    *,
    babble_texts: Sequence[str] = (),
    babble_voices: Sequence[str] = (),
) -> Path:
    """The WAV file of `text` in `condition` (made once, then cached); babble needs other
    questions' texts and voices to speak them in."""
    from elma_utils.speech.spoken_data import write_wav

    path = clip_path(cache, text, condition)
    if path.is_file():
        return path
    y = spoken_clean(text, condition.voice, condition.rate, cache)
    if condition.room is not None:
        y = reverberate(y, **ROOMS[condition.room])
    if condition.noise != "clean":
        rng = np.random.default_rng(_seed(text, condition))
        if condition.noise == "babble":
            if not babble_texts or not babble_voices:
                raise ValueError("babble needs other questions (babble_texts) and voices (babble_voices)")
            talkers = [
                spoken_clean(t, babble_voices[i % len(babble_voices)], 160, cache)
                for i, t in enumerate(babble_texts[:BABBLE_TALKERS])
            ]
            noise = babble(talkers, y.size, rng)
        else:
            noise = coloured_noise(condition.noise, y.size, rng)
        y = mix_at_snr(y, noise, condition.snr_db)
    write_wav(path, y)
    return path


def noise_only_clip(kind: str, seconds: float, cache: Path, seed: int = 0, level_dbfs: float = -25.0) -> Path:
    """A clip of noise with no speech (white, pink or brown) at `level_dbfs` RMS, cached."""
    from elma_utils.speech.spoken_data import write_wav

    path = Path(cache) / "clips" / f"noise-{_digest(str(CLIP_FORMAT), kind, f'{seconds:g}', str(seed))}.wav"
    if not path.is_file():
        y = coloured_noise(kind, int(seconds * SAMPLE_RATE), np.random.default_rng(seed))
        y = y * 10 ** (level_dbfs / 20)
        write_wav(path, np.clip(y, -0.99, 0.99).astype(np.float32))
    return path
