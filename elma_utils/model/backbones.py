"""keras-hub backbones and a layer-by-layer view of them.

The early-exit work needs every layer's hidden states and the ability to stop after
any layer. keras-hub's functional graphs only expose the last layer (and ALBERT calls
one shared layer many times), so ``LayerwiseEncoder`` rebuilds the forward pass from the
backbone's own sublayers: embeddings first, then one transformer step per layer.
"""

from __future__ import annotations

import keras
import keras_hub

# A tiny random BERT for the smoke profile and tests: same vocabulary as MiniLM.
TINY_BERT = dict(
    vocabulary_size=30522,
    num_layers=2,
    num_heads=2,
    hidden_dim=64,
    intermediate_dim=128,
    max_sequence_length=512,
)
# A tiny random ALBERT for the smoke-albert profile: smoke's sizes, ALBERT's real 30k SentencePiece
# vocabulary, and one transformer layer shared by every layer (one group, one inner layer).
TINY_ALBERT = dict(
    vocabulary_size=30000,
    num_layers=2,
    num_heads=2,
    embedding_dim=32,
    hidden_dim=64,
    intermediate_dim=128,
    num_groups=1,
    num_inner_repetitions=1,
    max_sequence_length=512,
)
# ALBERT-base's shape (v1 and v2 alike): 12 layers sharing one, hidden 768, embeddings 128.
ALBERT_BASE = dict(
    TINY_ALBERT,
    num_layers=12,
    num_heads=12,
    embedding_dim=128,
    hidden_dim=768,
    intermediate_dim=3072,
)


def use_exact_gelu(backbone: keras.Model) -> None:
    """Switch feed-forward activations to exact (erf) GELU.

    keras-hub's BERT uses the tanh approximation; checkpoints trained with exact GELU
    (Hugging Face BERT/MiniLM, ``hidden_act="gelu"``) differ by ~1e-3 per layer otherwise.
    """
    for layer in _transformer_layers(backbone):
        layer._feedforward_intermediate_dense.activation = keras.activations.gelu


def build_bert_backbone(
    exact_gelu: bool = True, dropout: float = 0.1, **kwargs
) -> keras_hub.models.BertBackbone:
    backbone = keras_hub.models.BertBackbone(dropout=dropout, **kwargs)
    if exact_gelu:
        use_exact_gelu(backbone)
    return backbone


def bert_kwargs_from_hf_config(cfg: dict) -> dict:
    """Hugging Face BertConfig dict → BertBackbone keyword arguments."""
    if cfg.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {cfg.get('hidden_act')!r} in BERT config")
    return dict(
        vocabulary_size=cfg["vocab_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        hidden_dim=cfg["hidden_size"],
        intermediate_dim=cfg["intermediate_size"],
        max_sequence_length=cfg["max_position_embeddings"],
        num_segments=cfg.get("type_vocab_size", 2),
    )


def _transformer_layers(backbone: keras.Model) -> list:
    layers = backbone.transformer_layers
    if layers and isinstance(layers[0], list):  # ALBERT: groups of inner layers
        return [layer for group in layers for layer in group]
    return list(layers)


def is_albert(backbone: keras.Model) -> bool:
    return isinstance(backbone, keras_hub.models.AlbertBackbone)


class LayerwiseEncoder:
    """Run a BERT or ALBERT backbone one transformer layer at a time."""

    def __init__(self, backbone: keras.Model):
        self.backbone = backbone
        self.num_layers = int(backbone.num_layers)
        if is_albert(backbone):
            per_group = self.num_layers // backbone.num_groups
            self._steps = [backbone.transformer_layers[i // per_group] for i in range(self.num_layers)]
        else:
            self._steps = [[layer] for layer in backbone.transformer_layers]

    def embed(self, token_ids, segment_ids, training: bool = False):
        b = self.backbone
        tokens = b.token_embedding(token_ids)
        x = b.embeddings_add((tokens, b.position_embedding(tokens), b.segment_embedding(segment_ids)))
        x = b.embeddings_layer_norm(x)
        x = b.embeddings_dropout(x, training=training)
        if is_albert(b):
            x = b.embeddings_projection(x)
        return x

    def layer(self, index: int, x, padding_mask, training: bool = False):
        """Hidden states after transformer layer ``index`` (0-based) given those before it."""
        for sub in self._steps[index]:
            x = sub(x, padding_mask=padding_mask, training=training)
        return x

    def hidden_states(self, inputs: dict, training: bool = False, upto: int | None = None) -> list:
        """[embeddings, layer 1, ..., layer k] for k = ``upto`` (default: all layers)."""
        x = self.embed(inputs["token_ids"], inputs["segment_ids"], training=training)
        states = [x]
        for i in range(self.num_layers if upto is None else upto):
            x = self.layer(i, x, inputs["padding_mask"], training=training)
            states.append(x)
        return states
