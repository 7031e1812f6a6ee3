"""Real speech for the speech tests: questions spoken by espeak-ng, cached for the session."""

from __future__ import annotations

import functools

import numpy as np

QUESTIONS = (
    "What is the capital of France?",
    "In what year did the Normans conquer England?",
    "How many people lived in Warsaw in 1990?",
    "Who was Beyoncé's first husband?",
    "Which river flows through the city of London?",
)


@functools.lru_cache(maxsize=64)
def _spoken(text: str, voice: str, speed: int, sample_rate: int) -> np.ndarray:
    from elma_utils.speech.spoken_data import speak

    return speak(text, voice, speed, sample_rate=sample_rate)


def spoken(text: str, voice: str = "en-us", speed: int = 160, sample_rate: int = 16000) -> np.ndarray:
    """espeak-ng's reading of `text` (a fresh copy, so tests may modify it)."""
    return _spoken(text, voice, speed, sample_rate).copy()
