"""Is this transcript what was said? Signs that Whisper made a question up.

Whisper, prompted with the paragraph and given noise or a voice it hardly understands, writes
a fluent sentence anyway ("What do you have to do with this?", "…please, please, please…").
The signs, each cheap and computed from what the decoder already returns:

- **no speech**: the decoder's own no-speech probability is high *and* its words are unsure
  (Whisper's rule: > 0.6 and average log-probability ≤ -1);
- **unsure words**: average log-probability per token below ``min_avg_logprob``;
- **repeats itself**: a transcript that compresses too well (zlib ratio above
  ``max_compression_ratio``, Whisper's 2.4) or holds a word n-gram three times;
- **length against the audio**: more words per second of speech than anyone says
  (``max_words_per_second``), or a long stretch of speech given a word or two
  (``min_words_per_second``);
- **prompt echo**: six words or more found word for word in the context (the paragraph given
  as the prompt, read back).

:func:`assess` returns a :class:`GuardVerdict` whose ``reasons`` name each sign found (empty:
nothing suggests a made-up transcript). The recogniser then decodes again without the prompt,
with temperature fallback, and when that is still doubtful the device asks the user to repeat
(``Transcript.details["unreliable"]``). The default thresholds are Whisper's own where it has
them; the length limits were checked on the benchmark's tuning part
(:mod:`elma_utils.speech.conditions`), never on the held-out part.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

WORD = re.compile(r"[\w']+")


@dataclass(frozen=True)
class GuardThresholds:
    """Where each sign starts; the defaults are Whisper's (no speech, log-probability,
    compression) and what people say per second (2-4 words; espeak-ng at 200 wpm: 3.3)."""

    no_speech_prob: float = 0.6
    min_avg_logprob: float = -1.0
    max_compression_ratio: float = 2.4
    max_words_per_second: float = 6.0
    min_words_per_second: float = 0.5
    min_speech_seconds_for_rate: float = 2.0  # below this, too few words is not a sign
    repeat_times: int = 3  # an n-gram (1-4 words) this many times in a row
    echo_words: int = 6


DEFAULT_THRESHOLDS = GuardThresholds()


@dataclass(frozen=True)
class GuardVerdict:
    """The signs found in one transcript (``reasons``; empty: reliable) and the measures."""

    reasons: tuple[str, ...]
    measures: dict

    @property
    def reliable(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str | None:
        """All reasons in one phrase, or None."""
        return "; ".join(self.reasons) if self.reasons else None


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)) in UTF-8 bytes, as Whisper computes it (0 for no text)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def repeated_ngram(words: list[str], times: int = 3, max_n: int = 4) -> str | None:
    """The first word n-gram (n ≤ `max_n`) that occurs `times` times in a row, or None."""
    for n in range(1, max_n + 1):
        for start in range(0, len(words) - n * times + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, times)):
                return " ".join(gram)
    return None


def echoes_context(words: list[str], context: str | None, min_words: int = 6) -> bool:
    """True when `words` (≥ `min_words`) appear word for word, in order, in `context`."""
    if not context or len(words) < min_words:
        return False
    return f" {' '.join(words)} " in f" {' '.join(WORD.findall(context.lower()))} "


def assess(
    text: str,
    *,
    speech_seconds: float,
    no_speech_prob: float | None = None,
    avg_logprob: float | None = None,
    context: str | None = None,
    thresholds: GuardThresholds = DEFAULT_THRESHOLDS,
) -> GuardVerdict:
    """The signs of a made-up transcript in `text`, heard from `speech_seconds` of speech (the
    VAD's speech, or the clip's length). `no_speech_prob` and `avg_logprob` are the decoder's
    (None when unknown: those signs are not checked)."""
    t = thresholds
    words = WORD.findall(text.lower())
    ratio = compression_ratio(text)
    rate = len(words) / speech_seconds if speech_seconds > 0 else float("inf")
    measures = {
        "words": len(words),
        "speech_seconds": round(float(speech_seconds), 3),
        "words_per_second": round(rate, 3) if rate != float("inf") else None,
        "compression_ratio": round(ratio, 3),
        "no_speech_prob": None if no_speech_prob is None else round(float(no_speech_prob), 4),
        "avg_logprob": None if avg_logprob is None else round(float(avg_logprob), 4),
    }
    reasons = []
    if not words:
        reasons.append("no words")
    if (
        no_speech_prob is not None
        and avg_logprob is not None
        and no_speech_prob > t.no_speech_prob
        and avg_logprob <= t.min_avg_logprob
    ):
        reasons.append(f"probably no speech (no-speech probability {no_speech_prob:.2f})")
    elif avg_logprob is not None and avg_logprob < t.min_avg_logprob:
        reasons.append(f"unsure words (average log-probability {avg_logprob:.2f})")
    repeat = repeated_ngram(words, t.repeat_times)
    if repeat is not None:
        reasons.append(f"repeats itself ({repeat!r} {t.repeat_times} times)")
    elif ratio > t.max_compression_ratio:
        reasons.append(f"repeats itself (compression ratio {ratio:.1f})")
    if words and rate > t.max_words_per_second:
        reasons.append(f"too many words for the audio ({rate:.1f} words/s)")
    if words and speech_seconds >= t.min_speech_seconds_for_rate and rate < t.min_words_per_second:
        reasons.append(f"too few words for {speech_seconds:.1f} s of speech")
    if echoes_context(words, context, t.echo_words):
        reasons.append("repeats the context word for word (the prompt echoed)")
    return GuardVerdict(tuple(reasons), measures)
