"""The hallucination guard: signs of a made-up transcript, on text and on real audio, and an
LM that cannot pull an audio-less hypothesis toward a question."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from speech_helpers import QUESTIONS, spoken

from elma_utils.speech.hallucination import (
    assess,
    compression_ratio,
    echoes_context,
    repeated_ngram,
)
from elma_utils.speech.nbest import Hypothesis, NBest, rescore
from elma_utils.speech.question_lm import QuestionLM

CONTEXT = (
    "France is a country in Western Europe. Paris is the capital and most populous city of France, "
    "with more than two million residents. The Seine flows through the city."
)


def test_a_plain_question_is_reliable():
    v = assess("What is the capital of France?", speech_seconds=2.0, no_speech_prob=0.01, avg_logprob=-0.2)
    assert v.reliable and v.reason is None and v.measures["words"] == 6


@pytest.mark.parametrize(
    ("text", "kwargs", "sign"),
    [
        ("please, please, please, please", {}, "repeats itself ('please' 3 times)"),
        ("what is it what is it what is it", {}, "repeats itself ('what is it' 3 times)"),
        (
            "What do you have to do with this?",
            {"no_speech_prob": 0.9, "avg_logprob": -1.4},
            "probably no speech",
        ),
        ("What is the capital of France?", {"avg_logprob": -1.3}, "unsure words"),
        ("a b c d e f g h i j k l m n o p", {}, "too many words for the audio"),
        ("France", {"speech_seconds": 4.0}, "too few words"),
        ("Paris is the capital and most populous city", {}, "repeats the context word for word"),
        ("", {}, "no words"),
    ],
)
def test_each_sign_is_named(text, kwargs, sign):
    args = {"speech_seconds": 2.0, "context": CONTEXT, **kwargs}
    verdict = assess(text, **args)
    assert not verdict.reliable
    assert any(r.startswith(sign) for r in verdict.reasons), verdict.reasons


def test_the_signs_measures():
    assert repeated_ngram(["a", "b", "a", "b", "a", "b"], 3) == "a b"
    assert repeated_ngram(["a", "b", "a", "b", "c"], 3) is None
    assert compression_ratio("la " * 40) > 2.4 > compression_ratio("What is the capital of France?")
    assert echoes_context(["the", "seine", "flows", "through", "the", "city"], CONTEXT)
    assert not echoes_context(["the", "seine", "flows", "through", "paris", "today"], CONTEXT)


def _lm() -> QuestionLM:
    return QuestionLM().fit(["What is the capital of France?", "What is the largest city?"] * 50)


def test_the_lm_cannot_choose_what_the_audio_does_not_support():
    """A beam decoded from noise: its best reads "Uh." and a far less likely hypothesis is a
    fluent question. Without the acoustic gap the LM picks the question; with it, it cannot."""
    hyps = [Hypothesis("Uh.", -3.0, 2), Hypothesis("What is the capital of France?", -14.0, 8)]
    lm = _lm()
    assert rescore(hyps, lm, lm_weight=0.5, length_bonus=1.25, max_acoustic_gap=None) == 1
    assert rescore(hyps, lm, lm_weight=0.5, length_bonus=1.25) == 0  # default gap: 2 nats
    close = [
        Hypothesis("What is the capital of Franz?", -5.0, 8),
        Hypothesis("What is the capital of France?", -6.0, 8),
    ]
    assert rescore(close, lm, lm_weight=0.5, length_bonus=1.25) == 1  # within the gap the LM still decides


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="module")
def whisper():
    pytest.importorskip("faster_whisper")
    from elma_utils.speech.recognizers import WhisperRecognizer

    return WhisperRecognizer(lm=None)


def test_no_lm_rescoring_where_the_decoder_hears_no_speech(whisper):
    hyps = [Hypothesis("Uh.", -3.0, 2), Hypothesis("What is the capital of France?", -3.5, 8)]
    whisper.lm = _lm()
    try:
        assert whisper.choose(NBest(hyps, no_speech_prob=0.1, avg_logprob=-0.5), CONTEXT) == 1
        assert whisper.choose(NBest(hyps, no_speech_prob=0.8, avg_logprob=-0.5), CONTEXT) == 0
    finally:
        whisper.lm = None


def test_guard_flags_a_repeating_transcript_from_real_audio(whisper, tmp_path):
    """espeak-ng saying "please" nine times: Whisper writes the repetition, the fallback decode
    cannot do better, so the transcript is marked unreliable with the reason."""
    _tool("espeak-ng")
    wav = tmp_path / "please.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), ", ".join(["please"] * 9)], check=True)
    from elma_utils.speech.audio import load_audio

    t = whisper.transcribe(load_audio(wav), context=CONTEXT)
    assert "please" in t.text.lower()
    assert t.details["unreliable"] and "repeats itself" in t.details["unreliable"]
    assert "fallback" in t.details and t.details["fallback"]["reasons"]


def test_a_clear_question_passes_the_guard(whisper):
    t = whisper.transcribe(spoken(QUESTIONS[0]), context=CONTEXT)
    assert "capital" in t.text.lower() and "france" in t.text.lower()
    assert t.details["unreliable"] is None and t.details["guard"]["reasons"] == []
    assert "fallback" not in t.details


@pytest.mark.parametrize("kind", ["silence", "pink"])
def test_a_clip_without_speech_gives_no_question(whisper, kind):
    from elma_utils.speech.noise import coloured_noise

    n = 3 * 16000
    y = (
        np.zeros(n, np.float32)
        if kind == "silence"
        else (0.05 * coloured_noise(kind, n, np.random.default_rng(0)))
    )
    t = whisper.transcribe(y.astype(np.float32), context=CONTEXT)
    assert t.text == "" and t.details["no_speech"] == "vad"
