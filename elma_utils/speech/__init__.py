"""Spoken questions: audio input, offline recognition, synthetic test speech, WER benchmark.

- :mod:`.audio`: decode and check a recording (``load_audio`` -> 16 kHz mono float32), microphone.
- :mod:`.recognizers`: ``get_recognizer("whisper" | "sphinx", ...)`` -> ``.transcribe(samples)``.
- :mod:`.spoken_data`: SQuAD questions spoken by espeak-ng, with a JSON-lines manifest.
- :mod:`.wer`: normalisation and word error rate.
- :mod:`.benchmark`: WER and real-time factor per engine and voice over a manifest.
- :mod:`.spoken_qa`: ``SpokenQA(recognizer, answerer).ask(audio, context)`` -> transcript, answer,
  where it came from (edge layer / server / full model) and per-stage timings; ``resolve_context``.
- :mod:`.qa_benchmark`: F1 of spoken vs typed questions with the same QA model, WER, RTF.
- :mod:`.conditions`, :mod:`.noise`: voices, rates, noise (white/pink/brown/babble at a set SNR)
  and rooms (sox reverb), split into a tuning and a held-out part; cached clips.
- :mod:`.hallucination`: signs of a made-up transcript (the recogniser's guard).
- :mod:`.denoise`: noise suppression (noisereduce); :mod:`.speech_gate`: Silero VAD gate, trimming.
- :mod:`.whisper_base`: Whisper base from its two PyPI parts, sha256-checked (``model="base"``).
- :mod:`.robust_benchmark`: the held-out benchmark (``reports/metrics/06_speech_benchmark.json``).

Heavy dependencies (librosa, faster-whisper, pocketsphinx) are imported on first use.
"""

from elma_utils.speech.audio import AudioError, capture_microphone, load_audio, prepare_audio
from elma_utils.speech.recognizers import (
    RecognitionError,
    Transcript,
    available_engines,
    get_recognizer,
)
from elma_utils.speech.spoken_qa import ContextError, SpokenAnswer, SpokenQA, resolve_context
from elma_utils.speech.wer import normalize_text, word_error_rate

__all__ = [
    "AudioError",
    "ContextError",
    "RecognitionError",
    "SpokenAnswer",
    "SpokenQA",
    "Transcript",
    "available_engines",
    "capture_microphone",
    "get_recognizer",
    "load_audio",
    "normalize_text",
    "prepare_audio",
    "resolve_context",
    "word_error_rate",
]
