"""Training the exit heads of a fine-tuned model (two-stage, joint or self-distillation)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from elma_utils.model.batching import batch_arrays, plan_batches, py_dataset, tf_dataset, training_plan
from elma_utils.model.multi_exit import ExitLoss, MultiExitQAModel
from elma_utils.model.schedule import adamw
from elma_utils.model.training import chunk_plan, fit_chunks
from elma_utils.squad.features import QAFeatures


def fit_exit_heads(
    model: MultiExitQAModel,
    features: QAFeatures,
    *,
    mode: str = "distill",
    batch_size: int = 32,
    epochs: float = 1.0,
    learning_rate: float = 5e-4,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    seed: int = 13,
    log_csv: Path | None = None,
    verbose: int | str = "auto",
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 100,
    extra_callbacks: list | None = None,
) -> dict:
    """Train ``model``'s exits on ``features`` with one of the modes in ``EXIT_MODES``.

    ``checkpoint_dir``: train in chunks of ``checkpoint_every`` steps, each checkpointed
    there, and resume after the chunks an earlier run finished (long runs, e.g. a whole
    epoch of ``joint_distill`` on a CPU); the total is then rounded up to whole chunks."""
    model.set_trainable_for(mode)
    if checkpoint_dir is not None:
        steps, chunk = chunk_plan(len(features), batch_size, epochs, checkpoint_every)
    else:
        steps = max(1, int(round(len(features) // batch_size * epochs)))
    plan = training_plan(features.lengths, batch_size, features.max_seq_len, steps, seed)
    loss = ExitLoss(model.num_exits, mode)
    model.compile(
        optimizer=adamw(learning_rate, steps, int(warmup_fraction * steps), weight_decay),
        loss={"start_logits": loss, "end_logits": loss},
        loss_weights={"start_logits": 0.5, "end_logits": 0.5},
    )
    if checkpoint_dir is not None:
        stats = fit_chunks(model, features, plan, chunk, Path(checkpoint_dir), log_csv=log_csv, verbose=verbose,
                           extra_callbacks=extra_callbacks)  # fmt: skip
        return {"mode": mode, "steps": steps, "final_loss": stats["final_loss"],
                "resumed_from_step": stats["resumed_from_step"]}  # fmt: skip
    tf_backend = keras.backend.backend() == "tensorflow"
    data = tf_dataset(features, plan) if tf_backend else py_dataset(features, plan)
    callbacks = ([keras.callbacks.CSVLogger(str(log_csv))] if log_csv else []) + list(extra_callbacks or [])
    # the plan is already shuffled (seeded); Keras must not reorder it (it only warns for tf.data)
    history = model.fit(
        data, epochs=1, steps_per_epoch=steps, shuffle=False, callbacks=callbacks, verbose=verbose
    )
    return {"mode": mode, "steps": steps, "final_loss": float(history.history["loss"][-1])}


def predict_exit_logits(
    model: MultiExitQAModel, features: QAFeatures, batch_size: int = 64, progress: bool = True
):
    """Start/end logits of every exit: two arrays [N, exits, L] (float32)."""
    n, seq, k = len(features), features.max_seq_len, model.num_exits
    start = np.full((n, k, seq), -1e4, dtype=np.float32)
    end = np.full((n, k, seq), -1e4, dtype=np.float32)
    for b in tqdm(
        plan_batches(features.lengths, batch_size, seq, shuffle=False),
        desc="all exits",
        disable=not progress,
        unit="batch",
    ):
        out = model.predict_on_batch(batch_arrays(features, b, with_labels=False))
        start[b.rows, :, : b.length] = np.asarray(out["start_logits"], dtype=np.float32)
        end[b.rows, :, : b.length] = np.asarray(out["end_logits"], dtype=np.float32)
    return start, end
