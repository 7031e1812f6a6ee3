"""A span head after every transformer layer: the network behind early exit.

``MultiExitQAModel`` runs the backbone layer by layer (``LayerwiseEncoder``) and returns
the start/end logits of every exit, stacked: ``[batch, exits, seq]``. The last exit of a
model that keeps every layer *is* the fine-tuned model's QA head (its weights are copied
in), so exit K reproduces the full model exactly. An edge model keeps only the first
``num_exits`` layers; its last exit is an ordinary trained exit head.

Training modes (``exit_loss``):
- ``two_stage`` (DeeBERT): backbone and final head frozen; each exit learns from the labels.
- ``joint`` (PABEE): everything trains on a weighted sum of exit losses (weight ∝ layer).
- ``distill``: backbone frozen; each exit learns from the labels and from the final
  layer's start/end distributions (KL, temperature ``T``), a self-distillation that gives
  early exits the final layer's calibrated uncertainty.
- ``joint_distill``: the backbone trains too (small learning rate), every exit on labels +
  self-distillation with uniform weights, so the early *layers* learn to answer, not only
  their heads. Meant to start from a ``distill`` artifact (``init_exits``).
"""

from __future__ import annotations

import keras
from keras import ops

from elma_utils.model.backbones import LayerwiseEncoder
from elma_utils.model.qa_model import SpanHead, SpanQAModel, answer_space_mask

EXIT_MODES = ("two_stage", "joint", "distill", "joint_distill")
BACKBONE_TRAINING_MODES = ("joint", "joint_distill")
DISTILL_MODES = ("distill", "joint_distill")


class MultiExitQAModel(keras.Model):
    """Backbone + one span head per kept layer; outputs stacked exit logits."""

    def __init__(self, backbone: keras.Model, num_exits: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        backbone.pooled_dense.trainable = False
        self.encoder = LayerwiseEncoder(backbone)
        self.num_exits = int(num_exits or self.encoder.num_layers)
        if not 1 <= self.num_exits <= self.encoder.num_layers:
            raise ValueError(f"num_exits must be in 1..{self.encoder.num_layers}, got {self.num_exits}")
        self.exit_heads = [SpanHead(name=f"exit_{i + 1}") for i in range(self.num_exits)]

    def call(self, inputs, training=False):
        mask = answer_space_mask(inputs["segment_ids"], inputs["padding_mask"])
        x = self.encoder.embed(inputs["token_ids"], inputs["segment_ids"], training=training)
        starts, ends = [], []
        for i in range(self.num_exits):
            x = self.encoder.layer(i, x, inputs["padding_mask"], training=training)
            s, e = self.exit_heads[i](x, mask)
            starts.append(s)
            ends.append(e)
        return {"start_logits": ops.stack(starts, axis=1), "end_logits": ops.stack(ends, axis=1)}

    def build_for(self, seq_len: int = 16) -> None:
        import numpy as np

        ids = np.zeros((1, seq_len), "int32")
        self({"token_ids": ids, "segment_ids": ids, "padding_mask": np.ones_like(ids)})

    @classmethod
    def from_span_model(cls, span_model: SpanQAModel, num_exits: int | None = None) -> MultiExitQAModel:
        """Share the fine-tuned backbone; the final exit takes the QA head's weights."""
        model = cls(span_model.backbone, num_exits)
        model.build_for()
        if model.num_exits == model.encoder.num_layers:
            model.exit_heads[-1].set_weights(span_model.qa_head.get_weights())
        return model

    def set_trainable_for(self, mode: str) -> None:
        """Freeze what a training mode must not change."""
        if mode not in EXIT_MODES:
            raise ValueError(f"unknown exit training mode {mode!r}; choose one of {EXIT_MODES}")
        full_depth = self.num_exits == self.encoder.num_layers
        trains_backbone = mode in BACKBONE_TRAINING_MODES
        self.backbone.trainable = trains_backbone
        self.backbone.pooled_dense.trainable = False
        for head in self.exit_heads[:-1]:
            head.trainable = True
        self.exit_heads[-1].trainable = trains_backbone or not full_depth


class ExitLoss(keras.losses.Loss):
    """Cross-entropy of every exit against the label, plus optional distillation.

    ``y_pred`` is [batch, exits, seq] logits, ``y_true`` the label index [batch].
    Weights: uniform (two_stage, distill, joint_distill) or ∝ exit number (joint, as PABEE).
    Distillation: KL(teacher ‖ exit) at temperature T, teacher = the last exit, no gradient.
    """

    def __init__(
        self,
        num_exits: int,
        mode: str = "two_stage",
        alpha: float = 0.5,
        temperature: float = 2.0,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(name=name or f"exit_loss_{mode}", **kwargs)
        if mode not in EXIT_MODES:
            raise ValueError(f"unknown exit training mode {mode!r}; choose one of {EXIT_MODES}")
        self.num_exits, self.mode, self.alpha, self.temperature = num_exits, mode, alpha, temperature
        w = [float(i + 1) for i in range(num_exits)] if mode == "joint" else [1.0] * num_exits
        self.weights = [x / sum(w) for x in w]

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        total = 0.0
        teacher = None
        if self.mode in DISTILL_MODES:
            teacher = ops.stop_gradient(ops.softmax(y_pred[:, -1] / self.temperature, axis=-1))
        for i in range(self.num_exits):
            logits = y_pred[:, i]
            ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            if teacher is not None and i < self.num_exits - 1:
                log_p = ops.log_softmax(logits / self.temperature, axis=-1)
                kl = ops.sum(teacher * (ops.log(teacher + 1e-12) - log_p), axis=-1) * self.temperature**2
                ce = self.alpha * ce + (1.0 - self.alpha) * kl
            total = total + self.weights[i] * ce
        return total

    def get_config(self):
        return {
            "num_exits": self.num_exits,
            "mode": self.mode,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "name": self.name,
        }
