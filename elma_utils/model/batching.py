"""Length-bucketed batches: pad each batch only to what its longest row needs.

Most SQuAD windows are far shorter than 384 tokens, so padding every batch to the
maximum wastes most of the compute on a CPU. Rows are grouped by length (within large
shuffled chunks, so batches stay random) and each batch is cut to a multiple of
``bucket`` tokens, which keeps the number of distinct shapes (and graph retraces) small.
The plan is a plain list, so a resumed run can start at any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from elma_utils.squad.features import QAFeatures


@dataclass(frozen=True)
class Batch:
    rows: np.ndarray
    length: int


def pad_length(n: int, bucket: int, max_len: int) -> int:
    return int(min(max_len, -(-n // bucket) * bucket))


def plan_batches(
    lengths: np.ndarray,
    batch_size: int,
    max_len: int,
    *,
    shuffle: bool,
    seed: int = 0,
    bucket: int = 64,
    drop_remainder: bool = False,
    sort_chunk: int = 64,
) -> list[Batch]:
    """Rows grouped into batches of similar length; deterministic for a seed."""
    n = len(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if shuffle else np.arange(n)
    chunk = batch_size * sort_chunk if shuffle else n
    batches: list[Batch] = []
    for c0 in range(0, n, chunk):
        idx = order[c0 : c0 + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        for b0 in range(0, len(idx), batch_size):
            rows = idx[b0 : b0 + batch_size]
            if drop_remainder and len(rows) < batch_size:
                continue
            batches.append(Batch(rows, pad_length(int(lengths[rows].max()), bucket, max_len)))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def training_plan(lengths: np.ndarray, batch_size: int, max_len: int, steps: int, seed: int) -> list[Batch]:
    """Enough shuffled epochs of batches for ``steps`` optimizer steps.

    Full batches only, unless an epoch would make none (fewer rows than ``batch_size``, e.g.
    a growth run on a handful of stored questions): then that epoch keeps its smaller
    batches, instead of making no batch at all in a loop that never ends.
    """
    if steps > 0 and len(lengths) == 0:
        raise ValueError("no training rows: nothing to plan batches from")
    plan: list[Batch] = []
    epoch = 0
    while len(plan) < steps:
        options = {"shuffle": True, "seed": seed + epoch}
        batches = plan_batches(lengths, batch_size, max_len, drop_remainder=True, **options)
        plan.extend(batches or plan_batches(lengths, batch_size, max_len, drop_remainder=False, **options))
        epoch += 1
    return plan[:steps]


def batch_arrays(features: QAFeatures, batch: Batch, with_labels: bool = True):
    """(inputs dict, labels dict) of NumPy arrays for one planned batch."""
    x = features.model_inputs(batch.rows, batch.length)
    if not with_labels:
        return x
    y = {
        "start_logits": features.start_positions[batch.rows],
        "end_logits": features.end_positions[batch.rows],
    }
    return x, y


def tf_dataset(features: QAFeatures, plan: list[Batch]):
    """tf.data pipeline over a batch plan (TensorFlow backend)."""
    import tensorflow as tf

    def gen():
        for b in plan:
            yield batch_arrays(features, b)

    spec_x = {k: tf.TensorSpec((None, None), tf.int32) for k in ("token_ids", "segment_ids", "padding_mask")}
    spec_y = {k: tf.TensorSpec((None,), tf.int32) for k in ("start_logits", "end_logits")}
    return tf.data.Dataset.from_generator(gen, output_signature=(spec_x, spec_y)).prefetch(4)


def py_dataset(features: QAFeatures, plan: list[Batch]):
    """The same batches as a keras.utils.PyDataset (JAX / torch back ends)."""
    import keras

    class _Plan(keras.utils.PyDataset):
        def __len__(self):
            return len(plan)

        def __getitem__(self, i):
            return batch_arrays(features, plan[i])

    return _Plan()
