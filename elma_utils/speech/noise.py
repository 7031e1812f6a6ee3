"""Noise and rooms for test speech: coloured noise, babble, mixing at a set SNR, sox reverb.

The speech benchmark (:mod:`elma_utils.speech.conditions`) puts espeak-ng questions into the
conditions a device meets: a fan or a street (white, pink, brown noise), people talking
(babble: other spoken questions summed), and a room (sox's ``reverb`` effect).

SNR here is the speech's power over the noise's power, both measured over the *speech* span
(first to last non-silent frame of the clean clip), so the pauses around an utterance do not
flatter it. :func:`measured_snr_db` recovers the SNR of a mix from the clean clip alone (the
least-squares gain of the clean clip in the mix, the rest is noise), independent of how
:func:`mix_at_snr` made it: the tests check the one with the other.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

import numpy as np

from elma_utils.speech.audio import SAMPLE_RATE, speech_bounds

NOISE_KINDS = ("white", "pink", "brown", "babble")
PEAK = 0.99  # a mix louder than this is scaled down (the SNR is unchanged)


def _speech_span(y: np.ndarray, sample_rate: int) -> slice:
    start, end = speech_bounds(y, sample_rate)
    if end <= start:
        raise ValueError("cannot set an SNR on silent audio")
    return slice(start, end)


def coloured_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise of `n` samples: white (flat), pink (power ∝ 1/f) or brown (∝ 1/f²).

    Shaped in the frequency domain from white Gaussian noise; the DC bin is zeroed."""
    if n <= 0:
        raise ValueError(f"noise length must be positive, got {n}")
    white = rng.standard_normal(n)
    if kind == "white":
        noise = white
    elif kind in ("pink", "brown"):
        spectrum = np.fft.rfft(white)
        f = np.fft.rfftfreq(n)
        f[0] = np.inf  # no DC
        spectrum *= f ** (-0.5 if kind == "pink" else -1.0)
        noise = np.fft.irfft(spectrum, n)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of white, pink, brown (babble: babble())")
    return (noise / np.sqrt(np.mean(noise**2))).astype(np.float64)


def babble(voices: Sequence[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power babble of `n` samples: every clip in `voices` (other people's speech) looped
    from a random offset to length `n`, each at the same power, summed."""
    if not voices:
        raise ValueError("babble needs at least one other spoken clip")
    total = np.zeros(n)
    for clip in voices:
        clip = np.asarray(clip, dtype=np.float64)
        if clip.size == 0 or not np.any(clip):
            continue
        reps = int(np.ceil((n + clip.size) / clip.size))
        looped = np.tile(clip, reps)
        start = int(rng.integers(0, clip.size))
        part = looped[start : start + n]
        total += part / np.sqrt(np.mean(part**2) + 1e-20)
    power = np.mean(total**2)
    if power <= 0:
        raise ValueError("the babble clips are silent")
    return total / np.sqrt(power)


def mix_at_snr(
    speech: np.ndarray, noise: np.ndarray, snr_db: float, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """`speech` plus `noise` (same length) scaled so that speech power / noise power over the
    speech span is `snr_db`; the sum is scaled down when it would clip."""
    y = np.asarray(speech, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    if noise.shape != y.shape:
        raise ValueError(f"speech and noise differ in shape: {y.shape} vs {noise.shape}")
    span = _speech_span(y.astype(np.float32), sample_rate)
    p_speech = float(np.mean(y[span] ** 2))
    p_noise = float(np.mean(noise[span] ** 2))
    if p_noise <= 0:
        raise ValueError("the noise is silent over the speech")
    mixed = y + noise * np.sqrt(p_speech / (p_noise * 10 ** (snr_db / 10)))
    peak = float(np.max(np.abs(mixed)))
    if peak > PEAK:
        mixed *= PEAK / peak
    return mixed.astype(np.float32)


def measured_snr_db(clean: np.ndarray, mixed: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """The SNR (dB) of `mixed` over `clean`'s speech span: `mixed` = g·clean + noise, with g the
    least-squares gain (the mix may have been scaled against clipping)."""
    clean = np.asarray(clean, dtype=np.float64)
    mixed = np.asarray(mixed, dtype=np.float64)
    gain = float(np.dot(mixed, clean) / np.dot(clean, clean))
    noise = mixed - gain * clean
    span = _speech_span(clean.astype(np.float32), sample_rate)
    return float(10 * np.log10(np.mean((gain * clean[span]) ** 2) / np.mean(noise[span] ** 2)))


def reverberate(
    y: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    *,
    reverberance: int = 50,
    room_scale: int = 100,
    hf_damping: int = 50,
    pre_delay_ms: int = 0,
) -> np.ndarray:
    """`y` through sox's ``reverb`` (a Freeverb room), wet and dry mixed as sox does; the output
    is as long as the input plus the reverb tail (0.5 s), at the input's level."""
    sox = shutil.which("sox")
    if sox is None:
        raise RuntimeError("sox is not installed; install it (Debian: apt-get install sox)")
    pcm = np.clip(np.round(np.asarray(y, dtype=np.float64) * 32767), -32768, 32767).astype("<i2")
    raw = ["-t", "raw", "-r", str(sample_rate), "-e", "signed", "-b", "16", "-c", "1"]
    effect = ["pad", "0", "0.5", "reverb", str(reverberance), str(hf_damping), str(room_scale), "100",
              str(pre_delay_ms)]  # fmt: skip
    done = subprocess.run(
        [sox, *raw, "-", *raw, "-", *effect], input=pcm.tobytes(), capture_output=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"sox reverb failed: {done.stderr.decode(errors='replace').strip()}")
    out = np.frombuffer(done.stdout, dtype="<i2").astype(np.float32) / 32768.0
    level_in = float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
    level_out = float(np.sqrt(np.mean(np.square(out, dtype=np.float64))))
    if level_out > 0 and level_in > 0:
        out = out * (level_in / level_out)
    peak = float(np.max(np.abs(out)))
    return (out * (PEAK / peak) if peak > PEAK else out).astype(np.float32)
