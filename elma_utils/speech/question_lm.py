"""A word n-gram language model of questions, to rescore the recogniser's n-best list.

Whisper tiny decodes each word from a few hundred milliseconds of audio; where two words
sound alike ("type of" / "type on", "what is" / "what in") its beam often holds both and
picks by a hair. A model of how questions are worded breaks those ties: "what type of" is
common in questions, "what type on" is not. This is the classic external-LM rescoring of
speech recognisers (shallow fusion applied to the n-best list).

The model is an interpolated Kneser-Ney trigram over the normalised words of
:func:`~elma_utils.speech.wer.normalize_text` (numbers as words, no punctuation), fitted on
the *training* questions of SQuAD (``train-v1.1.json``), never on the dev questions that
the benchmarks speak. It is small (a few MB of counts), pure Python, and cached as gzipped
JSON next to the other derived data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from elma_utils.speech.wer import normalize_text

BOS, EOS = "<s>", "</s>"
FORMAT = "elma.question_lm"
FORMAT_VERSION = 1


class QuestionLM:
    """Interpolated Kneser-Ney n-gram model (order 2 or 3) over normalised words.

    ``logprob(text)`` is the natural-log probability of the words and the end of the
    question. Unknown words get the unigram floor ``1 / (vocabulary + 1)`` times the
    back-off weight, so a rare name costs a fixed, moderate amount.
    """

    def __init__(self, order: int = 3, discount: float = 0.75) -> None:
        if order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {order}")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.order, self.discount = order, discount
        # counts[n][context tuple][word]: highest order raw counts, lower orders continuation counts
        self.counts: list[dict[tuple[str, ...], Counter]] = [defaultdict(Counter) for _ in range(order)]
        self.sentences = 0

    # ---------------------------------------------------------------- fitting
    def fit(self, questions: Iterable[str]) -> QuestionLM:
        """Count n-grams of every question (normalised here); returns self.

        The highest order keeps raw counts; each lower order counts, for every n-gram, the
        distinct words seen before it (Kneser-Ney continuation counts), so "francisco" is
        likely only after "san" and not as a word on its own.
        """
        raw: Counter = Counter()
        for text in questions:
            words = normalize_text(text).split()
            if not words:
                continue
            self.sentences += 1
            padded = [BOS] * (self.order - 1) + words + [EOS]
            raw.update(tuple(padded[i - self.order + 1 : i + 1]) for i in range(self.order - 1, len(padded)))
        if self.sentences == 0:
            raise ValueError("no questions to fit the language model on")
        level: Counter = raw
        for n in range(self.order - 1, -1, -1):
            for gram, count in level.items():
                self.counts[n][gram[:-1]][gram[-1]] += count
            if n:
                level = Counter(gram[1:] for gram in level)  # distinct left extensions
        self._finish()
        return self

    def _finish(self) -> None:
        self._totals = [{c: sum(w.values()) for c, w in level.items()} for level in self.counts]
        self._types = [{c: len(w) for c, w in level.items()} for level in self.counts]
        self.vocabulary = len(self.counts[0][()])

    # ---------------------------------------------------------------- scoring
    def _prob(self, context: tuple[str, ...], word: str) -> float:
        n = len(context)
        if n == 0:
            total = self._totals[0].get((), 0)
            floor = 1.0 / (self.vocabulary + 1)
            count = self.counts[0][()].get(word, 0)
            lam = self.discount * self._types[0].get((), 0) / total
            return max(count - self.discount, 0.0) / total + lam * floor
        lower = self._prob(context[1:], word)
        total = self._totals[n].get(context)
        if not total:
            return lower
        count = self.counts[n][context].get(word, 0)
        lam = self.discount * self._types[n][context] / total
        return max(count - self.discount, 0.0) / total + lam * lower

    def logprob(self, text: str, context: Counter | None = None, context_weight: float = 0.0) -> float:
        """ln P(words, end of question); the text is normalised first.

        With ``context`` (word counts of the paragraph asked about, from
        :func:`context_counts`) each word's probability is mixed with its share of the
        paragraph: (1 − w)·P_lm + w·P_paragraph, so the paragraph's names and terms, which
        the questions file may never have seen, are not scored as unknown words.
        """
        if not 0.0 <= context_weight < 1.0:
            raise ValueError(f"context_weight must be in [0, 1), got {context_weight}")
        words = normalize_text(text).split()
        mix = context_weight if context else 0.0
        total_context = sum(context.values()) if mix else 0
        history = [BOS] * (self.order - 1)
        total = 0.0
        for word in [*words, EOS]:
            p = self._prob(tuple(history[-(self.order - 1) :]), word)
            if mix:
                p = (1.0 - mix) * p + mix * context.get(word, 0) / total_context
            total += math.log(p)
            history.append(word)
        return total

    def perplexity(self, texts: Sequence[str]) -> float:
        """exp of the mean negative log-probability per predicted token (words and ends)."""
        lp = sum(self.logprob(t) for t in texts)
        tokens = sum(len(normalize_text(t).split()) + 1 for t in texts)
        return math.exp(-lp / max(tokens, 1))

    # ---------------------------------------------------------------- storage
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "order": self.order,
            "discount": self.discount,
            "sentences": self.sentences,
            "counts": [[[list(ctx), dict(words)] for ctx, words in level.items()] for level in self.counts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuestionLM:
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT
            or data.get("version") != FORMAT_VERSION
        ):
            raise ValueError(f"not a question language model (format {FORMAT!r} v{FORMAT_VERSION})")
        lm = cls(int(data["order"]), float(data["discount"]))
        lm.sentences = int(data["sentences"])
        for n, level in enumerate(data["counts"]):
            for ctx, words in level:
                lm.counts[n][tuple(ctx)] = Counter(words)
        lm._finish()
        return lm

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuestionLM:
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable question language model ({err})") from err


def context_counts(context: str) -> Counter:
    """Normalised word counts of a paragraph, for ``QuestionLM.logprob(context=...)``."""
    return Counter(normalize_text(context).split())


def squad_questions(path: str | os.PathLike) -> list[str]:
    """Every question text of a SQuAD-format file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    return [qa["question"] for article in data for p in article["paragraphs"] for qa in p["qas"]]


def question_lm_for(
    train_file: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    order: int = 3,
    *,
    progress: bool = True,
):
    """The LM of ``train_file``'s questions, fitted once and cached (keyed by the file's sha256).

    Fitting on SQuAD's 87,599 training questions takes about a minute on a small CPU, so with
    ``progress`` a line on stderr says what is built, that it happens once and where it is
    cached, followed by a progress bar; a cached LM loads silently.
    """
    from elma_utils import config

    train_file = Path(train_file)
    if not train_file.is_file():
        raise FileNotFoundError(
            f"{train_file}: no SQuAD training file for the question language model "
            "(set ELMA_DATA_DIR, or pass lm=None to decode without one)"
        )
    digest = hashlib.sha256(train_file.read_bytes()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else config.cache_dir() / "speech"
    path = cache / f"question_lm-o{order}-{digest}.json.gz"
    if path.is_file():
        return QuestionLM.load(path)
    questions = squad_questions(train_file)
    if progress:
        print(
            f"building the question language model from the {len(questions):,} questions of {train_file} "
            f"(once: it is cached as {path}; `elma ask --lm none` decodes without it)",
            file=sys.stderr,
            flush=True,
        )
    from tqdm import tqdm

    bar = tqdm(
        questions, "question LM", unit=" questions", file=sys.stderr, mininterval=1.0, disable=not progress
    )
    lm = QuestionLM(order).fit(bar)
    lm.save(path)
    return lm
