"""`QAModel`: load a trained artifact and answer questions about a text.

qa = QAModel.load("artifacts/minilm-cpu")
qa.answer("Who won Super Bowl 50?", context)   # → Answer(text, char_start, char_end, score, no_answer)
qa.predict([(question, context), ...])         # batched
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from elma_utils.model import artifacts
from elma_utils.model.evaluation import predict_logits
from elma_utils.squad.data import SquadExample
from elma_utils.squad.features import build_features
from elma_utils.squad.postprocess import predict_answers


@dataclass
class Answer:
    text: str
    char_start: int
    char_end: int
    score: float
    no_answer: bool
    null_score_diff: float

    def to_dict(self) -> dict:
        return asdict(self)


def _check_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


class QAModel:
    """A fine-tuned span model with its tokenizer and window settings."""

    def __init__(self, model, tokenizer, config: dict, null_threshold: float | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.null_threshold = null_threshold

    @classmethod
    def load(cls, path: str | Path, null_threshold: float | None = None) -> QAModel:
        """Load ``artifacts/<name>``; ``null_threshold`` enables SQuAD 2.0-style "no answer"."""
        if not isinstance(path, str | Path):
            raise TypeError(f"model path must be a str or Path, got {type(path).__name__}")
        model, tokenizer, config = artifacts.load_span_model(Path(path))
        return cls(model, tokenizer, config, null_threshold)

    def predict(self, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[Answer]:
        """Answers for (question, context) pairs, batched by length."""
        examples = [
            SquadExample(
                qas_id=str(i),
                question=_check_text(q, "question"),
                context=_check_text(c, "context"),
                answers=(),
                is_impossible=False,
                title="",
                context_id=str(i),
            )
            for i, (q, c) in enumerate(pairs)
        ]
        if not examples:
            return []
        feats = build_features(
            examples,
            self.tokenizer,
            max_seq_len=self.config["max_seq_len"],
            doc_stride=self.config["doc_stride"],
            max_query_len=self.config["max_query_len"],
            progress=False,
        )
        start, end = predict_logits(self.model, feats, batch_size, progress=False)
        preds = predict_answers(examples, feats, start, end, null_threshold=self.null_threshold)
        return [
            Answer(p.text, p.char_start, p.char_end, p.score, p.no_answer, p.null_score_diff) for p in preds
        ]

    def answer(self, question: str, context: str) -> Answer:
        return self.predict([(question, context)])[0]

    def logits(self, question: str, context: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw start/end logits of the first window (for inspection and plots)."""
        ex = SquadExample(
            "0", _check_text(question, "question"), _check_text(context, "context"), (), False, "", "0"
        )
        feats = build_features(
            [ex],
            self.tokenizer,
            self.config["max_seq_len"],
            self.config["doc_stride"],
            self.config["max_query_len"],
            progress=False,
        )
        start, end = predict_logits(self.model, feats.subset(np.array([0])), 1, progress=False)
        return start[0, : feats.lengths[0]], end[0, : feats.lengths[0]]
