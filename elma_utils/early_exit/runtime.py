"""Layer-by-layer inference that computes nothing after a question exits.

``EarlyExitRunner`` runs the embeddings, then one transformer layer and its exit head at a
time. After each layer every still-running question asks the policy whether to stop; the
rows of questions that stop leave the batch, so the next layer only computes the rest
(published early-exit code supports batch size 1 only). A question that no layer settles
is returned ``solved=False`` with the last layer's answer, for the caller to offload.

With ``skim`` (a ``SkimHead``, adaptive width) every window still running after layer s keeps
only its own kept positions (``early_exit.skim``); the rows are padded to the longest kept
row with ``padding_mask = 0``, later layers run on that, and their logits go back to the
original positions (``NEG_INF`` where dropped), so answers and entropies are read as before.

The per-layer steps are compiled once per shape on TensorFlow (``tf.function``); on other
back ends they run as plain Keras calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np

from elma_utils.early_exit.entropy import answer_space
from elma_utils.early_exit.policies import EarlyExitAnswer, ExitPolicy, LayerOutput
from elma_utils.early_exit.skim import SkimHead, gather_rows, pad_positions, scatter_logits
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.qa_model import answer_space_mask
from elma_utils.squad.features import QAFeatures


def _compile(fn):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    return fn


@dataclass
class AdaptiveAnswer(EarlyExitAnswer):
    """``EarlyExitAnswer`` plus the share of the question's tokens that went on past the skim
    layer (1.0 without skimming, or when the question exited at or before it)."""

    kept_share: float = 1.0


class EarlyExitRunner:
    """Answer questions with a multi-exit model, stopping each at its exit layer."""

    def __init__(
        self,
        model: MultiExitQAModel,
        policy: ExitPolicy,
        rule: str = "max",
        null_threshold: float | list[float] | None = None,
        skim: SkimHead | None = None,
    ):
        self.model = model
        self.policy = policy
        self.rule = rule
        self.null_threshold = null_threshold
        if skim is not None and not 1 <= skim.layer < model.num_exits:
            raise ValueError(f"skim layer {skim.layer} must lie in 1..{model.num_exits - 1}")
        self.skim = skim
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

    def run(self, examples: list, features: QAFeatures, length: int | None = None) -> list[AdaptiveAnswer]:
        """Answers for ``examples`` whose windows are ``features`` (all computed as one batch)."""
        length = length or int(features.lengths.max())
        inputs = features.model_inputs(np.arange(len(features)), length)
        offsets = features.offsets[:, :length]
        mask = answer_space(offsets, include_cls=True)
        rows_of = [np.nonzero(features.example_index == i)[0] for i in range(len(examples))]
        x = self._embed(inputs["token_ids"], inputs["segment_ids"])
        active = np.arange(len(features))  # rows still computing
        pad, seg = inputs["padding_mask"], inputs["segment_ids"]  # of the active rows
        positions = None  # after the skim: [active, L'] original position of each column (-1: pad)
        kept = features.lengths.astype(np.int64).copy()  # tokens per row past the skim layer
        history: dict[int, list[LayerOutput]] = {i: [] for i in range(len(examples))}
        answers: dict[int, AdaptiveAnswer] = {}
        for layer in range(self.model.num_exits):
            x, s, e = self._layers[layer](x, pad, seg)
            s, e = np.asarray(s, np.float32), np.asarray(e, np.float32)
            if positions is not None:
                s, e = scatter_logits(s, positions, length), scatter_logits(e, positions, length)
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
                    offsets=offsets[rows],
                    context=examples[ex_i].context,
                    rule=self.rule,
                    null_threshold=self.null_threshold,
                )
                history[ex_i].append(out)
                decision = self.policy.decide(history[ex_i])
                if decision is not None or last:
                    share = (
                        float(kept[rows].sum() / features.lengths[rows].sum())
                        if positions is not None
                        else 1.0
                    )
                    answers[ex_i] = _answer(out, decision is not None, history[ex_i], share)
                    keep[local] = False
            active = active[keep]
            if not len(active):
                break
            x, pad, seg = _take_rows(x, keep), pad[keep], seg[keep]
            if positions is not None:
                positions = positions[keep]
            if self.skim is not None and layer + 1 == self.skim.layer:
                hidden = np.asarray(x, dtype=np.float32)
                positions = pad_positions([
                    self.skim.kept_positions(hidden[k], offsets[r], int(features.lengths[r]))
                    for k, r in enumerate(active)
                ])  # fmt: skip
                kept[active] = (positions >= 0).sum(axis=1)
                x = gather_rows(hidden, positions, 0.0)
                pad = (positions >= 0).astype(np.int32)
                seg = gather_rows(np.asarray(seg, dtype=np.int32), positions, 0)
        return [answers[i] for i in range(len(examples))]


def _take_rows(x, keep: np.ndarray):
    from keras import ops

    return ops.take(x, np.nonzero(keep)[0], axis=0)


def _answer(
    out: LayerOutput, solved: bool, history: list[LayerOutput], kept_share: float = 1.0
) -> AdaptiveAnswer:
    c0, c1 = out.best_span
    return AdaptiveAnswer(
        text=out.text or "",
        char_start=int(c0),
        char_end=int(c1),
        exit_layer=out.layer,
        solved=solved,
        entropy=float(out.entropy),
        null_diff=float(out.null_diff or 0.0),
        entropies=[float(h.entropy) for h in history],
        kept_share=kept_share,
    )


def timed_run(
    runner: EarlyExitRunner, examples: list, features: QAFeatures
) -> tuple[list[EarlyExitAnswer], float]:
    t0 = time.perf_counter()
    answers = runner.run(examples, features)
    return answers, time.perf_counter() - t0
