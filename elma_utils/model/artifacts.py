"""A trained model on disk: ``artifacts/<name>/`` with config, weights, tokenizer, metrics.

Layout::

    config.json          backbone kind + arguments, window settings, profile, versions
    model.weights.h5     Keras weights (float32; load on TensorFlow, JAX or torch)
    tokenizer/           tokenizer.json + vocabulary
    metrics.json         training and evaluation numbers
    checkpoints/         resumable training state (removed when training finishes)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras

from elma_utils.model.backbones import TINY_ALBERT, TINY_BERT, build_bert_backbone
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.model.tokenizers import QATokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METRICS_FILE = "metrics.json"
TOKENIZER_DIR = "tokenizer"


ALBERT_ARGS = (
    "vocabulary_size",
    "num_layers",
    "num_heads",
    "embedding_dim",
    "hidden_dim",
    "intermediate_dim",
    "num_groups",
    "num_inner_repetitions",
    "max_sequence_length",
    "num_segments",
)


def build_backbone(
    kind: str,
    kwargs: dict | None = None,
    dropout: float = 0.1,
    pretrained: bool = True,
    source: str | None = None,
):
    """(backbone, kwargs) for a backbone kind: 'minilm', 'tiny-bert', 'bert', 'tiny-albert' or 'albert'.

    ``source`` names pretrained ALBERT weights: a keras-hub preset, a Google checkpoint
    directory or a TF-Hub module (see ``albert_weights.load_albert``). 'tiny-albert' is a
    random ``TINY_ALBERT`` (smoke-albert) unless ``kwargs`` give other sizes.
    """
    if kind == "albert" and source:
        from elma_utils.model.albert_weights import load_albert

        backbone = load_albert(source)
        config = backbone.get_config()
        return backbone, {k: config[k] for k in ALBERT_ARGS if k in config}
    if kind == "minilm" and pretrained:
        from elma_utils.model.minilm import load_bert_backbone_from_hf

        return load_bert_backbone_from_hf(dropout=dropout)
    if kind in ("minilm", "bert", "tiny-bert"):
        kwargs = dict(kwargs or (TINY_BERT if kind == "tiny-bert" else {}))
        if not kwargs:
            raise ValueError(f"backbone {kind!r} needs its arguments when not loading pretrained weights")
        return build_bert_backbone(dropout=dropout, **kwargs), kwargs
    if kind in ("albert", "tiny-albert"):
        from elma_utils.model.albert_weights import build_albert_backbone

        kwargs = dict(kwargs or (TINY_ALBERT if kind == "tiny-albert" else {}))
        if not kwargs:
            raise ValueError(
                "an ALBERT backbone needs pretrained weights (--backbone-source) or its arguments"
            )
        return build_albert_backbone(dropout=dropout, **kwargs), dict(kwargs)
    raise ValueError(f"unknown backbone {kind!r}; use minilm, tiny-bert, bert, tiny-albert or albert")


def backbone_family(kind: str) -> str:
    """'albert' for ALBERT kinds (SentencePiece, a shared layer), 'bert' for the others."""
    return "albert" if kind in ("albert", "tiny-albert") else "bert"


def tokenizer_for(kind: str) -> QATokenizer:
    """ALBERT's 30k SentencePiece model for ALBERT kinds, MiniLM's WordPiece vocabulary otherwise."""
    return QATokenizer.albert() if backbone_family(kind) == "albert" else QATokenizer.minilm()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _without_optimizer(model: SpanQAModel, config: dict) -> SpanQAModel:
    """An uncompiled copy: Keras saves a compiled model's optimizer state with its weights,
    which would triple the artifact's size."""
    if getattr(model, "optimizer", None) is None:
        return model
    b = config["backbone"]
    backbone, _ = build_backbone(b["kind"], b["kwargs"], dropout=b.get("dropout", 0.1), pretrained=False)
    copy = SpanQAModel(backbone)
    copy.build_for()
    copy.set_weights(model.get_weights())
    return copy


def save_artifact(directory: Path, model: SpanQAModel, tokenizer: QATokenizer, config: dict) -> Path:
    """Write weights (no optimizer state), tokenizer assets and config.json atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ("tmp-" + WEIGHTS_FILE)
    _without_optimizer(model, config).save_weights(tmp)
    os.replace(tmp, directory / WEIGHTS_FILE)
    tokenizer.save_assets(directory / TOKENIZER_DIR)
    _write_json(directory / CONFIG_FILE, config)
    return directory


def read_config(directory: Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist (train one with `elma train`)")
    cfg = directory / CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"{directory} is not an ELMA model: {CONFIG_FILE} is missing")
    return json.loads(cfg.read_text())


def load_span_model(directory: Path) -> tuple[SpanQAModel, QATokenizer, dict]:
    """Rebuild the network from config.json and load its weights (no pretrained download)."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: training did not finish or the artifact is incomplete"
        )
    b = config["backbone"]
    backbone, _ = build_backbone(b["kind"], b["kwargs"], dropout=b.get("dropout", 0.1), pretrained=False)
    model = SpanQAModel(backbone)
    model.build_for()
    model.load_weights(weights)
    return model, QATokenizer.from_assets(directory / TOKENIZER_DIR), config


def update_metrics(directory: Path, section: str, values: dict) -> dict:
    """Merge ``values`` under ``section`` into metrics.json (created when missing)."""
    path = Path(directory) / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics[section] = values
    _write_json(path, metrics)
    return metrics


def keras_backend() -> str:
    return keras.backend.backend()
