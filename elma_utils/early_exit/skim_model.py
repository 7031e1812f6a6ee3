"""The skim head on a Keras multi-exit model: training it, and every exit's logits with it.

    head, info = train_skim_head(multi, train_features, layer=2)       # distillation
    head.save(exits_dir / "skim.npz")
    out = skim_exit_logits(multi, dev_features, head, taus=[0.02, 0.05, 0.1])
    stats = skim_layerwise_dev_stats(exits_dir, head, "1.1", taus=[...])  # for calibration

``skim_exit_logits`` is the batched evaluation path: layers 1..s run on whole windows; after
layer s every row keeps its own positions (``SkimHead.kept_positions``), the batch is padded
to its longest kept row with ``padding_mask = 0``, layers s+1..K run on that, and their
logits go back to the original positions (``NEG_INF`` where dropped). The layers before the
skim are computed once for all ``taus``. The layer-by-layer runtime with skimming is
``EarlyExitRunner(..., skim=head)``; the edge's is ``EdgeModel`` with a bundle that has one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from elma_utils.early_exit.skim import (
    SKIM_FILE,
    SkimHead,
    fit_skim_probe,
    gather_rows,
    pad_positions,
    scatter_logits,
    skim_targets,
)
from elma_utils.model.batching import batch_arrays, plan_batches
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.qa_model import answer_space_mask
from elma_utils.squad.features import QAFeatures

SKIM_INFO = "skim.json"


def _compile(fn):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    return fn


class SkimmedForward:
    """Compiled halves of a multi-exit model around the skim layer ``s``.

    ``front(token_ids, segment_ids, padding_mask)`` → (hidden after layer s, start, end of
    exits 1..s, stacked [B, s, L]); ``back(hidden, padding_mask, segment_ids)`` → start, end
    of exits s+1..K [B, K - s, L'] on the (shorter) sequence it is given."""

    def __init__(self, model: MultiExitQAModel, layer: int):
        if not 1 <= layer < model.num_exits:
            raise ValueError(f"skim layer must lie in 1..{model.num_exits - 1} for {model.num_exits} exits")
        self.model, self.layer = model, int(layer)
        enc = model.encoder
        ops = keras.ops

        def front(token_ids, segment_ids, padding_mask):
            mask = answer_space_mask(segment_ids, padding_mask)
            x = enc.embed(token_ids, segment_ids, training=False)
            starts, ends = [], []
            for i in range(self.layer):
                x = enc.layer(i, x, padding_mask, training=False)
                s, e = model.exit_heads[i](x, mask)
                starts.append(s)
                ends.append(e)
            return x, ops.stack(starts, axis=1), ops.stack(ends, axis=1)

        def back(x, padding_mask, segment_ids):
            return exits_after(model, self.layer, x, padding_mask, segment_ids)

        self.front, self.back = _compile(front), _compile(back)


def exits_after(model: MultiExitQAModel, layer: int, x, padding_mask, segment_ids, training: bool = False):
    """Start, end logits [B, K - layer, L'] of exits layer+1..K, run on the hidden states
    ``x`` after ``layer`` (the kept positions, for a skimmed batch). Shared by evaluation
    (``SkimmedForward``) and training with skimming in the loop (``skim_finetune``)."""
    mask = answer_space_mask(segment_ids, padding_mask)
    starts, ends = [], []
    for i in range(layer, model.num_exits):
        x = model.encoder.layer(i, x, padding_mask, training=training)
        s, e = model.exit_heads[i](x, mask)
        starts.append(s)
        ends.append(e)
    return keras.ops.stack(starts, axis=1), keras.ops.stack(ends, axis=1)


def skim_batch(
    head: SkimHead, hidden: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, segment_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(kept positions [B, L'] (-1: pad), hidden, padding_mask, segment_ids on those positions)."""
    hidden = np.asarray(hidden, dtype=np.float32)
    positions = pad_positions(
        [head.kept_positions(hidden[r], offsets[r], int(lengths[r])) for r in range(len(hidden))]
    )
    pad = (positions >= 0).astype(np.int32)
    return (
        positions,
        gather_rows(hidden, positions, 0.0),
        pad,
        gather_rows(np.asarray(segment_ids, dtype=np.int32), positions, 0),
    )


def skim_exit_logits(
    model: MultiExitQAModel,
    features: QAFeatures,
    head: SkimHead,
    taus: list[float] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[float, dict[str, np.ndarray]]:
    """{tau: {"start", "end": [N, K, L] float32, "kept": [N] tokens going past layer s}}.

    ``taus`` default to the head's own. Logits of dropped positions are ``NEG_INF``."""
    taus = [head.tau] if taus is None else [float(t) for t in taus]
    fwd = SkimmedForward(model, head.layer)
    n, seq, k = len(features), features.max_seq_len, model.num_exits
    out = {
        t: {
            "start": np.full((n, k, seq), -1e4, dtype=np.float32),
            "end": np.full((n, k, seq), -1e4, dtype=np.float32),
            "kept": np.zeros(n, dtype=np.int64),
        }
        for t in taus
    }
    s = head.layer
    for b in tqdm(plan_batches(features.lengths, batch_size, seq, shuffle=False), desc="skimmed exits",
                  disable=not progress, unit="batch"):  # fmt: skip
        x = batch_arrays(features, b, with_labels=False)
        hidden, s0, e0 = fwd.front(x["token_ids"], x["segment_ids"], x["padding_mask"])
        hidden = np.asarray(hidden, dtype=np.float32)
        offsets = features.offsets[b.rows, : b.length]
        for t in taus:
            pos, h, pad, seg = skim_batch(head.with_settings(tau=t), hidden, offsets,
                                          features.lengths[b.rows], x["segment_ids"])  # fmt: skip
            s1, e1 = fwd.back(h, pad, seg)
            s1, e1 = np.asarray(s1, dtype=np.float32), np.asarray(e1, dtype=np.float32)
            o = out[t]
            o["start"][b.rows, :s, : b.length] = np.asarray(s0, dtype=np.float32)
            o["end"][b.rows, :s, : b.length] = np.asarray(e0, dtype=np.float32)
            for j in range(k - s):
                o["start"][b.rows, s + j, : b.length] = scatter_logits(s1[:, j], pos, b.length)
                o["end"][b.rows, s + j, : b.length] = scatter_logits(e1[:, j], pos, b.length)
            o["kept"][b.rows] = pad.sum(axis=1)
    return out


# ---------------------------------------------------------------- training


def skim_training_data(
    model: MultiExitQAModel,
    features: QAFeatures,
    layer: int,
    *,
    max_windows: int | None = 4000,
    negatives_per_positive: float = 10.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(hidden [T, H] of layer ``layer`` on context tokens, targets [T]) for the probe.

    Targets come from the model's last exit (the full model, ``skim_targets``): every
    positive token, and negatives sampled at ``negatives_per_positive`` per positive (from
    answer windows and "not here" windows alike). ``max_windows`` windows evenly spread."""
    from elma_utils.model.exit_training import predict_exit_logits

    if max_windows is not None and max_windows < len(features):
        features = features.subset(
            np.unique(np.linspace(0, len(features) - 1, max_windows).round().astype(int))
        )
    start, end = predict_exit_logits(model, features, batch_size=batch_size, progress=progress)
    targets = skim_targets(start[:, -1], end[:, -1], features.offsets, features.example_index)
    ctx = features.offsets[..., 0] >= 0
    n_pos = int((targets & ctx).sum())
    n_neg = int((~targets & ctx).sum())
    rate = min(1.0, negatives_per_positive * max(n_pos, 1) / max(n_neg, 1))
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for b in tqdm(plan_batches(features.lengths, batch_size, features.max_seq_len, shuffle=False),
                  desc=f"layer {layer} states", disable=not progress, unit="batch"):  # fmt: skip
        x = batch_arrays(features, b, with_labels=False)
        hidden = np.asarray(model.encoder.hidden_states(x, upto=layer)[-1], dtype=np.float32)
        t = targets[b.rows, : b.length]
        take = ctx[b.rows, : b.length] & (t | (rng.random(t.shape) < rate))
        xs.append(hidden[take])
        ys.append(t[take])
    return np.concatenate(xs), np.concatenate(ys)


def train_skim_head(
    model: MultiExitQAModel,
    features: QAFeatures,
    layer: int,
    *,
    block: int | None = None,
    tau: float | None = None,
    margin_blocks: int | None = None,
    max_windows: int | None = 4000,
    negatives_per_positive: float = 10.0,
    steps: int = 300,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SkimHead, dict]:
    """Distil the full model's answers into a skim head after layer ``layer`` (frozen model).

    Returns the head (keep-rule defaults of ``SkimHead`` unless given) and training facts
    (tokens, positives, loss, and the share of positive tokens the head ranks above the
    median negative)."""
    x, y = skim_training_data(model, features, layer, max_windows=max_windows,
                              negatives_per_positive=negatives_per_positive, batch_size=batch_size,
                              seed=seed, progress=progress)  # fmt: skip
    w, b, info = fit_skim_probe(x, y, steps=steps, seed=seed)
    settings = {"block": block, "tau": tau, "margin_blocks": margin_blocks}
    head = SkimHead(w, b, layer, **{k: v for k, v in settings.items() if v is not None})
    p = head.token_probs(x)
    info["positives_above_median_negative"] = float(np.mean(p[y] > np.median(p[~y])))
    info["layer"] = int(layer)
    return head, info


def train_skim_for_exits(
    exits_dir: Path,
    layer: int,
    *,
    data_dir: Path | None = None,
    max_windows: int = 4000,
    out: Path | None = None,
    **kwargs,
) -> Path:
    """Train a skim head for an exits artifact on its profile's training questions; writes
    ``<exits_dir>/skim.npz`` (or ``out``) and ``skim.json`` beside it; returns the npz path."""
    from elma_utils import config as cfg
    from elma_utils.early_exit.experiment import load_exits
    from elma_utils.model.finetune import training_examples
    from elma_utils.squad.features import cached_features

    exits_dir = Path(exits_dir)
    multi, tokenizer, config, _ = load_exits(exits_dir)
    profile = cfg.Profile(**config["profile"])
    feats = cached_features(training_examples(profile, data_dir), tokenizer, cfg.cache_dir(),
                            max_seq_len=config["max_seq_len"], doc_stride=config["doc_stride"],
                            max_query_len=config["max_query_len"])  # fmt: skip
    head, info = train_skim_head(multi, feats, layer, max_windows=max_windows, **kwargs)
    path = head.save(out or exits_dir / SKIM_FILE)
    path.with_name(SKIM_INFO).write_text(json.dumps({**info, **head.settings()}, indent=2))
    return path


# ---------------------------------------------------------------- calibration input


def skim_layerwise_dev_stats(
    exits_dir: Path,
    head: SkimHead,
    version: str = "1.1",
    taus: list[float] | None = None,
    n_questions: int | None = None,
    data_dir: Path | None = None,
    rule: str = "max",
) -> dict[float, dict[str, np.ndarray]]:
    """``layerwise_dev_stats`` with skimming, per tau: entropy / F1 / spans / null_diff [K, Q]
    plus ``kept_share`` [Q] (share of a question's tokens past layer s). Cached beside the exits."""
    from elma_utils.early_exit.calibration import layerwise_question_stats
    from elma_utils.early_exit.experiment import dev_questions, load_exits
    from elma_utils.squad.features import build_features

    exits_dir = Path(exits_dir)
    taus = [head.tau] if taus is None else [float(t) for t in taus]
    weights = hashlib.sha256(head.w.tobytes() + np.float64(head.b).tobytes()).hexdigest()[:10]
    tag = f"L{head.layer}-B{head.block}-M{head.margin_blocks}-{weights}"

    def cache(t: float) -> Path:
        return exits_dir / f"skim-layerwise-dev-v{version}-{n_questions or 'all'}-{rule}-{tag}-tau{t:g}.npz"

    result: dict[float, dict[str, np.ndarray]] = {}
    for t in taus:
        if cache(t).is_file():
            with np.load(cache(t)) as d:
                result[t] = {k: d[k] for k in d.files}
    todo = [t for t in taus if t not in result]
    if not todo:
        return result
    multi, tokenizer, config, _ = load_exits(exits_dir)
    ds, examples = dev_questions(version, n_questions, data_dir)
    feats = build_features(
        examples, tokenizer, config["max_seq_len"], config["doc_stride"], config["max_query_len"]
    )
    logits = skim_exit_logits(multi, feats, head, todo)
    for t in todo:
        o = logits.pop(t)
        stats = layerwise_question_stats(examples, feats, o["start"].transpose(1, 0, 2),
                                         o["end"].transpose(1, 0, 2), ds.raw, version, rule=rule)  # fmt: skip
        arrays = {k: np.asarray(v) for k, v in stats.items() if k != "predictions"}
        arrays["kept_share"] = question_kept_share(o["kept"], feats)
        np.savez(cache(t), **arrays)
        result[t] = arrays
    return result


def question_kept_share(kept: np.ndarray, features: QAFeatures) -> np.ndarray:
    """Per question: kept tokens / real tokens over its windows."""
    q = int(features.example_index.max()) + 1 if len(features) else 0
    kept_sum = np.bincount(features.example_index, weights=kept, minlength=q)
    total = np.bincount(features.example_index, weights=features.lengths, minlength=q)
    return kept_sum / np.maximum(total, 1)
