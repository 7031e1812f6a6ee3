"""Word → sub-word pieces, with or without keras-hub.

``QATokenizer`` pre-tokenises text into words itself (that is where the character offsets
come from) and only asks a *piece backend* to cut each word into vocabulary pieces. Two
backends give identical ids (tested on every dev text):

- ``keras_hub``: keras-hub's ``WordPieceTokenizer`` / ``SentencePieceTokenizer`` (needs
  TensorFlow + tensorflow-text: fine for training, far too heavy for a Jetson).
- ``python``: greedy longest-match-first WordPiece in plain Python (BERT's algorithm), and
  SentencePiece through the small ``sentencepiece`` package. This is what the edge runtime
  uses, so the device needs neither Keras nor TensorFlow.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Protocol

BACKENDS = ("keras_hub", "python")
MAX_CHARS_PER_WORD = 100  # BERT's limit: a longer word is one [UNK]


class PieceBackend(Protocol):
    def pieces(self, words: list[str]) -> list[list[int]]: ...
    def token_to_id(self, token: str) -> int: ...
    def id_to_token(self, token_id: int) -> str: ...
    def vocabulary_size(self) -> int: ...


class KerasHubPieces:
    """keras-hub's tokenizers, one batched call for all words."""

    def __init__(self, kind: str, vocab_path: Path):
        import keras_hub

        self.kind = kind
        if kind == "wordpiece":
            self._tok = keras_hub.tokenizers.WordPieceTokenizer(
                vocabulary=str(vocab_path), lowercase=False, strip_accents=False, split=False
            )
        else:
            self._tok = keras_hub.tokenizers.SentencePieceTokenizer(proto=str(vocab_path))

    def pieces(self, words: list[str]) -> list[list[int]]:
        if not words:
            return []
        out = self._tok.tokenize([[w] for w in words] if self.kind == "wordpiece" else words)
        return [list(map(int, x)) for x in out]

    def token_to_id(self, token: str) -> int:
        return int(self._tok.token_to_id(token))

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def vocabulary_size(self) -> int:
        return int(self._tok.vocabulary_size())


class PythonWordPiece:
    """BERT's WordPiece on one already-normalised word: longest prefix in the vocabulary,
    then ``##``-continuations; a word that cannot be covered entirely becomes ``[UNK]``."""

    def __init__(self, vocab_path: Path, unk_token: str = "[UNK]"):
        tokens = Path(vocab_path).read_text(encoding="utf-8").splitlines()
        self._ids = {t: i for i, t in enumerate(tokens)}
        self._tokens = tokens
        if unk_token not in self._ids:
            raise ValueError(f"{vocab_path}: the vocabulary has no {unk_token!r}")
        self._unk = self._ids[unk_token]
        self._word = lru_cache(maxsize=200_000)(self._word_uncached)

    def _word_uncached(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_CHARS_PER_WORD:
            return (self._unk,)
        out: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = self._ids.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return (self._unk,)
            out.append(found)
            start = end
        return tuple(out)

    def pieces(self, words: list[str]) -> list[list[int]]:
        return [list(self._word(w)) for w in words]

    def token_to_id(self, token: str) -> int:
        return self._ids[token]

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[int(token_id)]

    def vocabulary_size(self) -> int:
        return len(self._tokens)


class PythonSentencePiece:
    """The ``sentencepiece`` package on each word (the same library tensorflow-text wraps)."""

    def __init__(self, model_path: Path):
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "ALBERT's tokenizer on the edge needs the 'sentencepiece' package: pip install sentencepiece"
            ) from e
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))

    def pieces(self, words: list[str]) -> list[list[int]]:
        return [list(map(int, ids)) for ids in self._sp.encode(words)] if words else []

    def token_to_id(self, token: str) -> int:
        return int(self._sp.piece_to_id(token))

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def vocabulary_size(self) -> int:
        return int(self._sp.get_piece_size())


def piece_backend(kind: str, vocab_path: Path, backend: str = "keras_hub") -> PieceBackend:
    """The backend ``backend`` ('keras_hub' or 'python') for tokenizer ``kind``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown piece backend {backend!r}; choose one of {BACKENDS}")
    if backend == "keras_hub":
        return KerasHubPieces(kind, vocab_path)
    return PythonWordPiece(vocab_path) if kind == "wordpiece" else PythonSentencePiece(vocab_path)
