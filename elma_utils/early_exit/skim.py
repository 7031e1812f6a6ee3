"""Adaptive width: after an early layer, drop the passage blocks the answer cannot be in.

Depth alone cannot go far below the full model on a 6-layer model (its early exits answer
badly), but most of a SQuAD passage is irrelevant to the question after a few layers
(Block-Skim, arXiv 2112.08560). A *skim head* — one linear unit on the hidden state of
layer ``s``, p = sigmoid(w·h + b) per token — scores every context token for "the answer
is here". The keep rule works on fixed blocks of ``block`` context tokens:

- a block's score is the largest p among its tokens;
- blocks scoring ≥ ``tau`` are kept, and always the best block of the window (so a window
  never loses its whole context); ``margin_blocks`` widens every kept block by that many
  neighbours on each side;
- [CLS] (the no-answer choice), the question and the [SEP]s are always kept.

Every window (row) gets its own kept set. Layers s+1..K then run on the kept positions only
(their position embeddings were added before layer 1, so order and distance survive the
gather), and their exit logits are put back at the original positions with ``NEG_INF`` where
a token was dropped: post-processing, offsets, entropies and answers work unchanged, and a
dropped token simply has probability 0. ``tau = 0`` keeps everything.

The head is trained by distillation (``skim_targets``: the tokens of the full model's own
predicted span) with a weighted logistic loss (``fit_skim_probe``). Everything here is NumPy,
so the Keras-free edge runtime uses the same code as training and calibration.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEG_INF = -1e4  # what a masked logit is set to (the QA heads' own mask value)
SKIM_FILE = "skim.npz"
DEFAULT_BLOCK = 16  # context tokens per block (Block-Skim uses 32 on BERT-base with 512 tokens)
# A freshly trained head's keep threshold, a cautious one (keeps almost every block) until the
# calibration replaces it: every deployed bundle carries the tau ``bench.adaptive_run`` chose
# (MiniLM's heads skim between 0.6 and 0.85, where they keep ~60-20 % of the context).
DEFAULT_TAU = 0.05
DEFAULT_MARGIN_BLOCKS = 0


@dataclass(frozen=True)
class SkimHead:
    """A trained skim head and its keep rule.

    Args:
        w: [H] weights of the linear unit on layer ``layer``'s hidden state.
        b: its bias.
        layer: 1-based layer after which the passage is skimmed (layers ``layer + 1``… run
            on the kept positions).
        block: context tokens per block.
        tau: keep threshold on a block's score (largest token probability); 0 keeps all.
        margin_blocks: neighbours kept on each side of every kept block.

    Example:
        >>> head = SkimHead(np.zeros(4, np.float32), 0.0, layer=2, block=2, tau=0.6)
        >>> head.with_settings(tau=0.0).tau
        0.0
    """

    w: np.ndarray
    b: float
    layer: int
    block: int = DEFAULT_BLOCK
    tau: float = DEFAULT_TAU
    margin_blocks: int = DEFAULT_MARGIN_BLOCKS

    def __post_init__(self) -> None:
        w = np.asarray(self.w, dtype=np.float32).reshape(-1)
        object.__setattr__(self, "w", w)
        object.__setattr__(self, "b", float(self.b))
        if not (w.size and np.isfinite(w).all() and np.isfinite(self.b)):
            raise ValueError("skim head weights must be finite and non-empty")
        if int(self.layer) != self.layer or self.layer < 1:
            raise ValueError(f"skim layer must be an integer ≥ 1, got {self.layer}")
        if int(self.block) != self.block or self.block < 1:
            raise ValueError(f"skim block must be an integer ≥ 1, got {self.block}")
        if not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"skim tau must lie in 0..1, got {self.tau}")
        if int(self.margin_blocks) != self.margin_blocks or self.margin_blocks < 0:
            raise ValueError(f"margin_blocks must be an integer ≥ 0, got {self.margin_blocks}")
        for name in ("layer", "block", "margin_blocks"):  # 2.0 from a file is the integer 2
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "tau", float(self.tau))

    def with_settings(self, **changes) -> SkimHead:
        """The same weights with another keep rule (``tau``, ``block``, ``margin_blocks``, ``layer``)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        return {"layer": int(self.layer), "block": int(self.block), "tau": float(self.tau),
                "margin_blocks": int(self.margin_blocks)}  # fmt: skip

    def token_probs(self, hidden: np.ndarray) -> np.ndarray:
        """p("the answer is here") per token: hidden [..., L, H] → [..., L] (float64)."""
        hidden = np.asarray(hidden)
        if hidden.shape[-1] != self.w.size:
            raise ValueError(f"hidden size {hidden.shape[-1]} does not fit a skim head of size {self.w.size}")
        z = hidden.astype(np.float64) @ self.w.astype(np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-z))

    def kept_positions(self, hidden: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
        """Sorted positions of one window that go on to the next layer.

        ``hidden`` [L, H] (layer ``layer``'s output), ``offsets`` [L] or [L, 2] (≥ 0 on
        context tokens), ``length`` the window's real tokens (the rest is padding, dropped)."""
        return keep_positions(
            self.token_probs(hidden), offsets, length, self.block, self.tau, self.margin_blocks
        )

    def save(self, path: str | Path) -> Path:
        """Write weights and keep rule as a NumPy ``.npz`` (no pickles)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp, w=self.w, b=np.float64(self.b), **{k: np.float64(v) for k, v in self.settings().items()}
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, **overrides) -> SkimHead:
        """Read a ``save``d head; ``overrides`` replace stored settings (e.g. the bundle's tau)."""
        try:
            with np.load(Path(path), allow_pickle=False) as d:
                stored = {k: d[k] for k in d.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # empty, truncated
            raise ValueError(f"{path}: not a skim head file: {err}") from err
        missing = {"w", "b", "layer"} - set(stored)
        if missing:
            raise ValueError(f"{path}: skim head file lacks {sorted(missing)}")
        # integers stay as stored (2.5 is refused by __post_init__, not rounded to 2)
        kwargs = {"w": stored["w"], "b": float(stored["b"]), "layer": stored["layer"].item()}
        for key, kind in (("block", None), ("tau", float), ("margin_blocks", None)):
            if key in stored:
                kwargs[key] = kind(stored[key]) if kind else stored[key].item()
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)


def context_mask(offsets: np.ndarray) -> np.ndarray:
    """True on context tokens (character offsets ≥ 0), for [..., L] or [..., L, 2] offsets."""
    offsets = np.asarray(offsets)
    return (offsets[..., 0] if offsets.ndim >= 2 and offsets.shape[-1] == 2 else offsets) >= 0


def keep_positions(
    probs: np.ndarray,
    offsets: np.ndarray,
    length: int,
    block: int = DEFAULT_BLOCK,
    tau: float = DEFAULT_TAU,
    margin_blocks: int = DEFAULT_MARGIN_BLOCKS,
) -> np.ndarray:
    """The keep rule for one window (see the module note); returns sorted int positions.

    ``probs`` [L] token probabilities, ``offsets`` [L] or [L, 2]; positions ≥ ``length``
    (padding) are never kept, every real non-context token always is."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    ctx = context_mask(offsets).reshape(-1)[: probs.size].copy()
    length = int(length)
    ctx[length:] = False
    real = np.arange(probs.size) < length
    keep = real & ~ctx
    where = np.nonzero(ctx)[0]
    if where.size:
        block_of = (where - where[0]) // int(block)
        n_blocks = int(block_of[-1]) + 1
        score = np.full(n_blocks, -np.inf)
        np.maximum.at(score, block_of, probs[where])
        kept = score >= float(tau)
        kept[int(np.argmax(score))] = True
        if margin_blocks:
            grown = kept.copy()
            for shift in range(1, int(margin_blocks) + 1):
                grown[shift:] |= kept[:-shift]
                grown[:-shift] |= kept[shift:]
            kept = grown
        keep[where[kept[block_of]]] = True
    return np.nonzero(keep)[0]


def scatter_logits(logits: np.ndarray, positions: np.ndarray, length: int) -> np.ndarray:
    """Logits computed on ``positions`` [L'] (or [N, L'] with -1 for padding) back on ``length``
    columns; every other column gets ``NEG_INF``."""
    logits = np.asarray(logits, dtype=np.float32)
    positions = np.asarray(positions)
    if logits.ndim == 1:
        out = np.full(int(length), NEG_INF, dtype=np.float32)
        ok = positions >= 0
        out[positions[ok]] = logits[: positions.size][ok]
        return out
    out = np.full((logits.shape[0], int(length)), NEG_INF, dtype=np.float32)
    rows, cols = np.nonzero(positions >= 0)
    out[rows, positions[rows, cols]] = logits[rows, cols]
    return out


def pad_positions(kept: list[np.ndarray]) -> np.ndarray:
    """Per-row kept positions → one int array [N, L'] padded with -1 (L' = longest row)."""
    width = max((len(k) for k in kept), default=0)
    out = np.full((len(kept), width), -1, dtype=np.int64)
    for i, k in enumerate(kept):
        out[i, : len(k)] = k
    return out


def gather_rows(values: np.ndarray, positions: np.ndarray, fill=0) -> np.ndarray:
    """``values`` [N, L, ...] at ``positions`` [N, L'] (-1: padding, filled with ``fill``)."""
    values = np.asarray(values)
    idx = np.maximum(positions, 0)
    taken = np.take_along_axis(values, idx.reshape(idx.shape + (1,) * (values.ndim - 2)), axis=1)
    pad = (positions < 0).reshape(positions.shape + (1,) * (values.ndim - 2))
    return np.where(pad, np.asarray(fill, dtype=values.dtype), taken)


def kept_share(kept_counts: np.ndarray | list[int], lengths: np.ndarray | list[int]) -> float:
    """Share of a question's real tokens (all its windows) that go on past the skim layer."""
    total = float(np.sum(lengths))
    return float(np.sum(kept_counts)) / total if total else 1.0


# ---------------------------------------------------------------- training (distillation)


def skim_targets(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    example_index: np.ndarray | None = None,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> np.ndarray:
    """Bool [N, L]: the tokens of the full model's own predicted span in each window.

    A window is positive when its best span beats its [CLS] (no-answer) score, or when it
    is the window its question's answer is taken from (``example_index`` given: SQuAD 1.1
    always answers). Other windows — the full model says "not here" — have no positives."""
    from elma_utils.early_exit.entropy import answer_space
    from elma_utils.squad.postprocess import best_span

    start = np.asarray(start_logits)
    mask = answer_space(offsets, include_cls=True, length=start.shape[1])
    s, e, score, null = best_span(start, end_logits, mask, n_best, max_answer_len)
    positive = np.isfinite(score) & (score >= null)
    if example_index is not None:
        idx = np.asarray(example_index)
        for q in np.unique(idx):
            rows = np.nonzero(idx == q)[0]
            best = rows[int(np.argmax(score[rows]))]
            positive[best] |= bool(np.isfinite(score[best]))
    pos = np.arange(start.shape[1])[None, :]
    return positive[:, None] & (pos >= s[:, None]) & (pos <= e[:, None])


def fit_skim_probe(
    hidden: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int = 300,
    learning_rate: float = 0.02,
    l2: float = 1e-4,
    max_pos_weight: float = 50.0,
    seed: int = 0,
) -> tuple[np.ndarray, float, dict]:
    """A weighted logistic regression of ``targets`` [T] on ``hidden`` [T, H] (full-batch Adam).

    Positives are rare (a span among a passage), so they weigh n_neg / n_pos (at most
    ``max_pos_weight``). Returns (w [H] float32, b, {"loss": final loss, "pos_weight": …})."""
    x = np.asarray(hidden, dtype=np.float32)
    y = np.asarray(targets, dtype=np.float32).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(f"hidden must be [T, H] with T = {y.size} targets, got {x.shape}")
    n_pos = float(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError("skim targets need both positive and negative tokens")
    pos_weight = min((y.size - n_pos) / n_pos, max_pos_weight)
    weight = np.where(y > 0, pos_weight, 1.0).astype(np.float32)
    weight /= weight.sum()
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    xs = (x - mean) / scale  # standardised for a well-conditioned fit; folded back below
    rng = np.random.default_rng(seed)
    theta = np.concatenate([rng.normal(0, 0.01, x.shape[1]), [0.0]]).astype(np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    loss = float("nan")
    for t in range(1, int(steps) + 1):
        z = xs @ theta[:-1].astype(np.float32) + theta[-1]
        p = 1.0 / (1.0 + np.exp(-z))
        loss = float(np.sum(weight * (np.logaddexp(0.0, z) - y * z)))
        g_z = weight * (p - y)
        grad = np.concatenate([xs.T @ g_z + l2 * theta[:-1], [g_z.sum()]]).astype(np.float64)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        theta -= learning_rate * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    w = theta[:-1] / scale
    b = float(theta[-1] - np.dot(w, mean))
    return w.astype(np.float32), b, {"loss": loss, "pos_weight": float(pos_weight), "tokens": int(y.size),
                                     "positives": int(n_pos)}  # fmt: skip
