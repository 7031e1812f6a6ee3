"""Spoken question in, answer out: audio -> transcript -> extractive QA, timed per stage.

    qa = SpokenQA(get_recognizer("whisper"), EdgeQA(EdgeModel.load(bundle), tunnel, outbox))
    result = qa.ask("question.wav", context)
    result.transcript, result.answer, result.where, result.timings_ms

The answerer is any of ELMA's three ways to answer a typed question, told apart by what their
``answer(question, context)`` returns:

- ``EdgeQA`` (edge model, offload of unsolved questions, fallback): source ``edge``,
  ``server`` or ``edge-fallback``;
- ``EdgeModel`` (the edge bundle alone, no server): source ``edge``, also for a question no
  layer settled (``solved`` False: the last layer's answer);
- ``QAModel`` (the full model): source ``full-model``.

The recogniser is given the context (``transcribe(..., context=...)``): for Whisper it becomes
the initial prompt, which lowers WER on the paragraph's names (see
:func:`elma_utils.speech.recognizers.context_prompt`). :func:`resolve_context` turns the CLI's
context options (text, file or SQuAD id) into that context.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.speech.audio import SAMPLE_RATE, AudioSource, load_audio, prepare_audio
from elma_utils.speech.recognizers import RecognitionError, Recognizer, Transcript
from elma_utils.speech.wer import word_error_rate

SOURCES = ("edge", "server", "edge-fallback", "full-model", "ask-repeat")
ASK_REPEAT = "please repeat the question"


class ContextError(ValueError):
    """The context options are missing, ambiguous or point at nothing; the message says which."""


@dataclass
class SpokenAnswer:
    """What was heard, the answer, where it came from and what each stage cost (ms).

    `timings_ms` keys, in pipeline order and only for stages that ran: ``load_audio``
    (decode/check/trim), ``asr``, ``tokenise``, ``embeddings``, ``edge_layer_1`` ...
    ``edge_layer_k`` (all windows of the question), ``full_model`` (tokenise, model and span
    search of ``QAModel``), ``offload`` (round trip to the server, its time included),
    ``server`` (as the server reports it), ``total`` (wall clock of :meth:`SpokenQA.ask`).
    """

    transcript: str
    answer: str
    source: str  # one of SOURCES
    exit_layer: int | None  # last edge layer computed (None: full model)
    num_layers: int | None  # layers of the edge model (None: full model)
    edge_solved: bool | None  # an exit settled the question on the device
    char_start: int | None
    char_end: int | None
    no_answer: bool
    engine: str
    audio_seconds: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    reference: str | None = None  # the typed question, when known (e.g. from --squad-id)
    error: str | None = None  # why the server's answer is missing (edge-fallback)
    unreliable: str | None = None  # why the transcript is doubted (source "ask-repeat": not answered)

    @property
    def where(self) -> str:
        """Where the answer came from, in words: "edge layer 3 of 6", "server", "full model"."""
        if self.source == "full-model":
            return "full model"
        if self.source == "ask-repeat":
            return f"not answered: the transcript looks unreliable ({self.unreliable}); {ASK_REPEAT}"
        of = f" of {self.num_layers}" if self.num_layers else ""
        if self.source == "server":
            return f"server (edge stopped after layer {self.exit_layer}{of})"
        if self.source == "edge-fallback":
            return f"edge layer {self.exit_layer}{of}, server unreachable ({self.error or 'no reply'})"
        settled = "" if self.edge_solved in (True, None) else ", no exit settled it"
        return f"edge layer {self.exit_layer}{of}{settled}"

    @property
    def wer(self) -> float | None:
        """Word error rate of the transcript against `reference` (None without one)."""
        if not self.reference:
            return None
        return word_error_rate(self.reference, self.transcript)

    @property
    def real_time_factor(self) -> float:
        asr = self.timings_ms.get("asr", float("nan"))
        return asr / 1000 / self.audio_seconds if self.audio_seconds else float("nan")

    def to_dict(self) -> dict:
        """Plain dict for strict JSON (``elma ask --json``): a number that is not finite (the
        real-time factor of a typed question, which has no audio) becomes None."""
        out = asdict(self)
        out["where"] = self.where
        out["wer"] = _finite(self.wer, 4)
        out["audio_seconds"] = _finite(self.audio_seconds)
        out["real_time_factor"] = _finite(self.real_time_factor, 4)
        out["timings_ms"] = {k: _finite(v, 3) for k, v in self.timings_ms.items()}
        return out


def _finite(value: float | None, digits: int | None = None) -> float | None:
    """`value` rounded to `digits`, or None when it is missing, NaN or infinite."""
    if value is None or not math.isfinite(value):
        return None
    return float(value) if digits is None else round(float(value), digits)


class _LastAnswer:
    """Wraps an edge model and keeps the answer it last gave (per thread), so the per-layer
    times of an ``EdgeAnswer`` survive ``EdgeQA``, whose result keeps only the edge total."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._local = threading.local()

    def answer(self, question: str, context: str, *args, **kwargs):
        result = self._inner.answer(question, context, *args, **kwargs)
        self._local.last = result
        return result

    def take(self):
        last = getattr(self._local, "last", None)
        self._local.last = None
        return last

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class SpokenQA:
    """A recogniser and an answerer (``EdgeQA``, ``EdgeModel`` or ``QAModel``) in one call.

    With an ``EdgeQA`` the answerer used is a shallow copy whose edge model is wrapped to keep
    the per-layer timings; it shares the original's tunnel, outbox, request ids and known
    contexts, and the original object is left unchanged.
    """

    def __init__(self, recognizer: Recognizer, answerer: Any, *, use_context: bool = True):
        if not callable(getattr(answerer, "answer", None)):
            raise TypeError(f"answerer must have .answer(question, context), got {type(answerer).__name__}")
        self.recognizer = recognizer
        self.use_context = use_context
        self._recorder: _LastAnswer | None = None
        if hasattr(answerer, "edge") and hasattr(answerer, "tunnel"):  # EdgeQA
            answerer = copy.copy(answerer)
            self._recorder = answerer.edge = _LastAnswer(answerer.edge)
        self.answerer = answerer

    def ask(
        self,
        audio: AudioSource | np.ndarray,
        context: str,
        *,
        sr: int = SAMPLE_RATE,
        reference: str | None = None,
    ) -> SpokenAnswer:
        """Transcribe `audio` (a file, bytes, or samples at `sr`) and answer it about `context`.

        Raises :class:`~elma_utils.speech.audio.AudioError` for unusable audio and
        :class:`RecognitionError` when nothing was recognised. A transcript the recogniser's
        guard doubts (``details["unreliable"]``) is not answered: the result's source is
        "ask-repeat" and ``unreliable`` says why.
        """
        if not isinstance(context, str) or not context.strip():
            raise ContextError("the context is empty: give the text the question is about")
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if isinstance(audio, np.ndarray):
            name = "the audio"
            samples = prepare_audio(audio, sr, name=name)
        else:
            name = str(audio) if isinstance(audio, str | Path) else "the audio"
            samples = load_audio(audio)
        timings["load_audio"] = (time.perf_counter() - t0) * 1000
        transcript = self.recognizer.transcribe(samples, context=context if self.use_context else None)
        timings["asr"] = transcript.seconds * 1000
        question = transcript.text.strip()
        if not question:
            raise RecognitionError(
                f"nothing was recognised in {name} ({transcript.engine}); "
                "speak the question clearly, or type it with --question"
            )
        unreliable = transcript.details.get("unreliable")
        if unreliable:  # the recogniser's guard doubts it even after a fallback decode: do not answer
            timings["total"] = (time.perf_counter() - t_start) * 1000
            return SpokenAnswer(
                transcript=question,
                answer="",
                source="ask-repeat",
                exit_layer=None,
                num_layers=None,
                edge_solved=None,
                char_start=None,
                char_end=None,
                no_answer=True,
                engine=transcript.engine,
                audio_seconds=transcript.audio_seconds,
                timings_ms=timings,
                reference=reference,
                unreliable=unreliable,
            )
        t0 = time.perf_counter()
        result = self.answerer.answer(question, context)
        answer_ms = (time.perf_counter() - t0) * 1000
        answer = self._spoken_answer(result, transcript, timings, answer_ms)
        timings["total"] = (time.perf_counter() - t_start) * 1000
        answer.reference = reference
        return answer

    def ask_typed(self, question: str, context: str) -> SpokenAnswer:
        """The same answer record for a typed question (no audio, no recognition): what
        `elma ask --question` prints, so spoken and typed runs compare stage by stage."""
        if not isinstance(question, str) or not question.strip():
            raise ContextError("the question is empty")
        if not isinstance(context, str) or not context.strip():
            raise ContextError("the context is empty: give the text the question is about")
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        result = self.answerer.answer(question.strip(), context)
        answer_ms = (time.perf_counter() - t0) * 1000
        typed = Transcript(text=question.strip(), seconds=0.0, engine="typed", audio_seconds=0.0)
        answer = self._spoken_answer(result, typed, timings, answer_ms)
        timings["total"] = (time.perf_counter() - t_start) * 1000
        return answer

    def _spoken_answer(
        self, result: Any, transcript, timings: dict[str, float], answer_ms: float
    ) -> SpokenAnswer:
        common = {
            "transcript": transcript.text.strip(),
            "answer": result.text,
            "engine": transcript.engine,
            "audio_seconds": transcript.audio_seconds,
            "timings_ms": timings,
        }
        if hasattr(result, "source"):  # EdgeQAResult
            edge = self._recorder.take() if self._recorder is not None else None
            if edge is not None:
                _edge_timings(edge, timings)
            else:
                timings["tokenise"] = float(result.timings.get("tokenise_ms", 0.0))
                timings["edge"] = float(result.edge_ms)
            if result.source != "edge":
                timings["offload"] = float(result.offload_ms)
            if result.source == "server":
                timings["server"] = float(result.server_ms)
            return SpokenAnswer(
                **common,
                source=result.source,
                exit_layer=int(result.exit_layer),
                num_layers=_num_layers(self.answerer.edge),
                edge_solved=bool(result.edge_solved),
                char_start=result.char_start,
                char_end=result.char_end,
                no_answer=bool(result.no_answer),
                error=result.error,
            )
        if hasattr(result, "layer_ms"):  # EdgeAnswer from an EdgeModel
            _edge_timings(result, timings)
            start = int(result.char_start)
            return SpokenAnswer(
                **common,
                source="edge",
                exit_layer=int(result.exit_layer),
                num_layers=_num_layers(self.answerer),
                edge_solved=bool(result.solved),
                char_start=start if start >= 0 else None,
                char_end=int(result.char_end) if start >= 0 else None,
                no_answer=not result.text,
            )
        # QAModel's Answer: the full model, timed as one stage
        timings["full_model"] = answer_ms
        start = int(result.char_start)
        return SpokenAnswer(
            **common,
            source="full-model",
            exit_layer=None,
            num_layers=None,
            edge_solved=None,
            char_start=start if start >= 0 else None,
            char_end=int(result.char_end) if start >= 0 else None,
            no_answer=bool(getattr(result, "no_answer", False)),
        )


def _edge_timings(edge_answer: Any, timings: dict[str, float]) -> None:
    timings["tokenise"] = float(getattr(edge_answer, "tokenise_ms", 0.0))
    timings["embeddings"] = float(getattr(edge_answer, "embeddings_ms", 0.0))
    for k, ms in enumerate(edge_answer.layer_ms, start=1):
        timings[f"edge_layer_{k}"] = float(ms)


def _num_layers(edge_model: Any) -> int | None:
    n = getattr(edge_model, "num_layers", None)
    return int(n) if n is not None else None


# ---------------------------------------------------------------- context for the CLI


def resolve_context(
    context: str | None = None,
    context_file: str | Path | None = None,
    squad_id: str | None = None,
    data_dir: str | Path | None = None,
) -> tuple[str, str | None]:
    """The context from exactly one of: its text, a UTF-8 text file, or a SQuAD question id
    (looked up in dev-v1.1, then dev-v2.0). Returns (context, typed question or None): a SQuAD
    id also gives its question, to compare with the transcript. Raises :class:`ContextError`."""
    given = [n for n, v in (("--context", context), ("--context-file", context_file), ("--squad-id", squad_id))
             if v is not None]  # fmt: skip
    if len(given) != 1:
        which = "none was given" if not given else f"got {' and '.join(given)}"
        raise ContextError(f"give exactly one of --context, --context-file or --squad-id ({which})")
    if context is not None:
        if not context.strip():
            raise ContextError("--context is empty: give the text the question is about")
        return context, None
    if context_file is not None:
        return _read_context_file(Path(context_file)), None
    return _squad_context(str(squad_id).strip(), data_dir)


def _read_context_file(path: Path) -> str:
    if not path.exists():
        raise ContextError(f"context file {path} does not exist")
    if not path.is_file():
        raise ContextError(f"{path} is not a file; give a text file holding the context")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ContextError(
            f"context file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    if not text.strip():
        raise ContextError(f"context file {path} is empty")
    return text.strip()


def _squad_context(qas_id: str, data_dir: str | Path | None) -> tuple[str, str]:
    from elma_utils.squad.data import load_squad

    if not qas_id:
        raise ContextError("--squad-id is empty")
    searched, missing = [], []
    for version in ("1.1", "2.0"):
        try:
            dataset = load_squad(version, "dev", Path(data_dir) if data_dir else None, download=False)
        except FileNotFoundError as exc:
            missing.append(str(exc))
            continue
        searched.append(dataset.path.name)
        for example in dataset.examples:
            if example.qas_id == qas_id:
                return example.context, example.question
    if not searched:
        raise ContextError(f"cannot look up --squad-id {qas_id}: {' '.join(missing)}")
    raise ContextError(f"no question with id {qas_id!r} in {' or '.join(searched)}")
