"""Skimming in the loop: fine-tune the layers after the skim layer on the positions it keeps.

    python -m elma_utils.early_exit.skim_finetune --exits artifacts/minilm-cpu-exits-distill \\
        --layer 2 --out artifacts/minilm-cpu-exits-skimtuned-L2 [--epochs 0.5] [--taus 0.7,0.8]

A skim head trained on a frozen model (``skim_model.train_skim_head``) drops passage blocks,
but the layers after it were trained on whole windows: on the shorter sequence they lose
accuracy, which is what holds width back within a 1-F1 budget. Block-Skim (arXiv 2112.08560)
trains the model with skimming in the loop; this does the same after the fact:

- layers 1..s, their exits and so the head's input stay frozen (the head stays valid);
- each batch runs layers 1..s once, the head keeps blocks at a keep threshold drawn per batch
  from ``taus`` (so one model serves the whole calibration sweep), and layers s+1..K and
  their exits learn on the kept positions;
- the target is the full, unskimmed model's answer distribution (the last exit of the
  original weights, computed once before training), KL at temperature T over the kept
  positions, plus the label's cross-entropy where the label survived the skim (uniform
  weights over exits, as ``joint_distill``);
- no dropout (a short distillation), so a run resumed from its checkpoint (every
  ``checkpoint_every`` steps: weights, optimizer state, step) replays the same steps.

The result is an exits artifact like any other (``exits.json`` says ``mode: skim_finetune``)
with the head it was tuned for at ``adaptive/L<s>/skim.npz``, so
``python -m elma_utils.bench.adaptive_run --exits <out> --layers <s>`` calibrates and
measures it without training another head. TensorFlow back end (a GradientTape loop).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from elma_utils.early_exit.skim import NEG_INF, SKIM_FILE, SkimHead, gather_rows

MODE = "skim_finetune"
CHECKPOINT = "skim-finetune-checkpoint.npz"
LOG = "skim-finetune-log.csv"
DEFAULT_TAUS = (0.7, 0.75, 0.8, 0.85)  # where MiniLM's heads keep ~50-20 % of the blocks (adaptive_run)


def kept_label(positions: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Index of each row's label among its kept ``positions`` [B, L'] (-1: the skim dropped it)."""
    hit = positions == np.asarray(label)[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int32)


def skimmed_targets(
    positions: np.ndarray,
    teacher_start: np.ndarray,
    teacher_end: np.ndarray,
    start_label: np.ndarray,
    end_label: np.ndarray,
) -> dict[str, np.ndarray]:
    """The teacher's logits and the labels moved onto the kept positions (padding: NEG_INF, -1)."""
    return {
        "teacher_start": gather_rows(np.asarray(teacher_start, np.float32), positions, NEG_INF),
        "teacher_end": gather_rows(np.asarray(teacher_end, np.float32), positions, NEG_INF),
        "start_label": kept_label(positions, start_label),
        "end_label": kept_label(positions, end_label),
    }


def distill_loss(logits, teacher_logits, label, alpha: float, temperature: float):
    """Mean over rows and exits of alpha·CE(label) (rows whose label was kept) + (1 - alpha)·KL.

    ``logits`` [B, E, L'] (E exits), ``teacher_logits`` [B, L'], ``label`` [B] (-1: dropped)."""
    from keras import ops

    t = float(temperature)
    teacher = ops.softmax(ops.cast(teacher_logits, "float32") / t, axis=-1)[:, None, :]
    log_p = ops.log_softmax(logits / t, axis=-1)
    kl = ops.sum(teacher * (ops.log(teacher + 1e-12) - log_p), axis=-1) * t**2  # [B, E]
    kept = ops.cast(ops.greater_equal(label, 0), "float32")
    one_hot = ops.one_hot(ops.maximum(label, 0), ops.shape(logits)[-1])[:, None, :]
    ce = -ops.sum(one_hot * ops.log_softmax(logits, axis=-1), axis=-1) * kept[:, None]
    return ops.mean(alpha * ce + (1.0 - alpha) * kl)


def _trained_parts(model, layer: int) -> list:
    """Layers layer+1..K and their exits (BERT-style backbones: one layer object per depth)."""
    from elma_utils.model.backbones import is_albert

    if is_albert(model.backbone):
        raise ValueError(
            "ALBERT shares one layer across depths: its layers after the skim cannot be tuned alone"
        )
    return [model.backbone.transformer_layers[i] for i in range(layer, model.num_exits)] + list(
        model.exit_heads[layer:]
    )


def _save_checkpoint(path: Path, step: int, variables: list, optimizer, recipe: dict) -> None:
    from elma_utils.atomic_files import write_bytes_atomic

    buf = io.BytesIO()
    arrays = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(variables)}
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    np.savez(buf, step=np.int64(step), recipe=np.array(json.dumps(recipe, sort_keys=True)), **arrays)
    write_bytes_atomic(path, buf.getvalue())


def _load_checkpoint(path: Path, variables: list, optimizer, recipe: dict) -> int:
    """Restore weights and optimizer state; returns the steps already done (0: none).

    The checkpoint records the run's recipe (taus, steps, batch, learning rate, …): resuming
    it with another one would silently mix two runs, so that is refused."""
    if not path.is_file():
        return 0
    with np.load(path) as d:
        saved = json.loads(str(d["recipe"])) if "recipe" in d.files else None
        if saved != json.loads(json.dumps(recipe, sort_keys=True)):
            changed = sorted(k for k in recipe if saved is None or saved.get(k) != recipe[k])
            raise ValueError(f"{path} was written with other settings ({', '.join(changed) or 'unrecorded'}): "
                             "rerun with the same ones, or delete it to start over")  # fmt: skip
        n_opt = sum(1 for k in d.files if k.startswith("o"))
        if sum(1 for k in d.files if k.startswith("v")) != len(variables) or n_opt != len(
            optimizer.variables
        ):
            raise ValueError(f"{path} was written for another model or layer: delete it to start over")
        for i, v in enumerate(variables):
            v.assign(d[f"v{i}"])
        for i, v in enumerate(optimizer.variables):
            v.assign(d[f"o{i}"])
        return int(d["step"])


def finetune_with_skim(
    model,
    head: SkimHead,
    features,
    *,
    steps: int,
    taus: tuple[float, ...] = DEFAULT_TAUS,
    batch_size: int = 32,
    learning_rate: float = 3e-5,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    alpha: float = 0.5,
    temperature: float = 2.0,
    seed: int = 13,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model``'s layers and exits after ``head.layer`` in place (see the module note).

    ``features``: training windows with labels. ``stop_after``: leave after that many steps
    of this call (a checkpoint is written), as a killed run would. Returns training facts."""
    import keras
    import tensorflow as tf

    from elma_utils.early_exit.skim_model import SkimmedForward, exits_after, skim_batch
    from elma_utils.model.batching import batch_arrays, training_plan
    from elma_utils.model.exit_training import predict_exit_logits
    from elma_utils.model.schedule import adamw

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "skimming in the loop trains with a TensorFlow GradientTape: set KERAS_BACKEND=tensorflow"
        )
    s, k = int(head.layer), model.num_exits
    if not 1 <= s < k:
        raise ValueError(f"skim layer {s} must lie in 1..{k - 1} for a model with {k} exits")
    taus = tuple(float(t) for t in taus)
    if not taus or any(not 0.0 < t <= 1.0 for t in taus):
        raise ValueError(f"keep thresholds must lie in (0, 1], got {taus}")
    parts = _trained_parts(model, s)
    model.trainable = True
    for layer in model.backbone.transformer_layers[:s] + model.exit_heads[:s]:
        layer.trainable = False
    for part in parts:
        part.trainable = True
    variables = [v for part in parts for v in part.trainable_variables]

    start_t, end_t = predict_exit_logits(model, features, batch_size=batch_size, progress=progress)
    teacher_start, teacher_end = start_t[:, -1].copy(), end_t[:, -1].copy()
    del start_t, end_t
    plan = training_plan(features.lengths, batch_size, features.max_seq_len, int(steps), seed)
    optimizer = adamw(learning_rate, int(steps), int(warmup_fraction * steps), weight_decay)
    optimizer.build(variables)
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    recipe = {"taus": list(taus), "steps": int(steps), "batch_size": int(batch_size), "seed": int(seed),
              "learning_rate": float(learning_rate), "alpha": float(alpha), "temperature": float(temperature),
              "skim_layer": s, "windows": len(features)}  # fmt: skip
    done = _load_checkpoint(ckpt, variables, optimizer, recipe) if ckpt else 0
    fwd = SkimmedForward(model, s)
    spec = [tf.TensorSpec((None, None, None), tf.float32)] + [tf.TensorSpec((None, None), tf.int32)] * 2
    spec += [tf.TensorSpec((None, None), tf.float32)] * 2 + [tf.TensorSpec((None,), tf.int32)] * 2

    @tf.function(input_signature=spec)
    def train_step(hidden, pad, seg, t_start, t_end, l_start, l_end):
        with tf.GradientTape() as tape:
            start, end = exits_after(model, s, hidden, pad, seg, training=False)
            loss = 0.5 * (distill_loss(start, t_start, l_start, alpha, temperature)
                          + distill_loss(end, t_end, l_end, alpha, temperature))  # fmt: skip
        grads = tape.gradient(loss, [v.value for v in variables])
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    log_path = Path(checkpoint_dir) / LOG if checkpoint_dir else None
    if log_path and not done:
        log_path.write_text("step,tau,loss,kept_share,label_kept\n")
    t0, losses = time.time(), []
    last = int(steps) if stop_after is None else min(int(steps), done + int(stop_after))
    bar = tqdm(
        range(done, last), desc=f"skim fine-tune (layers {s + 1}-{k})", disable=not progress, unit="step"
    )
    for step in bar:
        b = plan[step]
        tau = taus[np.random.default_rng([seed, step]).integers(len(taus))]
        x, y = batch_arrays(features, b)
        hidden = np.asarray(fwd.front(x["token_ids"], x["segment_ids"], x["padding_mask"])[0], np.float32)
        pos, h, pad, seg = skim_batch(head.with_settings(tau=tau), hidden, features.offsets[b.rows, : b.length],
                                      features.lengths[b.rows], x["segment_ids"])  # fmt: skip
        t = skimmed_targets(
            pos, teacher_start[b.rows], teacher_end[b.rows], y["start_logits"], y["end_logits"]
        )
        loss = float(train_step(h, pad.astype(np.int32), seg.astype(np.int32), t["teacher_start"],
                                t["teacher_end"], t["start_label"], t["end_label"]))  # fmt: skip
        losses.append(loss)
        share = float(pad.sum() / max(int(features.lengths[b.rows].sum()), 1))
        label_kept = float(np.mean((t["start_label"] >= 0) & (t["end_label"] >= 0)))
        bar.set_postfix(loss=f"{loss:.3f}", kept=f"{share:.2f}")
        if log_path:
            with log_path.open("a") as f:
                f.write(f"{step + 1},{tau:g},{loss:.5f},{share:.4f},{label_kept:.4f}\n")
        if ckpt and ((step + 1) % int(checkpoint_every) == 0 or step + 1 == last):
            _save_checkpoint(ckpt, step + 1, variables, optimizer, recipe)
    return {
        "steps": int(steps),
        "steps_done": last,
        "resumed_from_step": done,
        "finished": last >= int(steps),
        "seconds_this_run": round(time.time() - t0, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "taus": list(taus),
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "alpha": alpha,
        "temperature": temperature,
        "train_windows": len(features),
    }


def finetune_exits(
    exits_dir: Path,
    head_path: Path,
    out_dir: Path,
    *,
    epochs: float = 0.5,
    max_windows: int | None = None,
    data_dir: Path | None = None,
    stop_after: int | None = None,
    **kwargs,
) -> Path:
    """``finetune_with_skim`` on an exits artifact and its profile's training questions; writes
    the tuned exits artifact to ``out_dir`` (resuming from its checkpoint) and returns it."""
    from elma_utils import config as cfg
    from elma_utils.early_exit.exits_artifact import (
        EXITS_CONFIG,
        EXITS_WEIGHTS,
        full_model_entry,
        full_model_path,
    )
    from elma_utils.early_exit.experiment import load_exits
    from elma_utils.model.finetune import training_examples
    from elma_utils.squad.features import cached_features

    exits_dir, out_dir = Path(exits_dir), Path(out_dir)
    if (out_dir / EXITS_WEIGHTS).is_file():
        return out_dir
    head = SkimHead.load(head_path)
    multi, tokenizer, config, ecfg = load_exits(exits_dir)
    if head.w.size != int(multi.backbone.hidden_dim):
        raise ValueError(f"{head_path}: a head of size {head.w.size} does not fit {exits_dir} "
                         f"(hidden size {multi.backbone.hidden_dim})")  # fmt: skip
    profile = cfg.Profile(**config["profile"])
    feats = cached_features(training_examples(profile, data_dir), tokenizer, cfg.cache_dir(),
                            max_seq_len=config["max_seq_len"], doc_stride=config["doc_stride"],
                            max_query_len=config["max_query_len"])  # fmt: skip
    if max_windows is not None and max_windows < len(feats):
        rows = np.random.default_rng(kwargs.get("seed", 13)).choice(len(feats), max_windows, replace=False)
        feats = feats.subset(np.sort(rows))
    kwargs.setdefault("batch_size", profile.batch_size)
    steps = max(1, int(round(len(feats) / kwargs["batch_size"] * epochs)))
    out_dir.mkdir(parents=True, exist_ok=True)
    info = finetune_with_skim(multi, head, feats, steps=steps, checkpoint_dir=out_dir, stop_after=stop_after,
                              **kwargs)  # fmt: skip
    if not info["finished"]:
        return out_dir
    multi.save_weights(out_dir / EXITS_WEIGHTS)
    head_copy = out_dir / "adaptive" / f"L{head.layer}" / SKIM_FILE
    head_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(head_path, head_copy)
    (out_dir / EXITS_CONFIG).write_text(json.dumps({
        **full_model_entry(full_model_path(exits_dir, ecfg), out_dir), "mode": MODE, "num_exits": multi.num_exits, "train": info,
        "epochs": epochs, "learning_rate": info["learning_rate"], "init_exits": str(exits_dir),
        "hard_negative_ratio": ecfg.get("hard_negative_ratio", 0.0),
        "skim_head": {"source": str(head_path), **head.settings()},
    }, indent=2))  # fmt: skip
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exits", type=Path, required=True, help="exits artifact to start from")
    p.add_argument(
        "--layer", type=int, default=None, help="skim layer (head: <exits>/adaptive/L<layer>/skim.npz)"
    )
    p.add_argument("--head", type=Path, default=None, help="skim head file (instead of --layer)")
    p.add_argument("--out", type=Path, required=True, help="directory of the tuned exits artifact")
    p.add_argument("--epochs", type=float, default=0.5, help="share of an epoch of the training windows")
    p.add_argument("--max-windows", type=int, default=None, help="train on a random subset of windows")
    p.add_argument(
        "--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS), help="keep thresholds, one per batch"
    )
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable checkpoints")
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    if (args.layer is None) == (args.head is None):
        p.error("give exactly one of --layer and --head")
    head = args.head or args.exits / "adaptive" / f"L{args.layer}" / SKIM_FILE
    if not (args.exits / "exits.json").is_file():
        p.error(f"{args.exits} is no exits artifact (no exits.json): train exits first (notebook 03)")
    if not head.is_file():
        p.error(
            f"no skim head at {head}: run python -m elma_utils.bench.adaptive_run --exits {args.exits} first"
        )
    try:
        taus = tuple(float(t) for t in args.taus.split(","))
        SkimHead.load(head)
    except ValueError as err:
        p.error(str(err))
    out = finetune_exits(args.exits, head, args.out, epochs=args.epochs, max_windows=args.max_windows,
                         data_dir=args.data_dir, taus=taus, learning_rate=args.learning_rate,
                         checkpoint_every=args.checkpoint_every)  # fmt: skip
    print(f"tuned exits: {out} (measure: python -m elma_utils.bench.adaptive_run --exits {out} "
          f"--layers {SkimHead.load(head).layer} --out-dir reports)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
