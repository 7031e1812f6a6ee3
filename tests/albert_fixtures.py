"""Tiny ALBERT checkpoints in Google's formats, and a NumPy ALBERT to check loaders against.

The reference forward pass follows google-research/albert ``modeling.py`` line by line
(embedding sum + LayerNorm, ``embedding_hidden_mapping_in``, ``group_idx = int(l / L * G)``,
post-LN attention / FFN blocks with the tanh gelu and a ``-10000`` key mask) and reads only
the Google-named arrays, never keras-hub, so it is an independent check of the name map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_CONFIG = {
    "attention_probs_dropout_prob": 0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0,
    "embedding_size": 16,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "num_hidden_groups": 1,
    "net_structure_type": 0,
    "gap_size": 0,
    "num_memory_blocks": 0,
    "inner_group_num": 1,
    "down_scale_factor": 1,
    "type_vocab_size": 2,
    "vocab_size": 30000,
}

# Two groups of two inner layers, and embedding == hidden (Google then has no projection).
GROUPED_CONFIG = {
    **TINY_CONFIG,
    "embedding_size": 32,
    "num_hidden_layers": 4,
    "num_hidden_groups": 2,
    "inner_group_num": 2,
    "vocab_size": 500,
}


def make_google_arrays(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under Google's TF1 names, plus ``cls/`` heads to be ignored."""
    rng = np.random.default_rng(seed)
    e, h, i = config["embedding_size"], config["hidden_size"], config["intermediate_size"]

    def normal(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def layer_norm(prefix: str, width: int) -> dict[str, np.ndarray]:
        return {f"{prefix}/gamma": 1.0 + normal(width, scale=0.1), f"{prefix}/beta": normal(width, scale=0.1)}

    arrays = {
        "bert/embeddings/word_embeddings": normal(config["vocab_size"], e),
        "bert/embeddings/position_embeddings": normal(config["max_position_embeddings"], e),
        "bert/embeddings/token_type_embeddings": normal(config["type_vocab_size"], e),
        **layer_norm("bert/embeddings/LayerNorm", e),
    }
    if e != h:
        arrays["bert/encoder/embedding_hidden_mapping_in/kernel"] = normal(e, h)
        arrays["bert/encoder/embedding_hidden_mapping_in/bias"] = normal(h)
    for g in range(config["num_hidden_groups"]):
        for j in range(config["inner_group_num"]):
            p = f"bert/encoder/transformer/group_{g}/inner_group_{j}"
            for part in ("query", "key", "value"):
                arrays[f"{p}/attention_1/self/{part}/kernel"] = normal(h, h)
                arrays[f"{p}/attention_1/self/{part}/bias"] = normal(h)
            arrays[f"{p}/attention_1/output/dense/kernel"] = normal(h, h)
            arrays[f"{p}/attention_1/output/dense/bias"] = normal(h)
            arrays.update(layer_norm(f"{p}/LayerNorm", h))
            arrays[f"{p}/ffn_1/intermediate/dense/kernel"] = normal(h, i)
            arrays[f"{p}/ffn_1/intermediate/dense/bias"] = normal(i)
            arrays[f"{p}/ffn_1/intermediate/output/dense/kernel"] = normal(i, h)
            arrays[f"{p}/ffn_1/intermediate/output/dense/bias"] = normal(h)
            arrays.update(layer_norm(f"{p}/LayerNorm_1", h))
    arrays["bert/pooler/dense/kernel"] = normal(h, h)
    arrays["bert/pooler/dense/bias"] = normal(h)
    arrays["cls/predictions/output_bias"] = normal(config["vocab_size"])
    arrays["cls/seq_relationship/output_weights"] = normal(2, h)
    return arrays


def sample_inputs(vocab_size: int) -> dict[str, np.ndarray]:
    """Two fixed sequences of 8 tokens; the second is padded after 5 and uses segment 1."""
    token_ids = np.array([[2, 1017, 25, 29999, 7, 300, 3, 1], [2, 15, 4000, 9, 3, 0, 0, 0]]) % vocab_size
    segment_ids = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0]])
    padding_mask = np.array([[1] * 8, [1] * 5 + [0] * 3])
    return {
        "token_ids": token_ids.astype("int32"),
        "segment_ids": segment_ids.astype("int32"),
        "padding_mask": padding_mask.astype("int32"),
    }


# --------------------------------------------------------------------------- NumPy reference


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * gamma + beta


def google_gelu(x: np.ndarray) -> np.ndarray:
    """``modeling.gelu`` of google-research/albert: the tanh approximation."""
    return x * 0.5 * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _attention_ffn_block(a: dict, p: str, x: np.ndarray, mask: np.ndarray, heads: int) -> np.ndarray:
    b, t, h = x.shape
    d = h // heads

    def proj(part: str) -> np.ndarray:
        y = x @ a[f"{p}/attention_1/self/{part}/kernel"] + a[f"{p}/attention_1/self/{part}/bias"]
        return y.reshape(b, t, heads, d).transpose(0, 2, 1, 3)

    q, k, v = proj("query"), proj("key"), proj("value")
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    logits = logits + (1.0 - mask[:, None, None, :]) * -10000.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, h)
    attn = context @ a[f"{p}/attention_1/output/dense/kernel"] + a[f"{p}/attention_1/output/dense/bias"]
    attn = _layer_norm(attn + x, a[f"{p}/LayerNorm/gamma"], a[f"{p}/LayerNorm/beta"])
    inter = google_gelu(
        attn @ a[f"{p}/ffn_1/intermediate/dense/kernel"] + a[f"{p}/ffn_1/intermediate/dense/bias"]
    )
    ffn = (
        inter @ a[f"{p}/ffn_1/intermediate/output/dense/kernel"]
        + a[f"{p}/ffn_1/intermediate/output/dense/bias"]
    )
    return _layer_norm(ffn + attn, a[f"{p}/LayerNorm_1/gamma"], a[f"{p}/LayerNorm_1/beta"])


def reference_sequence_output(arrays: dict, config: dict, inputs: dict) -> np.ndarray:
    """ALBERT ``sequence_output`` in float64 NumPy, straight from Google-named arrays."""
    a = {name: value.astype(np.float64) for name, value in arrays.items()}
    ids, seg = inputs["token_ids"], inputs["segment_ids"]
    mask = inputs["padding_mask"].astype(np.float64)
    t = ids.shape[1]
    x = a["bert/embeddings/word_embeddings"][ids] + a["bert/embeddings/token_type_embeddings"][seg]
    x = x + a["bert/embeddings/position_embeddings"][:t][None]
    x = _layer_norm(x, a["bert/embeddings/LayerNorm/gamma"], a["bert/embeddings/LayerNorm/beta"])
    if config["embedding_size"] != config["hidden_size"]:
        x = (
            x @ a["bert/encoder/embedding_hidden_mapping_in/kernel"]
            + a["bert/encoder/embedding_hidden_mapping_in/bias"]
        )
    layers, groups = config["num_hidden_layers"], config["num_hidden_groups"]
    for layer in range(layers):
        group = int(layer / layers * groups)
        for inner in range(config["inner_group_num"]):
            prefix = f"bert/encoder/transformer/group_{group}/inner_group_{inner}"
            x = _attention_ffn_block(a, prefix, x, mask, config["num_attention_heads"])
    return x


# --------------------------------------------------------------------------- writers


def write_google_checkpoint(
    directory: Path, arrays: dict, config: dict, name: str = "model.ckpt-best"
) -> Path:
    """Write ``albert_config.json`` and a TF1 checkpoint with exactly these variable names.

    ``tf.train.Checkpoint`` would store object-graph paths instead, so a v1 ``Saver`` in a
    graph is used; like Google's release tarballs there is no ``checkpoint`` state file.
    """
    import tensorflow as tf

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "albert_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    with tf.Graph().as_default():
        variables = {n: tf.compat.v1.Variable(v, name=n) for n, v in arrays.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(directory / name), write_meta_graph=False, write_state=False)
    return directory


def write_tf2_saved_model(directory: Path, arrays: dict, prefix: str = "module/") -> Path:
    """A TF2 SavedModel of a ``tf.Module`` whose variables are named ``prefix + google_name``."""
    import tensorflow as tf

    module = tf.Module()
    module.weights_list = [tf.Variable(v, name=prefix + n) for n, v in arrays.items()]
    tf.saved_model.save(module, str(directory))
    return directory


def write_tf1_hub_module(directory: Path, arrays: dict, config: dict) -> Path:
    """A TF1 Hub-format module like Google's ``export_to_tfhub.py`` output.

    Two graph variants (``{"train"}`` and the default ``{}``), ``tfhub_module.pb`` (a
    ``ModuleDef`` with ``format: FORMAT_V3``, serialised by hand as ``08 03``) and the
    config as an asset, as in the released ``google/albert_*`` modules.
    """
    import tensorflow as tf

    with tf.Graph().as_default():
        for n, v in arrays.items():
            tf.compat.v1.Variable(v, name=n)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(directory))
            builder.add_meta_graph_and_variables(session, tags=[])
            builder.add_meta_graph(tags=["train"])
            builder.save()
    (directory / "tfhub_module.pb").write_bytes(b"\x08\x03")
    (directory / "assets").mkdir(exist_ok=True)
    (directory / "assets" / "albert_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory
