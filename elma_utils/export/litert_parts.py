"""Export a ``MultiExitQAModel`` as LiteRT (.tflite) parts so that early exit stops computing.

One file per stage, batch 1. With ``dynamic_length`` (the default) the sequence dimension is
left open (-1 in the LiteRT signature) and the edge resizes the inputs to each question's
longest window, so a 150-token window costs 150 tokens, not ``seq_len``; otherwise every
window is padded to ``seq_len``:

- ``embeddings.tflite``: ``token_ids``, ``segment_ids`` int32 [1, L] → ``hidden`` [1, L, H].
- BERT-like backbones: ``layer_{i}.tflite`` for every kept layer i = 1..K:
  ``hidden`` [1, L, H], ``padding_mask``, ``segment_ids`` int32 [1, L] →
  ``hidden`` (the next one), ``start_logits``, ``end_logits`` [1, L] (answer-space masked).
- ALBERT (one set of layer weights shared by every layer of a group): one
  ``group_{g}.tflite`` per group (``hidden``, ``padding_mask`` → ``hidden``), called once per
  layer of the group, plus one tiny ``exit_{i}.tflite`` per exit (``hidden``,
  ``padding_mask``, ``segment_ids`` → ``start_logits``, ``end_logits``). Weights are stored
  once, not K times.

``layer_schedule`` lists, for every layer, which files the edge runs; the bundle manifest
stores it so that the runtime needs no knowledge of the backbone.

Each part is a small Keras model that calls the trained sublayers (weights shared, never
copied), traced once as a ``tf.function`` with a fixed input signature and converted with
``tf.lite.TFLiteConverter.from_concrete_functions`` using builtin ops only (no Flex/Select
TF ops, so a plain LiteRT/TFLite interpreter runs every part).

Precisions: ``float32``; ``float16`` (weights stored as float16, dequantised at load);
``int8`` (dynamic-range: int8 weights, float activations; no representative data needed).
"""

from __future__ import annotations

from pathlib import Path

import keras

from elma_utils.model.backbones import is_albert
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.qa_model import answer_space_mask

PRECISIONS = ("float32", "float16", "int8")
EMBEDDINGS_FILE = "embeddings.tflite"
TOKEN_INPUTS = ("token_ids", "segment_ids")
LOGITS = ("start_logits", "end_logits")


class _EmbeddingsPart(keras.Model):
    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def call(self, token_ids, segment_ids):
        return (self.encoder.embed(token_ids, segment_ids, training=False),)


class _LayerPart(keras.Model):
    """Transformer layer ``index`` and its exit head (BERT-like backbones)."""

    def __init__(self, encoder, index: int, head, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.index, self.head = encoder, index, head

    def call(self, hidden, padding_mask, segment_ids):
        x = self.encoder.layer(self.index, hidden, padding_mask, training=False)
        s, e = self.head(x, answer_space_mask(segment_ids, padding_mask))
        return (x, s, e)


class _GroupPart(keras.Model):
    """One ALBERT group's shared inner layers (no head): called once per layer of the group."""

    def __init__(self, inner_layers: list, **kwargs):
        super().__init__(**kwargs)
        self.inner = list(inner_layers)

    def call(self, hidden, padding_mask):
        x = hidden
        for sub in self.inner:
            x = sub(x, padding_mask=padding_mask, training=False)
        return (x,)


class _HeadPart(keras.Model):
    def __init__(self, head, **kwargs):
        super().__init__(**kwargs)
        self.head = head

    def call(self, hidden, padding_mask, segment_ids):
        s, e = self.head(hidden, answer_space_mask(segment_ids, padding_mask))
        return (s, e)


def layer_schedule(model: MultiExitQAModel) -> list[dict[str, str | None]]:
    """For each kept layer (1-based order): {"layer": file, "head": file or None}.

    ``head`` is None where the layer file already returns the exit logits (BERT-like).
    """
    backbone = model.backbone
    if is_albert(backbone):
        per_group = backbone.num_layers // backbone.num_groups
        return [
            {"layer": f"group_{i // per_group + 1}.tflite", "head": f"exit_{i + 1}.tflite"}
            for i in range(model.num_exits)
        ]
    return [{"layer": f"layer_{i + 1}.tflite", "head": None} for i in range(model.num_exits)]


def convert_part(part: keras.Model, signature: dict, precision: str = "float32") -> bytes:
    """Trace ``part.call`` with a fixed keyword signature and convert it to a LiteRT flatbuffer."""
    import tensorflow as tf

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    names = list(signature)
    specs = [tf.TensorSpec(shape, dtype, name=name) for name, (shape, dtype) in signature.items()]

    def serve(*args):
        return part(**dict(zip(names, args, strict=True)))

    fn = tf.function(serve, input_signature=specs, autograph=False)
    concrete = fn.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], part)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def _plan(model: MultiExitQAModel) -> list[tuple[str, object, tuple[str, ...], tuple[str, ...]]]:
    """(file name, part factory, input names, output names) of every part, in run order."""
    enc = model.encoder
    layer_in = ("hidden", "padding_mask", "segment_ids")
    plan: list = [
        (EMBEDDINGS_FILE, lambda: _EmbeddingsPart(enc, name="embeddings"), TOKEN_INPUTS, ("hidden",))
    ]
    if is_albert(model.backbone):
        seen: set[str] = set()
        per_group = model.backbone.num_layers // model.backbone.num_groups
        for i, step in enumerate(layer_schedule(model)):
            name, head = step["layer"], step["head"]
            if name not in seen:
                seen.add(name)
                group = model.backbone.transformer_layers[i // per_group]
                stem = name.removesuffix(".tflite")
                plan.append(
                    (
                        name,
                        lambda g=group, n=stem: _GroupPart(g, name=n),
                        ("hidden", "padding_mask"),
                        ("hidden",),
                    )
                )
            stem = head.removesuffix(".tflite")
            plan.append((head, lambda i=i, n=stem: _HeadPart(model.exit_heads[i], name=n), layer_in, LOGITS))
    else:
        for i, step in enumerate(layer_schedule(model)):
            stem = step["layer"].removesuffix(".tflite")
            factory = lambda i=i, n=stem: _LayerPart(enc, i, model.exit_heads[i], name=n)  # noqa: E731
            plan.append((step["layer"], factory, layer_in, ("hidden",) + LOGITS))
    return plan


def part_specs(model: MultiExitQAModel) -> dict[str, dict[str, list[str]]]:
    """{file name: {"inputs": [names], "outputs": [names in the file's output order]}}."""
    return {name: {"inputs": list(ins), "outputs": list(outs)} for name, _, ins, outs in _plan(model)}


def export_parts(
    model: MultiExitQAModel,
    out_dir: Path,
    seq_len: int,
    precision: str = "float32",
    dynamic_length: bool = True,
) -> dict[str, Path]:
    """Write the parts into ``out_dir``; returns {file name: path} in run order (embeddings first).

    ``seq_len`` is the longest window; with ``dynamic_length`` any shorter one runs unpadded."""
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"LiteRT export needs the TensorFlow Keras backend, not {keras.backend.backend()}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    seq_len = int(seq_len)
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2, got {seq_len}")
    max_pos = getattr(model.backbone, "max_sequence_length", None)
    if max_pos is not None and seq_len > int(max_pos):
        raise ValueError(f"seq_len {seq_len} exceeds the backbone's max_sequence_length {max_pos}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.build_for()
    length = None if dynamic_length else seq_len
    shapes = {
        "token_ids": ((1, length), tf.int32),
        "segment_ids": ((1, length), tf.int32),
        "padding_mask": ((1, length), tf.int32),
        "hidden": ((1, length, int(model.backbone.hidden_dim)), tf.float32),
    }
    written: dict[str, Path] = {}
    for name, factory, inputs, _ in _plan(model):
        path = out_dir / name
        path.write_bytes(convert_part(factory(), {k: shapes[k] for k in inputs}, precision))
        written[name] = path
    return written
