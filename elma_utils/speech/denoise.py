"""Noise suppression before recognition: spectral gating from ``noisereduce``.

``noisereduce`` (Sainburg et al., maintained on PyPI) estimates the noise's spectrum and
attenuates time-frequency bins that do not rise above it. Stationary mode estimates one noise
spectrum for the whole clip (fans, hiss: white, pink, brown noise); non-stationary mode
follows the noise over time (babble), at several times the cost. Whether it helps Whisper is
measured, not assumed: Whisper was trained on noisy audio, and gating can remove the quiet
consonants it needs. The speech benchmark (:mod:`elma_utils.speech.robust_benchmark`) decides
on its tuning part whether the recogniser uses it (``WhisperRecognizer(denoise=...)``) and
records the cost per second of audio.
"""

from __future__ import annotations

import numpy as np

from elma_utils.speech.audio import SAMPLE_RATE

DENOISE_MODES = ("stationary", "nonstationary")


def suppress_noise(
    samples: np.ndarray, mode: str = "stationary", *, prop_decrease: float = 0.9
) -> np.ndarray:
    """16 kHz mono float32 ``samples`` with the noise attenuated (``prop_decrease``: 1.0 removes
    all of the estimated noise, less keeps some, which keeps more of the speech)."""
    if mode not in DENOISE_MODES:
        raise ValueError(f"unknown noise suppression {mode!r}; choose one of {DENOISE_MODES}")
    try:
        import noisereduce
    except ImportError as exc:
        raise RuntimeError("noise suppression needs noisereduce: pip install noisereduce") from exc
    y = np.asarray(samples, dtype=np.float32)
    if y.size < 2048:  # shorter than the STFT window: nothing to estimate a noise from
        return y
    out = noisereduce.reduce_noise(
        y=y, sr=SAMPLE_RATE, stationary=mode == "stationary", prop_decrease=prop_decrease, n_jobs=1
    )
    return np.asarray(out, dtype=np.float32)
