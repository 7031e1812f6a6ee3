"""Learning-rate schedule used for fine-tuning: linear warm-up, then linear decay to 0."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="elma")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak: float, total_steps: int, warmup_steps: int):
        self.peak = float(peak)
        self.total_steps = int(max(total_steps, 1))
        self.warmup_steps = int(max(warmup_steps, 0))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / float(max(self.warmup_steps, 1))
        decay_len = float(max(self.total_steps - self.warmup_steps, 1))
        decay = self.peak * ops.maximum(0.0, 1.0 - (step - self.warmup_steps) / decay_len)
        return ops.where(step < self.warmup_steps, warm, decay)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def adamw(peak_lr: float, total_steps: int, warmup_steps: int, weight_decay: float) -> keras.optimizers.AdamW:
    """AdamW with the schedule, gradient clipping, and no decay on biases and LayerNorm."""
    opt = keras.optimizers.AdamW(
        learning_rate=WarmupLinearDecay(peak_lr, total_steps, warmup_steps),
        weight_decay=weight_decay,
        epsilon=1e-6,
        global_clipnorm=1.0,
    )
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "layer_norm"])
    return opt
