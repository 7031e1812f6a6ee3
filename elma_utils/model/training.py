"""Fine-tuning the span QA model: resumable, checkpointed, backend-neutral.

Training is cut into chunks of ``checkpoint_every`` steps (Keras "epochs"). After each
chunk the weights *and* optimizer state are written atomically with the step count, so
an interrupted run resumes at the next chunk with the same data order (the batch plan
is deterministic) instead of starting over.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import keras

from elma_utils.model.batching import py_dataset, tf_dataset, training_plan
from elma_utils.model.schedule import adamw
from elma_utils.squad.features import QAFeatures

CKPT_WEIGHTS = "ckpt.weights.h5"
CKPT_STATE = "state.json"


def span_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compile_for_training(
    model: keras.Model, peak_lr: float, total_steps: int, warmup_steps: int, weight_decay: float
):
    model.compile(
        optimizer=adamw(peak_lr, total_steps, warmup_steps, weight_decay),
        loss={"start_logits": span_loss(), "end_logits": span_loss()},
        loss_weights={"start_logits": 0.5, "end_logits": 0.5},
        jit_compile=False,  # XLA was slower on this CPU (NOTES.md)
    )


class ChunkCheckpoint(keras.callbacks.Callback):
    """Save weights + optimizer state and the number of finished chunks, atomically."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)

    def on_epoch_end(self, epoch, logs=None):
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / ("tmp-" + CKPT_WEIGHTS)
        self.model.save_weights(tmp)
        os.replace(tmp, self.directory / CKPT_WEIGHTS)
        state = {
            "chunks_done": epoch + 1,
            "time": time.time(),
            "logs": {k: float(v) for k, v in (logs or {}).items()},
        }
        tmp_state = self.directory / ("tmp-" + CKPT_STATE)
        tmp_state.write_text(json.dumps(state))
        os.replace(tmp_state, self.directory / CKPT_STATE)


def resume_state(directory: Path) -> int:
    """Chunks already finished by an earlier run (0 when starting fresh)."""
    state = Path(directory) / CKPT_STATE
    if state.is_file() and (Path(directory) / CKPT_WEIGHTS).is_file():
        return int(json.loads(state.read_text())["chunks_done"])
    return 0


def chunk_plan(n_features: int, batch_size: int, epochs: float, checkpoint_every: int) -> tuple[int, int]:
    """(total steps, steps per chunk) for ``epochs`` over ``n_features`` windows, the total
    rounded up to whole chunks of at most ``checkpoint_every`` steps."""
    steps_per_epoch = n_features // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n_features} features cannot fill one batch of {batch_size}")
    total_steps = max(1, int(round(steps_per_epoch * epochs)))
    chunk = max(1, min(checkpoint_every, total_steps))
    return math.ceil(total_steps / chunk) * chunk, chunk


def fit_chunks(
    model: keras.Model,
    features: QAFeatures,
    plan: list,
    chunk: int,
    checkpoint_dir: Path,
    *,
    log_csv: Path | None = None,
    verbose: int | str = "auto",
    extra_callbacks: list | None = None,
) -> dict:
    """Fit a compiled ``model`` on the batch ``plan`` in chunks of ``chunk`` steps, each one
    checkpointed in ``checkpoint_dir``; resumes after the chunks an earlier run finished."""
    n_chunks = len(plan) // chunk
    done = resume_state(checkpoint_dir)
    if done:
        model.optimizer.build(model.trainable_variables)
        model.load_weights(Path(checkpoint_dir) / CKPT_WEIGHTS)
        print(f"resuming after {done}/{n_chunks} chunks ({done * chunk} of {len(plan)} steps)")
    remaining = plan[done * chunk :]
    data = (
        tf_dataset(features, remaining)
        if keras.backend.backend() == "tensorflow"
        else py_dataset(features, remaining)
    )
    callbacks: list[keras.callbacks.Callback] = [ChunkCheckpoint(checkpoint_dir)]
    if log_csv is not None:
        callbacks.append(keras.callbacks.CSVLogger(str(log_csv), append=bool(done)))
    callbacks.extend(extra_callbacks or [])
    t0 = time.time()
    history = None
    if done < n_chunks:
        history = model.fit(
            data,
            epochs=n_chunks,
            initial_epoch=done,
            steps_per_epoch=chunk,
            shuffle=False,  # the batch plan is shuffled and seeded: resuming replays it exactly
            callbacks=callbacks,
            verbose=verbose,
        )
    seconds = time.time() - t0
    losses = history.history.get("loss", []) if history is not None else []
    return {
        "total_steps": len(plan),
        "steps_this_run": len(remaining),
        "resumed_from_step": done * chunk,
        "train_features": len(features),
        "seconds_this_run": round(seconds, 1),
        "features_per_second": round(sum(b.rows.size for b in remaining) / max(seconds, 1e-9), 2),
        "final_loss": float(losses[-1]) if losses else None,
    }


def fit_span_model(
    model: keras.Model,
    features: QAFeatures,
    *,
    batch_size: int,
    epochs: float,
    learning_rate: float,
    warmup_fraction: float,
    weight_decay: float,
    checkpoint_every: int,
    checkpoint_dir: Path,
    seed: int = 13,
    log_csv: Path | None = None,
    verbose: int | str = "auto",
    extra_callbacks: list | None = None,
) -> dict:
    """Train ``model`` on ``features``; resumes from ``checkpoint_dir`` when it holds a run."""
    total_steps, chunk = chunk_plan(len(features), batch_size, epochs, checkpoint_every)
    plan = training_plan(features.lengths, batch_size, features.max_seq_len, total_steps, seed)
    compile_for_training(model, learning_rate, total_steps, int(warmup_fraction * total_steps), weight_decay)
    stats = fit_chunks(model, features, plan, chunk, checkpoint_dir, log_csv=log_csv, verbose=verbose,
                       extra_callbacks=extra_callbacks)  # fmt: skip
    stats.pop("final_loss")
    return {**stats, "batch_size": batch_size}
