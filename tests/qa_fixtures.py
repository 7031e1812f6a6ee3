"""Tiny real QA models for tests: a saved full-model artifact and an edge bundle from it.

Random weights (seeded), real code paths: the artifact loads with ``QAModel.load``, the
bundle with ``EdgeModel.load``; answers are deterministic, so tests compare the server's
answers with ``QAModel`` run directly.
"""

from __future__ import annotations

from pathlib import Path

import keras

from elma_utils.model import artifacts
from elma_utils.model.backbones import TINY_BERT, build_bert_backbone
from elma_utils.model.qa_model import SpanQAModel

TINY_WINDOWS = {"max_seq_len": 96, "doc_stride": 48, "max_query_len": 24}


class StopAfterChunks(keras.callbacks.Callback):
    """Interrupt a chunked (checkpointed) fit after ``chunks`` chunks, as a killed run would."""

    def __init__(self, chunks: int):
        super().__init__()
        self.chunks = chunks

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.chunks:
            raise KeyboardInterrupt


def tiny_span_model(seed: int = 0, num_layers: int = 2) -> SpanQAModel:
    keras.utils.set_random_seed(seed)
    model = SpanQAModel(build_bert_backbone(dropout=0.0, **{**TINY_BERT, "num_layers": num_layers}))
    model.build_for()
    return model


def save_tiny_artifact(directory: Path, tokenizer, seed: int = 0, num_layers: int = 2) -> Path:
    """A full-model artifact (``artifacts.save_artifact`` layout) with random weights."""
    config = {"backbone": {"kind": "bert", "kwargs": {**TINY_BERT, "num_layers": num_layers}}, **TINY_WINDOWS}
    config["model_version"] = f"tiny-server-{seed}"
    return artifacts.save_artifact(Path(directory), tiny_span_model(seed, num_layers), tokenizer, config)


def save_tiny_exits(
    root: Path, tokenizer, seed: int = 3, num_layers: int = 3, train_examples: int = 40
) -> Path:
    """A tiny BERT saved as a full-model artifact (its profile: smoke with ``train_examples``
    questions) and an exits artifact on it (random weights; the last exit is its QA head)."""
    import dataclasses
    import json

    from elma_utils import config as cfg
    from elma_utils.early_exit.exits_artifact import EXITS_CONFIG, EXITS_WEIGHTS, full_model_entry
    from elma_utils.model.multi_exit import MultiExitQAModel

    profile = dataclasses.replace(cfg.get_profile("smoke"), train_examples=train_examples, **TINY_WINDOWS)
    span = tiny_span_model(seed=seed, num_layers=num_layers)
    config = {"backbone": {"kind": "bert", "kwargs": {**TINY_BERT, "num_layers": num_layers}}, **TINY_WINDOWS,
              "profile": dataclasses.asdict(profile), "model_version": f"tiny-exits-{seed}-{num_layers}"}  # fmt: skip
    full = artifacts.save_artifact(Path(root) / "tiny", span, tokenizer, config)
    exits = Path(root) / "tiny-exits-joint"
    exits.mkdir()
    MultiExitQAModel.from_span_model(span).save_weights(exits / EXITS_WEIGHTS)
    (exits / EXITS_CONFIG).write_text(
        json.dumps({**full_model_entry(full, exits), "mode": "joint", "num_exits": num_layers})
    )
    return exits


def write_tiny_bundle(directory: Path, tokenizer, entropy_threshold: float, seed: int = 0) -> Path:
    """An edge bundle (float32, 2 layers) whose policy exits at ``entropy_threshold``."""
    from elma_utils.export.bundle import write_bundle
    from elma_utils.model.multi_exit import MultiExitQAModel

    multi = MultiExitQAModel.from_span_model(tiny_span_model(seed))
    return write_bundle(
        multi,
        tokenizer,
        Path(directory),
        seq_len=TINY_WINDOWS["max_seq_len"],
        precision="float32",
        thresholds={"policy": "entropy", "E_T": entropy_threshold, "rule": "max"},
        model_version=f"tiny-edge-{seed}",
        doc_stride=TINY_WINDOWS["doc_stride"],
        max_query_len=TINY_WINDOWS["max_query_len"],
    )
