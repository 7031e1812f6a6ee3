"""The extractive QA network: a backbone and a start/end span head.

Logits outside the answer space (question, padding) are pushed to -1e4 inside the model,
so that training's softmax and every later entropy only see context tokens and [CLS]
(position 0, the no-answer choice).
"""

from __future__ import annotations

import keras
from keras import ops

NEG_INF = -1e4


def answer_space_mask(segment_ids, padding_mask):
    """1 where an answer may start/end: context tokens and [CLS]; 0 elsewhere."""
    seq = ops.shape(segment_ids)[1]
    is_cls = ops.expand_dims(ops.equal(ops.arange(seq), 0), 0)
    ctx = ops.logical_and(ops.equal(segment_ids, 1), ops.equal(padding_mask, 1))
    return ops.cast(ops.logical_or(ctx, is_cls), "float32")


@keras.saving.register_keras_serializable(package="elma")
class SpanHead(keras.layers.Layer):
    """Hidden states [B, L, H] → masked start and end logits [B, L] each."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(
            2, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02), name="span_logits"
        )

    def build(self, input_shape):
        self.dense.build(input_shape)
        super().build(input_shape)

    def call(self, hidden, mask):
        logits = ops.cast(self.dense(hidden), "float32")
        bias = (1.0 - ops.cast(mask, "float32")) * NEG_INF
        return logits[..., 0] + bias, logits[..., 1] + bias


class SpanQAModel(keras.Model):
    """Backbone + final span head: inputs dict → {"start_logits", "end_logits"}."""

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        backbone.pooled_dense.trainable = False  # the [CLS] pooler takes no part in span prediction
        self.qa_head = SpanHead(name="qa_head")

    def call(self, inputs, training=False):
        hidden = self.backbone(inputs, training=training)["sequence_output"]
        mask = answer_space_mask(inputs["segment_ids"], inputs["padding_mask"])
        start, end = self.qa_head(hidden, mask)
        return {"start_logits": start, "end_logits": end}

    def build_for(self, seq_len: int = 16) -> None:
        """Create every weight by calling the model on a dummy batch."""
        import numpy as np

        ids = np.zeros((1, seq_len), "int32")
        self({"token_ids": ids, "segment_ids": ids, "padding_mask": np.ones_like(ids)})
