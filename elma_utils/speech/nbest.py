"""Whisper's n-best list, rescored with a question language model.

faster-whisper returns only the beam's best hypothesis. For one short utterance (≤ 30 s,
one Whisper window) this module runs the same decoder itself (the CTranslate2 model inside
faster-whisper's ``WhisperModel``) with ``num_hypotheses = beam_size``, and picks the
hypothesis with the highest

    ln P_whisper(tokens) + lm_weight · ln P_lm(words | paragraph) + length_bonus · tokens

(the usual shallow-fusion score on an n-best list; the length bonus offsets both models'
preference for short outputs). When the paragraph is known, the LM's word probabilities are
mixed with the paragraph's word shares (``context_weight``), as a cache LM does. Beam search costs the same as faster-whisper's own; the LM
adds well under a millisecond per hypothesis. ``lm_weight`` and ``length_bonus`` are chosen on
the tuning part of the speech benchmark (:mod:`elma_utils.speech.conditions`), never on its
held-out part.

The LM only breaks ties the audio leaves open: a hypothesis whose acoustic log-probability is
more than ``max_acoustic_gap`` nats below the beam's best is not eligible, and when the decoder
thinks the window holds no speech (no-speech probability above ``LM_MAX_NO_SPEECH``) the beam's
best is kept as it is. Without these, an LM of SQuAD questions pulls a beam decoded from noise
toward whichever hypothesis reads most like a SQuAD question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from elma_utils.speech.question_lm import QuestionLM, context_counts

# Chosen on the speech benchmark's tuning part only (96 clips: 4 voices, 3 rates, clean, white
# and brown noise at 20/10/5 dB, a small room; grid in reports/metrics/06_speech_benchmark.json,
# decisions.lm): tuning WER 16.2 % (beam's best) → 14.7 %. Earlier values (0.15, 1.25) had been
# set on clean en-us/en-gb speech.
DEFAULT_LM_WEIGHT = 0.25
DEFAULT_LENGTH_BONUS = 0.5
DEFAULT_MAX_ACOUSTIC_GAP = 2.0  # nats below the beam's best that the LM may still choose
DEFAULT_CONTEXT_WEIGHT = 0.1
WINDOW_SECONDS = 30.0
NO_SPEECH_THRESHOLD = 0.6  # faster-whisper's defaults for skipping a window that holds no speech
LOG_PROB_THRESHOLD = -1.0
LM_MAX_NO_SPEECH = 0.5  # above this no-speech probability the LM does not rescore


@dataclass(frozen=True)
class NBest:
    """The n-best list of one window and the decoder's view of it: ``no_speech_prob`` and the
    best hypothesis's average log-probability per token (Whisper's definition)."""

    hypotheses: list
    no_speech_prob: float
    avg_logprob: float
    skipped: bool = False  # faster-whisper's no-speech rule held: hypotheses is empty


@dataclass(frozen=True)
class Hypothesis:
    """One entry of the n-best list: text, total log-probability and length in tokens."""

    text: str
    logprob: float
    tokens: int


def decode_nbest(model: Any, samples: np.ndarray, prompt: str | None, beam_size: int = 5) -> list[Hypothesis]:
    """The hypotheses of :func:`decode_nbest_scored` (empty when the window holds no speech)."""
    return decode_nbest_scored(model, samples, prompt, beam_size).hypotheses


def decode_nbest_scored(model: Any, samples: np.ndarray, prompt: str | None, beam_size: int = 5) -> NBest:
    """The ``beam_size`` best hypotheses for 16 kHz mono ``samples`` (one window, ≤ 30 s).

    ``model`` is a ``faster_whisper.WhisperModel``; ``prompt`` is the initial prompt (text
    spoken before), as in ``WhisperModel.transcribe(initial_prompt=...)``. Timestamps off,
    English, the same blank and symbol suppression as faster-whisper's defaults. An empty
    list when the window holds no speech, by faster-whisper's rule (no-speech probability
    above 0.6 and average log-probability at most -1).
    """
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    if len(samples) > WINDOW_SECONDS * 16000:
        raise ValueError(f"n-best decoding takes one {WINDOW_SECONDS:.0f} s window; the audio is longer")
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    encoded = model.encode(pad_or_trim(model.feature_extractor(samples)))
    previous = tokenizer.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
    tokens = model.get_prompt(tokenizer, previous, without_timestamps=True)
    result = model.model.generate(
        encoded,
        [tokens],
        beam_size=beam_size,
        num_hypotheses=beam_size,
        return_scores=True,
        max_length=model.max_length,
        suppress_blank=True,
        suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        return_no_speech_prob=True,
    )[0]
    best = result.sequences_ids[0] if result.sequences_ids else []
    avg_logprob = float(result.scores[0]) * len(best) / (len(best) + 1) if best else float("-inf")
    no_speech = float(result.no_speech_prob)
    if no_speech > NO_SPEECH_THRESHOLD and avg_logprob <= LOG_PROB_THRESHOLD:
        # faster-whisper's own rule: probably not speech, and no confident text either
        return NBest([], no_speech, avg_logprob, skipped=True)
    hyps = []
    for ids, score in zip(result.sequences_ids, result.scores, strict=True):
        # CTranslate2's score is the log-probability divided by the length (length_penalty 1)
        hyps.append(Hypothesis(tokenizer.decode(ids).strip(), float(score) * max(len(ids), 1), len(ids)))
    return NBest(hyps, no_speech, avg_logprob)


def rescore(
    hypotheses: list[Hypothesis],
    lm: QuestionLM,
    lm_weight: float = DEFAULT_LM_WEIGHT,
    length_bonus: float = DEFAULT_LENGTH_BONUS,
    context: str | None = None,
    context_weight: float = DEFAULT_CONTEXT_WEIGHT,
    max_acoustic_gap: float | None = DEFAULT_MAX_ACOUSTIC_GAP,
) -> int:
    """Index of the best hypothesis under the combined score (the first on ties), among those
    whose acoustic log-probability is within `max_acoustic_gap` nats of the beam's best (None:
    all of them)."""
    if not hypotheses:
        raise ValueError("no hypotheses to rescore")
    counts = context_counts(context) if context else None
    top = max(h.logprob for h in hypotheses)
    scores = [
        h.logprob + lm_weight * lm.logprob(h.text, counts, context_weight) + length_bonus * h.tokens
        if max_acoustic_gap is None or h.logprob >= top - max_acoustic_gap
        else -np.inf
        for h in hypotheses
    ]
    return int(np.argmax(scores))
