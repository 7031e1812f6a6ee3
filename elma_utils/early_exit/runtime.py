"""Layer-by-layer inference that computes nothing after a question exits.

``EarlyExitRunner`` runs the embeddings, then one transformer layer and its exit head at a
time. After each layer every still-running question asks the policy whether to stop; the
rows of questions that stop leave the batch, so the next layer only computes the rest
(published early-exit code supports batch size 1 only). A question that no layer settles
is returned ``solved=False`` with the last layer's answer, for the caller to offload.

The per-layer steps are compiled once per shape on TensorFlow (``tf.function``); on other
back ends they run as plain Keras calls.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from elma_utils.early_exit.entropy import answer_space
from elma_utils.early_exit.policies import EarlyExitAnswer, ExitPolicy, LayerOutput
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.qa_model import answer_space_mask
from elma_utils.squad.features import QAFeatures


def _compile(fn):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    return fn


class EarlyExitRunner:
    """Answer questions with a multi-exit model, stopping each at its exit layer."""

    def __init__(
        self,
        model: MultiExitQAModel,
        policy: ExitPolicy,
        rule: str = "max",
        null_threshold: float | list[float] | None = None,
    ):
        self.model = model
        self.policy = policy
        self.rule = rule
        self.null_threshold = null_threshold
        enc = model.encoder

        def embed(token_ids, segment_ids):
            return enc.embed(token_ids, segment_ids, training=False)

        self._embed = _compile(embed)
        self._layers = []
        for i in range(model.num_exits):

            def step(x, padding_mask, segment_ids, i=i):
                x = enc.layer(i, x, padding_mask, training=False)
                s, e = model.exit_heads[i](x, answer_space_mask(segment_ids, padding_mask))
                return x, s, e

            self._layers.append(_compile(step))

    def run(self, examples: list, features: QAFeatures, length: int | None = None) -> list[EarlyExitAnswer]:
        """Answers for ``examples`` whose windows are ``features`` (all computed as one batch)."""
        length = length or int(features.lengths.max())
        inputs = features.model_inputs(np.arange(len(features)), length)
        mask = answer_space(features.offsets[:, :length], include_cls=True)
        rows_of = [np.nonzero(features.example_index == i)[0] for i in range(len(examples))]
        x = self._embed(inputs["token_ids"], inputs["segment_ids"])
        active = np.arange(len(features))  # rows still computing
        history: dict[int, list[LayerOutput]] = {i: [] for i in range(len(examples))}
        answers: dict[int, EarlyExitAnswer] = {}
        for layer in range(self.model.num_exits):
            x, s, e = self._layers[layer](x, inputs["padding_mask"][active], inputs["segment_ids"][active])
            s, e = np.asarray(s, np.float32), np.asarray(e, np.float32)
            position = {row: k for k, row in enumerate(active)}
            keep = np.ones(len(active), dtype=bool)
            last = layer == self.model.num_exits - 1
            for ex_i in {int(features.example_index[r]) for r in active}:
                rows = rows_of[ex_i]
                local = [position[r] for r in rows]
                out = LayerOutput.from_logits(
                    layer + 1,
                    s[local],
                    e[local],
                    mask[rows],
                    offsets=features.offsets[rows, :length],
                    context=examples[ex_i].context,
                    rule=self.rule,
                    null_threshold=self.null_threshold,
                )
                history[ex_i].append(out)
                decision = self.policy.decide(history[ex_i])
                if decision is not None or last:
                    answers[ex_i] = _answer(out, solved=decision is not None, history=history[ex_i])
                    keep[local] = False
            active = active[keep]
            if not len(active):
                break
            x = _take_rows(x, keep)
        return [answers[i] for i in range(len(examples))]


def _take_rows(x, keep: np.ndarray):
    from keras import ops

    return ops.take(x, np.nonzero(keep)[0], axis=0)


def _answer(out: LayerOutput, solved: bool, history: list[LayerOutput]) -> EarlyExitAnswer:
    c0, c1 = out.best_span
    return EarlyExitAnswer(
        text=out.text or "",
        char_start=int(c0),
        char_end=int(c1),
        exit_layer=out.layer,
        solved=solved,
        entropy=float(out.entropy),
        null_diff=float(out.null_diff or 0.0),
        entropies=[float(h.entropy) for h in history],
    )


def timed_run(
    runner: EarlyExitRunner, examples: list, features: QAFeatures
) -> tuple[list[EarlyExitAnswer], float]:
    t0 = time.perf_counter()
    answers = runner.run(examples, features)
    return answers, time.perf_counter() - t0
