"""Spoken questions: audio input, offline recognition, synthetic test speech, WER benchmark.

- :mod:`.audio`: decode and check a recording (``load_audio`` -> 16 kHz mono float32), microphone.
- :mod:`.recognizers`: ``get_recognizer("whisper" | "sphinx", ...)`` -> ``.transcribe(samples)``.
- :mod:`.spoken_data`: SQuAD questions spoken by espeak-ng, with a JSON-lines manifest.
- :mod:`.wer`: normalisation and word error rate.
- :mod:`.benchmark`: WER and real-time factor per engine and voice over a manifest.

Heavy dependencies (librosa, faster-whisper, pocketsphinx) are imported on first use.
"""

from elma_utils.speech.audio import AudioError, capture_microphone, load_audio, prepare_audio
from elma_utils.speech.recognizers import (
    RecognitionError,
    Transcript,
    available_engines,
    get_recognizer,
)
from elma_utils.speech.wer import normalize_text, word_error_rate

__all__ = [
    "AudioError",
    "RecognitionError",
    "Transcript",
    "available_engines",
    "capture_microphone",
    "get_recognizer",
    "load_audio",
    "normalize_text",
    "prepare_audio",
    "word_error_rate",
]
