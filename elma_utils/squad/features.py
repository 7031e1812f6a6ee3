"""SQuAD examples → fixed-length model features (sliding windows over long contexts).

Each feature is ``[CLS] question [SEP] context-window [SEP]``. Long contexts are cut
into windows that start every ``doc_stride`` context tokens. Labels are token indices
of the answer's first and last piece inside the window, or 0 ([CLS]) when the answer is
not (wholly) in the window or the question has no answer. Offsets map every context
token back to characters of the original context, so answers are cut from the text
itself, never decoded from pieces.

Arrays are plain NumPy so that features can be computed once, saved with ``np.savez``
and fed to Keras on any backend (TensorFlow here, JAX or torch on a GPU machine).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from elma_utils.model.tokenizers import QATokenizer
    from elma_utils.squad.data import SquadExample


@dataclass
class QAFeatures:
    """Model inputs, labels and the bookkeeping needed to turn logits back into answers."""

    token_ids: np.ndarray  # int32 [N, L], padded with the tokenizer's pad id
    lengths: np.ndarray  # int32 [N]: real tokens in each row (rest is padding)
    context_start: np.ndarray  # int32 [N]: index of the first context token
    offsets: np.ndarray  # int32 [N, L, 2]: char span in the context; -1 outside the context
    start_positions: np.ndarray  # int32 [N]: label, 0 = no answer in this window
    end_positions: np.ndarray  # int32 [N]
    example_index: np.ndarray  # int32 [N]: which example a feature came from

    @property
    def max_seq_len(self) -> int:
        return int(self.token_ids.shape[1])

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def segment_ids(self) -> np.ndarray:
        pos = np.arange(self.max_seq_len)[None, :]
        return ((pos >= self.context_start[:, None]) & (pos < self.lengths[:, None])).astype(np.int32)

    def padding_mask(self) -> np.ndarray:
        return (np.arange(self.max_seq_len)[None, :] < self.lengths[:, None]).astype(np.int32)

    def model_inputs(self, rows: np.ndarray | slice | None = None, length: int | None = None) -> dict:
        """Dict of backbone inputs for some rows, optionally cut to ``length`` columns."""
        rows = slice(None) if rows is None else rows
        length = length or self.max_seq_len
        pos = np.arange(length)[None, :]
        lengths = self.lengths[rows][:, None]
        cstart = self.context_start[rows][:, None]
        return {
            "token_ids": self.token_ids[rows, :length],
            "segment_ids": ((pos >= cstart) & (pos < lengths)).astype(np.int32),
            "padding_mask": (pos < lengths).astype(np.int32),
        }

    def subset(self, rows: np.ndarray) -> QAFeatures:
        return QAFeatures(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{f.name: getattr(self, f.name) for f in fields(self)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> QAFeatures:
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})


def answer_token_span(offsets: np.ndarray, char_start: int, char_end: int) -> tuple[int, int] | None:
    """First and last context token covering [char_start, char_end), or None."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    inside = np.nonzero((ends > char_start) & (starts < char_end))[0]
    if inside.size == 0:
        return None
    return int(inside[0]), int(inside[-1])


def build_features(
    examples: list[SquadExample],
    tokenizer: QATokenizer,
    max_seq_len: int = 384,
    doc_stride: int = 128,
    max_query_len: int = 64,
    progress: bool = True,
) -> QAFeatures:
    """Tokenise questions and contexts (each distinct context once) and cut windows."""
    if max_seq_len <= max_query_len + 3:
        raise ValueError(f"max_seq_len={max_seq_len} leaves no room for the context")
    contexts = list(dict.fromkeys(e.context for e in examples))
    ctx_index = {c: i for i, c in enumerate(contexts)}
    ctx_tok = _encode_in_chunks(tokenizer, contexts, "tokenising contexts", progress)
    q_tok = _encode_in_chunks(tokenizer, [e.question for e in examples], "tokenising questions", progress)

    rows: dict[str, list] = {k: [] for k in ("ids", "cstart", "offs", "start", "end", "ex")}
    for ex_i, ex in enumerate(tqdm(examples, desc="building windows", disable=not progress)):
        q_ids = q_tok[ex_i][0][:max_query_len]
        c_ids, c_offs = ctx_tok[ctx_index[ex.context]]
        span = None
        if ex.answers and not ex.is_impossible:
            a = ex.answers[0]
            span = answer_token_span(c_offs, a.start, a.start + len(a.text))
        max_ctx = max_seq_len - len(q_ids) - 3
        for w_start in _window_starts(len(c_ids), max_ctx, doc_stride):
            w_end = min(w_start + max_ctx, len(c_ids))
            cstart = len(q_ids) + 2
            ids = np.concatenate(
                [[tokenizer.cls_id], q_ids, [tokenizer.sep_id], c_ids[w_start:w_end], [tokenizer.sep_id]]
            )
            offs = np.full((len(ids), 2), -1, dtype=np.int32)
            offs[cstart : cstart + w_end - w_start] = c_offs[w_start:w_end]
            s = e = 0
            if span is not None and span[0] >= w_start and span[1] < w_end:
                s, e = span[0] - w_start + cstart, span[1] - w_start + cstart
            rows["ids"].append(ids)
            rows["cstart"].append(cstart)
            rows["offs"].append(offs)
            rows["start"].append(s)
            rows["end"].append(e)
            rows["ex"].append(ex_i)
    return _stack(rows, max_seq_len, tokenizer.pad_id)


def _encode_in_chunks(tokenizer, texts, desc, progress, chunk=2000):
    out = []
    for i in tqdm(range(0, len(texts), chunk), desc=desc, disable=not progress or len(texts) <= chunk):
        out.extend(tokenizer.encode_with_offsets(texts[i : i + chunk]))
    return out


def _window_starts(n_ctx: int, max_ctx: int, stride: int) -> list[int]:
    starts = [0]
    while starts[-1] + max_ctx < n_ctx:
        starts.append(starts[-1] + stride)
    return starts


def _stack(rows: dict[str, list], max_seq_len: int, pad_id: int) -> QAFeatures:
    n = len(rows["ids"])
    token_ids = np.full((n, max_seq_len), pad_id, dtype=np.int32)
    offsets = np.full((n, max_seq_len, 2), -1, dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int32)
    for i, (ids, offs) in enumerate(zip(rows["ids"], rows["offs"], strict=True)):
        token_ids[i, : len(ids)] = ids
        offsets[i, : len(ids)] = offs
        lengths[i] = len(ids)
    return QAFeatures(
        token_ids=token_ids,
        lengths=lengths,
        context_start=np.asarray(rows["cstart"], dtype=np.int32).reshape(n),
        offsets=offsets,
        start_positions=np.asarray(rows["start"], dtype=np.int32).reshape(n),
        end_positions=np.asarray(rows["end"], dtype=np.int32).reshape(n),
        example_index=np.asarray(rows["ex"], dtype=np.int32).reshape(n),
    )


def features_cache_key(examples: list[SquadExample], tokenizer: QATokenizer, **params) -> str:
    """Stable key of (examples, tokenizer, window settings) for the on-disk feature cache."""
    h = hashlib.sha256()
    h.update(json.dumps({"kind": tokenizer.kind, "vocab": tokenizer.vocab_path.name, **params}).encode())
    for e in examples:
        h.update(e.qas_id.encode())
        h.update(e.question.encode())
        h.update(str(len(e.context)).encode())
    return h.hexdigest()[:16]


def cached_features(
    examples: list[SquadExample], tokenizer: QATokenizer, cache_dir: Path | None, **params
) -> QAFeatures:
    """build_features, reusing arrays saved by an earlier run with the same inputs."""
    if cache_dir is None:
        return build_features(examples, tokenizer, **params)
    path = Path(cache_dir) / f"features-{features_cache_key(examples, tokenizer, **params)}.npz"
    if path.is_file():
        return QAFeatures.load(path)
    feats = build_features(examples, tokenizer, **params)
    feats.save(path)
    return feats


def span_recovery_rate(
    examples: list[SquadExample], features: QAFeatures, normalise=None
) -> dict[str, float | int]:
    """Share of answerable examples whose labelled token span gives back the answer text.

    The span is cut from the context via the offsets of the labelled tokens and compared
    with the gold text after ``normalise`` (default: SQuAD answer normalisation).
    Examples whose answer falls in no window count as failures.
    """
    if normalise is None:
        from elma_utils.squad.metrics import normalize_answer as normalise
    ok: dict[int, bool] = {}
    for f in np.nonzero(features.start_positions > 0)[0]:
        ex_i = int(features.example_index[f])
        ex = examples[ex_i]
        s, e = features.start_positions[f], features.end_positions[f]
        text = ex.context[features.offsets[f, s, 0] : features.offsets[f, e, 1]]
        ok[ex_i] = ok.get(ex_i, False) or normalise(text) == normalise(ex.answers[0].text)
    answerable = [i for i, e in enumerate(examples) if e.answers and not e.is_impossible]
    exact = sum(ok.get(i, False) for i in answerable)
    return {
        "answerable": len(answerable),
        "recovered": int(exact),
        "rate": exact / max(len(answerable), 1),
    }
