"""The speech gate before Whisper: Silero VAD (shipped with faster-whisper) must find the spoken
questions and nothing in tones, hum or noise, so a prompted Whisper never turns those into a
sentence of the paragraph."""

from __future__ import annotations

import numpy as np
import pytest
from speech_helpers import QUESTIONS, spoken

from elma_utils.speech.recognizers import get_recognizer
from elma_utils.speech.speech_gate import contains_speech, speech_segments
from elma_utils.speech.spoken_data import DEFAULT_VOICES, add_noise

CONTEXT = "Paris is the capital of France. The Seine flows through the city."
T = np.arange(2 * 16000) / 16000


def non_speech() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    chord = sum(np.sin(2 * np.pi * f * T) for f in (261.6, 329.6, 392.0)) / 3
    return {
        "tone 440 Hz": 0.3 * np.sin(2 * np.pi * 440 * T),
        "mains hum": 0.3 * np.sin(2 * np.pi * 50 * T) + 0.1 * np.sin(2 * np.pi * 150 * T),
        "C major chord": 0.3 * chord,
        "white noise": 0.1 * rng.standard_normal(T.size),
    }


@pytest.mark.parametrize("name", list(non_speech()))
def test_no_speech_in_tones_and_noise(name):
    assert speech_segments(non_speech()[name].astype(np.float32)) == []


@pytest.mark.parametrize("voice", DEFAULT_VOICES)
def test_spoken_questions_are_speech_clean_and_noisy(voice):
    for i, question in enumerate(QUESTIONS):
        y = spoken(question, voice)
        segments = speech_segments(y)
        assert segments, (voice, question)
        # the segments lie inside the clip and cover most of what espeak-ng said
        assert 0 <= segments[0][0] < segments[-1][1] <= y.size / 16000 + 1e-6
        assert sum(e - s for s, e in segments) > 0.5 * y.size / 16000
        assert contains_speech(add_noise(y, 10.0, np.random.default_rng(i)))


@pytest.fixture(scope="module")
def whisper():
    return get_recognizer("whisper")


def test_whisper_returns_nothing_for_a_tone_even_with_a_prompt(whisper):
    for name, y in non_speech().items():
        t = whisper.transcribe(y.astype(np.float32), context=CONTEXT)
        assert (t.text, t.details.get("no_speech")) == ("", "vad"), name
        assert t.audio_seconds == pytest.approx(2.0)


def test_whisper_still_hears_a_spoken_question(whisper):
    t = whisper.transcribe(spoken(QUESTIONS[0]), context=CONTEXT)
    assert "no_speech" not in t.details
    assert t.text.lower().rstrip("?") == QUESTIONS[0].lower().rstrip("?")
