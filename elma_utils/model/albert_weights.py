"""Load ALBERT weights into keras-hub's ``AlbertBackbone`` from the three places they live.

1. **keras-hub presets** (a built-in name such as ``albert_base_en_uncased``, a
   ``kaggle://`` / ``hf://`` handle, or a local directory written by
   ``backbone.save_to_preset``): keras-hub already knows how to read these.
2. **Google's TF1 checkpoints** as released by google-research/albert: a directory with
   ``albert_config.json`` and ``model.ckpt-*`` files whose variables carry TF1 names
   (``bert/embeddings/word_embeddings``, ``bert/encoder/transformer/group_0/inner_group_0/...``).
3. **TF-Hub modules** (``google/albert_base`` and friends, TF1 Hub format, or any SavedModel
   whose variables use Google's names, possibly under a prefix such as ``module/``),
   loaded with ``hub.load`` (``hub.KerasLayer`` does not work inside Keras 3).

Sources 2 and 3 share one name map (Google name -> keras-hub variable), checked against
google-research/albert ``modeling.py`` and keras-hub's own Hugging Face converter
(``keras_hub/src/utils/transformers/convert_albert.py``), which names the same keras-hub
variables. Every problem is reported in one error that names the variable and the shapes.

Numerics: Google's ``hidden_act: "gelu"`` is the tanh approximation
(``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, see ``modeling.gelu``), and keras-hub's
``AlbertBackbone`` hard-codes ``gelu_approximate``, the same function, so outputs match.
Other activations (``relu``, ``tanh``) cannot be expressed in ``AlbertBackbone`` and are
refused rather than silently changed. Google masks attention with a ``-10000`` additive bias
and keras-hub with a masked softmax; both give zero weight to padded keys in float32.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

GOOGLE_CONFIG_FILE = "albert_config.json"
PRESET_CONFIG_FILE = "config.json"
PRESET_WEIGHTS_FILE = "model.weights.h5"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
TFHUB_V1_MODULE_FILE = "tfhub_module.pb"

# Google's "gelu" is the tanh approximation; HF spells the same function "gelu_new".
_TANH_GELU_NAMES = frozenset({"gelu", "gelu_new", "gelu_pytorch_tanh"})
_REQUIRED_CONFIG_KEYS = (
    "vocab_size",
    "embedding_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
_PROJECTION = "bert/encoder/embedding_hidden_mapping_in"
_WORD_EMBEDDINGS = "bert/embeddings/word_embeddings"
_REMOTE_PRESET_SCHEMES = ("kaggle://", "hf://", "modelscope://", "gs://")
_TFHUB_URL_SCHEMES = ("http://", "https://")

SourceKind = Literal["google_checkpoint", "tfhub", "preset"]
# What to do when ALBERT weights cannot be downloaded (said in one line by every refusal).
NO_DOWNLOAD_HINT = (
    "on a machine with internet run it once to fill the cache, or pass --backbone-source "
    "(or set ELMA_BACKBONE_SOURCE) to a Google ALBERT checkpoint directory, a TF-Hub module "
    "directory or a local keras-hub preset directory"
)


class AlbertWeightsError(ValueError):
    """Weights or configuration that cannot be turned into an ``AlbertBackbone``."""


# --------------------------------------------------------------------------- config


def albert_config_to_backbone_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate Google's ``albert_config.json`` keys into ``AlbertBackbone`` arguments.

    Refuses what the backbone cannot represent (a non-gelu activation, heads that do not
    divide the hidden size, layers that do not split evenly into groups) so that a model
    never loads with silently different maths. ``dropout`` takes ``hidden_dropout_prob``
    (0 for ALBERT v2, 0.1 for v1); it only matters for training.
    """
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in cfg]
    if missing:
        raise AlbertWeightsError(f"ALBERT config is missing required key(s): {', '.join(missing)}")
    act = str(cfg.get("hidden_act", "gelu")).lower()
    if act not in _TANH_GELU_NAMES:
        raise AlbertWeightsError(
            f"ALBERT config has hidden_act={act!r}; keras-hub's AlbertBackbone only implements "
            "the tanh-approximated gelu (Google's 'gelu'), so these weights would compute "
            "something different"
        )
    kwargs = {
        "vocabulary_size": int(cfg["vocab_size"]),
        "num_layers": int(cfg["num_hidden_layers"]),
        "num_heads": int(cfg["num_attention_heads"]),
        "embedding_dim": int(cfg["embedding_size"]),
        "hidden_dim": int(cfg["hidden_size"]),
        "intermediate_dim": int(cfg["intermediate_size"]),
        "num_groups": int(cfg.get("num_hidden_groups", 1)),
        "num_inner_repetitions": int(cfg.get("inner_group_num", 1)),
        "dropout": float(cfg.get("hidden_dropout_prob", 0.0)),
        "max_sequence_length": int(cfg.get("max_position_embeddings", 512)),
        "num_segments": int(cfg.get("type_vocab_size", 2)),
    }
    _check_backbone_kwargs(kwargs)
    return kwargs


def _check_backbone_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Catch divisibility errors with a message that names the config keys."""
    if kwargs["hidden_dim"] % kwargs["num_heads"]:
        raise AlbertWeightsError(
            f"hidden_size={kwargs['hidden_dim']} is not divisible by "
            f"num_attention_heads={kwargs['num_heads']}"
        )
    if kwargs["num_layers"] % kwargs["num_groups"]:
        raise AlbertWeightsError(
            f"num_hidden_layers={kwargs['num_layers']} is not divisible by "
            f"num_hidden_groups={kwargs['num_groups']} (keras-hub needs equal-sized groups)"
        )


def read_google_config(path: str | Path) -> dict[str, Any]:
    """Read an ``albert_config.json``, with an error that names the file when it is bad."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"ALBERT config file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AlbertWeightsError(f"ALBERT config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AlbertWeightsError(f"ALBERT config {path} must hold a JSON object")
    return cfg


def build_albert_backbone(**kwargs: Any):
    """Build a randomly initialised ``keras_hub.models.AlbertBackbone`` from its arguments.

    A thin wrapper so that callers (and the loaders here) need not import keras-hub
    themselves; with no network this is the only way to get an ALBERT backbone.
    """
    import keras_hub

    return keras_hub.models.AlbertBackbone(**kwargs)


# --------------------------------------------------------------------------- name map


@dataclass(frozen=True)
class _WeightSpec:
    """One Google variable and the keras-hub variable it fills.

    ``layout`` says how Google stores it: ``same`` (identical shape), ``heads_in``
    (query/key/value: Google ``[H, N*D]`` / ``[N*D]``, keras-hub ``[H, N, D]`` / ``[N, D]``)
    or ``heads_out`` (attention output: Google ``[N*D, H]``, keras-hub ``[N, D, H]``).
    Google's own code reshapes its 2-D kernels the same row-major way, so a reshape is exact.
    """

    source: str
    target: Any
    layout: Literal["same", "heads_in", "heads_out"] = "same"

    @property
    def target_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.target.shape)

    @property
    def source_shape(self) -> tuple[int, ...]:
        shape = self.target_shape
        if self.layout == "heads_in":
            return (shape[0], shape[1] * shape[2]) if len(shape) == 3 else (shape[0] * shape[1],)
        if self.layout == "heads_out":
            return (shape[0] * shape[1], shape[2])
        return shape


def google_weight_specs(backbone) -> list[_WeightSpec]:
    """Every Google ALBERT variable name paired with its keras-hub variable.

    Names follow google-research/albert ``modeling.py``: ``bert/embeddings/...``,
    ``bert/encoder/embedding_hidden_mapping_in``, then per group and inner layer
    ``attention_1/{self/{query,key,value},output/dense}``, ``LayerNorm`` (after attention),
    ``ffn_1/intermediate/dense``, ``ffn_1/intermediate/output/dense``, ``LayerNorm_1`` (after
    the feed-forward block), and ``bert/pooler/dense``. The MLM / SOP heads (``cls/...``)
    are not part of the backbone and are ignored.
    """
    specs = [
        _WeightSpec(_WORD_EMBEDDINGS, backbone.token_embedding.embeddings),
        _WeightSpec("bert/embeddings/position_embeddings", backbone.position_embedding.position_embeddings),
        _WeightSpec("bert/embeddings/token_type_embeddings", backbone.segment_embedding.embeddings),
        _WeightSpec("bert/embeddings/LayerNorm/gamma", backbone.embeddings_layer_norm.gamma),
        _WeightSpec("bert/embeddings/LayerNorm/beta", backbone.embeddings_layer_norm.beta),
        _WeightSpec(f"{_PROJECTION}/kernel", backbone.embeddings_projection.kernel),
        _WeightSpec(f"{_PROJECTION}/bias", backbone.embeddings_projection.bias),
    ]
    for group in range(backbone.num_groups):
        for inner in range(backbone.num_inner_repetitions):
            layer = backbone.get_layer(f"group_{group}_inner_layer_{inner}")
            prefix = f"bert/encoder/transformer/group_{group}/inner_group_{inner}"
            specs.extend(_transformer_layer_specs(layer, prefix))
    specs += [
        _WeightSpec("bert/pooler/dense/kernel", backbone.pooled_dense.kernel),
        _WeightSpec("bert/pooler/dense/bias", backbone.pooled_dense.bias),
    ]
    return specs


def _transformer_layer_specs(layer, prefix: str) -> list[_WeightSpec]:
    """Specs of one keras-hub ``TransformerEncoder`` (attribute names as keras-hub's converter)."""
    attention = layer._self_attention_layer
    specs = []
    for part, dense in (
        ("query", attention.query_dense),
        ("key", attention.key_dense),
        ("value", attention.value_dense),
    ):
        specs.append(_WeightSpec(f"{prefix}/attention_1/self/{part}/kernel", dense.kernel, "heads_in"))
        specs.append(_WeightSpec(f"{prefix}/attention_1/self/{part}/bias", dense.bias, "heads_in"))
    out, ffn_in, ffn_out = (
        attention.output_dense,
        layer._feedforward_intermediate_dense,
        layer._feedforward_output_dense,
    )
    specs += [
        _WeightSpec(f"{prefix}/attention_1/output/dense/kernel", out.kernel, "heads_out"),
        _WeightSpec(f"{prefix}/attention_1/output/dense/bias", out.bias),
        _WeightSpec(f"{prefix}/LayerNorm/gamma", layer._self_attention_layer_norm.gamma),
        _WeightSpec(f"{prefix}/LayerNorm/beta", layer._self_attention_layer_norm.beta),
        _WeightSpec(f"{prefix}/ffn_1/intermediate/dense/kernel", ffn_in.kernel),
        _WeightSpec(f"{prefix}/ffn_1/intermediate/dense/bias", ffn_in.bias),
        _WeightSpec(f"{prefix}/ffn_1/intermediate/output/dense/kernel", ffn_out.kernel),
        _WeightSpec(f"{prefix}/ffn_1/intermediate/output/dense/bias", ffn_out.bias),
        _WeightSpec(f"{prefix}/LayerNorm_1/gamma", layer._feedforward_layer_norm.gamma),
        _WeightSpec(f"{prefix}/LayerNorm_1/beta", layer._feedforward_layer_norm.beta),
    ]
    return specs


# --------------------------------------------------------------------------- sources


@dataclass
class _GoogleArrays:
    """Google-named arrays from some store, read lazily (a real vocabulary table is large).

    ``names`` maps each *Google* name (prefix and ``:0`` stripped) to the store's own name,
    ``shapes`` holds the store's shapes and ``fetch`` reads one array by the store's name.
    """

    description: str
    names: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    fetch: Callable[[str], np.ndarray]

    def shape(self, google_name: str) -> tuple[int, ...] | None:
        name = self.names.get(google_name)
        return None if name is None else self.shapes[name]

    def get(self, google_name: str) -> np.ndarray:
        """Read one array; a truncated or corrupt store fails here, named, not deep in TF."""
        name = self.names[google_name]
        try:
            return np.asarray(self.fetch(name))
        except Exception as e:  # TF raises OpError, IndexError, ... for damaged files
            raise AlbertWeightsError(f"{self.description}: cannot read variable {name!r}: {e}") from e


def _strip_variable_suffix(name: str) -> str:
    """``module/bert/x:0`` -> ``module/bert/x`` (TF2 variable names carry the output index)."""
    return re.sub(r":\d+$", "", name)


def _google_name_index(store_names: list[str]) -> dict[str, str]:
    """Map Google names (``bert/...``) to store names that may carry a scope prefix.

    A store name counts when it *is* the Google name or ends with ``/`` + it, so
    ``module/bert/pooler/dense/kernel`` is found but optimizer slots such as
    ``bert/.../kernel/adam_m`` are not. An exact match wins; otherwise the shortest prefix.
    """
    index: dict[str, str] = {}
    for store_name in sorted(store_names, key=len, reverse=True):
        match = re.search(r"(?:^|/)(bert/.+)$", store_name)
        while match:
            index[match.group(1)] = store_name  # shorter (less prefixed) names overwrite
            match = re.search(r"/(bert/.+)$", match.group(1))
    return index


def _collect_arrays(
    source: _GoogleArrays, specs: list[_WeightSpec], embedding_dim: int, hidden_dim: int
) -> list[np.ndarray]:
    """Read and reshape every spec's array, or raise one error listing every problem."""
    missing, mismatched, arrays = [], [], []
    for spec in specs:
        found = source.shape(spec.source)
        if found is None and spec.source.startswith(_PROJECTION) and embedding_dim == hidden_dim:
            # Google only creates embedding_hidden_mapping_in when the sizes differ.
            arrays.append(np.eye(hidden_dim) if spec.source.endswith("kernel") else np.zeros(hidden_dim))
            continue
        if found is None:
            missing.append(spec.source)
        elif tuple(found) != spec.source_shape:
            mismatched.append(f"{spec.source}: expected shape {spec.source_shape}, found {tuple(found)}")
        else:
            arrays.append(np.reshape(source.get(spec.source), spec.target_shape))
    _raise_if_problems(source.description, missing, mismatched)
    return arrays


def _raise_if_problems(description: str, missing: list[str], mismatched: list[str]) -> None:
    problems = []
    if missing:
        problems.append("missing variable(s): " + ", ".join(missing))
    if mismatched:
        problems.append("shape mismatch(es): " + "; ".join(mismatched))
    if problems:
        raise AlbertWeightsError(f"{description} does not fit the ALBERT config: " + " | ".join(problems))


def _backbone_from_google_arrays(source: _GoogleArrays, config: Mapping[str, Any]):
    """Build the backbone the config describes and fill it from Google-named arrays."""
    kwargs = albert_config_to_backbone_kwargs(config)
    backbone = build_albert_backbone(**kwargs)
    specs = google_weight_specs(backbone)
    arrays = _collect_arrays(source, specs, kwargs["embedding_dim"], kwargs["hidden_dim"])
    for spec, array in zip(specs, arrays, strict=True):
        spec.target.assign(array.astype(spec.target.dtype))
    return backbone


# --------------------------------------------------------------------------- Google checkpoints


def _find_checkpoint_prefix(ckpt_dir: Path) -> str:
    """Pick the checkpoint in a directory the way a person would.

    Google's release tarballs ship ``model.ckpt-best.*`` without the ``checkpoint`` state
    file, so ``tf.train.latest_checkpoint`` alone is not enough: we prefer the state file,
    then ``model.ckpt-best``, then the highest step, then a TF-Hub-style ``variables/variables``.
    """
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    if latest:
        return latest
    prefixes = [str(p)[: -len(".index")] for p in ckpt_dir.glob("*.index")]
    if not prefixes and (ckpt_dir / "variables" / "variables.index").exists():
        return str(ckpt_dir / "variables" / "variables")
    if not prefixes:
        raise AlbertWeightsError(
            f"no TensorFlow checkpoint (*.index file) in {ckpt_dir}; expected model.ckpt-* "
            "files next to albert_config.json"
        )
    best = [p for p in prefixes if p.endswith("ckpt-best")]
    if best:
        return best[0]

    def step(prefix: str) -> int:
        found = re.search(r"-(\d+)$", prefix)
        return int(found.group(1)) if found else -1

    return max(sorted(prefixes), key=step)


def _resolve_google_checkpoint(ckpt: Path) -> tuple[dict[str, Any], str]:
    """Return (config, checkpoint prefix) for a directory or a ``model.ckpt-N`` prefix.

    The config is read first: a broken ``albert_config.json`` is the more basic problem.
    """
    if ckpt.is_dir():
        config_path = ckpt / GOOGLE_CONFIG_FILE
        if not config_path.exists():
            raise AlbertWeightsError(f"{ckpt} has no {GOOGLE_CONFIG_FILE}; not a Google ALBERT checkpoint")
        return read_google_config(config_path), _find_checkpoint_prefix(ckpt)
    if Path(f"{ckpt}.index").exists():
        return read_google_config(ckpt.parent / GOOGLE_CONFIG_FILE), str(ckpt)
    raise FileNotFoundError(f"Google ALBERT checkpoint not found: {ckpt}")


def load_albert_from_google_checkpoint(ckpt_dir: str | Path):
    """Load a google-research/albert checkpoint (``albert_config.json`` + ``model.ckpt-*``).

    ``ckpt_dir`` may also be a checkpoint prefix such as ``dir/model.ckpt-best`` (the config
    is then read from ``dir``). Variables are read by their TF1 names with
    ``tf.train.load_checkpoint``; a scope prefix in front of ``bert/`` is tolerated, the
    ``cls/`` pre-training heads and optimizer slots are ignored. When ``embedding_size ==
    hidden_size`` Google has no ``embedding_hidden_mapping_in`` and the projection is set
    to the identity.
    """
    import tensorflow as tf

    ckpt = Path(ckpt_dir).expanduser()
    if not ckpt.exists() and not Path(f"{ckpt}.index").exists():
        raise FileNotFoundError(f"Google ALBERT checkpoint not found: {ckpt}")
    config, prefix = _resolve_google_checkpoint(ckpt)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise AlbertWeightsError(f"cannot read TensorFlow checkpoint {prefix}: {e}") from e
    shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}
    source = _GoogleArrays(
        description=f"checkpoint {prefix}",
        names=_google_name_index(list(shapes)),
        shapes=shapes,
        fetch=reader.get_tensor,
    )
    logger.info("loading Google ALBERT checkpoint %s", prefix)
    return _backbone_from_google_arrays(source, config)


# --------------------------------------------------------------------------- TF-Hub


def _is_url(handle: str) -> bool:
    return handle.startswith(_TFHUB_URL_SCHEMES) or handle.startswith("gs://")


def _module_variables(module) -> list:
    """The tf.Variables of a loaded SavedModel / TF1 Hub module.

    TF1 Hub modules and "reusable SavedModels" expose ``.variables``; a plain ``tf.Module``
    saved with ``tf.saved_model.save`` does not, so we fall back to walking its object graph.
    """
    import tensorflow as tf

    variables = getattr(module, "variables", None)
    if isinstance(variables, list | tuple) and variables:
        return list(variables)
    found = tf.train.TrackableView(module).descendants()
    return [v for v in found if isinstance(v, tf.Variable)]


def _hub_arrays(module, description: str) -> _GoogleArrays:
    """Index a loaded module's variables by Google name (prefix and ``:0`` stripped)."""
    by_name = {}
    for variable in _module_variables(module):
        by_name.setdefault(_strip_variable_suffix(variable.name), variable)
    return _GoogleArrays(
        description=description,
        names=_google_name_index(list(by_name)),
        shapes={name: tuple(int(d) for d in v.shape) for name, v in by_name.items()},
        fetch=lambda name: by_name[name].numpy(),
    )


def infer_albert_config(
    shapes: Mapping[str, tuple[int, ...]], num_layers: int = 12, num_heads: int | None = None
) -> dict[str, Any]:
    """Rebuild a Google ``albert_config.json`` from ``{google_name: shape}``.

    Shapes give the vocabulary, embedding, hidden, intermediate, position and segment sizes
    and the group / inner-group counts. Two numbers are *not* in the shapes: the number of
    layers (all layers of a group share one set of weights) and the number of attention
    heads (Google stores query/key/value as 2-D ``[H, N*D]`` kernels). ``num_layers``
    defaults to 12 (every released ALBERT); ``num_heads`` defaults to ``hidden_size // 64``,
    right for base/large/xxlarge but not xlarge (16 heads of 128), so pass it when in doubt.
    """
    word = shapes.get(_WORD_EMBEDDINGS)
    if word is None:
        raise AlbertWeightsError(f"no variable named like '{_WORD_EMBEDDINGS}': not an ALBERT module")
    query = shapes.get("bert/encoder/transformer/group_0/inner_group_0/attention_1/self/query/kernel")
    ffn = shapes.get("bert/encoder/transformer/group_0/inner_group_0/ffn_1/intermediate/dense/kernel")
    position = shapes.get("bert/embeddings/position_embeddings")
    segment = shapes.get("bert/embeddings/token_type_embeddings")
    if query is None or ffn is None or position is None or segment is None:
        raise AlbertWeightsError(
            "cannot infer the ALBERT config: the module lacks the embedding or group_0/inner_group_0 "
            "variables; pass config= (albert_config.json contents)"
        )
    hidden = int(query[1])
    if num_heads is None:
        if hidden % 64:
            raise AlbertWeightsError(
                f"cannot infer num_attention_heads for hidden_size={hidden}; pass num_heads="
            )
        num_heads = hidden // 64
    groups = {int(m.group(1)) for n in shapes if (m := re.search(r"/group_(\d+)/", n))}
    inner = {int(m.group(1)) for n in shapes if (m := re.search(r"/group_0/inner_group_(\d+)/", n))}
    return {
        "vocab_size": int(word[0]),
        "embedding_size": int(word[1]),
        "hidden_size": hidden,
        "num_hidden_layers": int(num_layers),
        "num_hidden_groups": max(groups) + 1 if groups else 1,
        "inner_group_num": max(inner) + 1 if inner else 1,
        "num_attention_heads": int(num_heads),
        "intermediate_size": int(ffn[1]),
        "hidden_act": "gelu",
        "max_position_embeddings": int(position[0]),
        "type_vocab_size": int(segment[0]),
        "hidden_dropout_prob": 0.0,
    }


def _resolve_hub_handle(handle: str | Path) -> str:
    """Local path (checked) or remote handle resolved (downloaded) by tensorflow_hub."""
    import tensorflow_hub as hub

    text = str(handle)
    if _is_url(text):
        return hub.resolve(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"TF-Hub module / SavedModel directory not found: {path}")
    if not any((path / name).exists() for name in SAVED_MODEL_FILES):
        raise AlbertWeightsError(f"{path} is not a SavedModel / TF-Hub module (no saved_model.pb)")
    return str(path)


def load_albert_from_tfhub(
    handle: str | Path,
    config: Mapping[str, Any] | None = None,
    *,
    num_layers: int | None = None,
    num_heads: int | None = None,
    tags: list[str] | None = None,
):
    """Load an ALBERT TF-Hub module or SavedModel (handle, URL or local directory).

    Uses ``hub.load`` and reads the module's variables by name; names may carry a prefix
    (``module/``) and a ``:0`` suffix. The architecture comes from, in order: ``config``
    (Google ``albert_config.json`` keys), the module's own ``assets/albert_config.json``
    (Google's ``export_to_tfhub.py`` ships it), or the variable shapes (see
    ``infer_albert_config``: ``num_layers`` defaults to 12 because shared weights cannot
    reveal it, ``num_heads`` to ``hidden_size // 64``). ``num_layers`` / ``num_heads`` given
    here override the config. ``tags`` picks the graph variant of a TF1 SavedModel that has
    several (TF1 Hub modules default to the inference graph).
    """
    import tensorflow_hub as hub

    path = _resolve_hub_handle(handle)
    try:
        module = hub.load(path, tags=tags)
    except Exception as e:  # corrupt files surface as DecodeError, IndexError, OpError, ...
        needs_tags = tags is None and "tag" in str(e).lower()
        hint = " (a TF1 SavedModel with several graphs needs tags=[...])" if needs_tags else ""
        raise AlbertWeightsError(f"tensorflow_hub could not load {handle}: {e}{hint}") from e
    source = _hub_arrays(module, f"TF-Hub module {handle}")
    config = _tfhub_config(path, source, config, num_layers, num_heads)
    logger.info("loading ALBERT from TF-Hub module %s", handle)
    return _backbone_from_google_arrays(source, config)


def _tfhub_config(
    path: str,
    source: _GoogleArrays,
    config: Mapping[str, Any] | None,
    num_layers: int | None,
    num_heads: int | None,
) -> dict[str, Any]:
    """Config for a TF-Hub module: given, shipped as an asset, or inferred from shapes."""
    asset = Path(path) / "assets" / GOOGLE_CONFIG_FILE
    if config is None and asset.exists():
        config = read_google_config(asset)
    if config is None:
        shapes = {name: source.shapes[store_name] for name, store_name in source.names.items()}
        return infer_albert_config(shapes, num_layers or 12, num_heads)
    config = dict(config)
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    if num_heads is not None:
        config["num_attention_heads"] = num_heads
    return config


# --------------------------------------------------------------------------- presets


def _check_preset_dir(path: Path) -> None:
    """Fail early, and clearly, on a directory that is not an ALBERT keras-hub preset."""
    config_path = path / PRESET_CONFIG_FILE
    if not config_path.exists():
        raise AlbertWeightsError(f"{path} is not a keras-hub preset (no {PRESET_CONFIG_FILE})")
    try:
        registered = json.loads(config_path.read_text(encoding="utf-8")).get("registered_name", "")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise AlbertWeightsError(f"{config_path} is not a valid keras-hub preset config: {e}") from e
    if not str(registered).endswith("AlbertBackbone"):
        raise AlbertWeightsError(
            f"preset {path} holds {registered or 'an unnamed class'!s}, not an AlbertBackbone"
        )
    if not (path / PRESET_WEIGHTS_FILE).exists():
        raise AlbertWeightsError(f"preset {path} has no {PRESET_WEIGHTS_FILE}")


def load_albert_from_preset(preset: str | Path):
    """Load ``AlbertBackbone.from_preset``: a built-in name, a remote handle or a local dir.

    Built-in names (e.g. ``albert_base_en_uncased``) and ``kaggle://`` / ``hf://`` handles
    download on first use (and fail here without network); a local directory is what
    ``backbone.save_to_preset(dir)`` wrote and is checked before keras-hub reads it.
    """
    import keras_hub

    text = str(preset)
    if isinstance(preset, Path) or _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"keras-hub preset directory not found: {path}")
        _check_preset_dir(path)
        text = str(path)
    try:
        return keras_hub.models.AlbertBackbone.from_preset(text)
    except (ValueError, FileNotFoundError) as e:
        raise AlbertWeightsError(f"could not load ALBERT preset {text!r}: {e}") from e
    except OSError as e:  # a download that cannot happen: no network, no DNS, refused, HTTP error
        raise AlbertWeightsError(
            f"cannot download the keras-hub preset {text!r} ({type(e).__name__}: no network?); "
            f"{NO_DOWNLOAD_HINT}"
        ) from e


# --------------------------------------------------------------------------- dispatch


def _looks_like_path(text: str) -> bool:
    """A string a person meant as a file path rather than a preset name or handle."""
    if "://" in text:
        return False
    return "/" in text or "\\" in text or text.startswith((".", "~")) or Path(text).exists()


def detect_albert_source(source: str | Path) -> SourceKind:
    """Say which loader a source needs, from its files or the form of its handle.

    Directory with ``albert_config.json`` -> Google checkpoint; with ``saved_model.pb`` or
    ``tfhub_module.pb`` -> TF-Hub; with ``config.json`` -> keras-hub preset. ``http(s)://``
    handles (tfhub.dev, kaggle.com/models) -> TF-Hub; ``kaggle://``, ``hf://``,
    ``modelscope://``, ``gs://`` and bare names -> keras-hub preset (a TF-Hub module on
    GCS can be loaded with ``load_albert_from_tfhub`` directly).
    """
    text = str(source)
    if not isinstance(source, Path) and text.startswith(_TFHUB_URL_SCHEMES):
        return "tfhub"
    if not isinstance(source, Path) and text.startswith(_REMOTE_PRESET_SCHEMES):
        return "preset"
    if not isinstance(source, Path) and not _looks_like_path(text):
        return "preset"
    path = Path(text).expanduser()
    if Path(f"{path}.index").exists() or (path.is_file() and path.name == GOOGLE_CONFIG_FILE):
        return "google_checkpoint"  # a checkpoint prefix such as dir/model.ckpt-best
    if not path.exists():
        raise FileNotFoundError(f"ALBERT weights not found: {path}")
    if not path.is_dir():
        raise AlbertWeightsError(f"{path} is a file; pass the directory that holds the ALBERT weights")
    return _detect_directory_kind(path)


def _detect_directory_kind(path: Path) -> SourceKind:
    """Recognise a local directory by the files each format is defined by."""
    if (path / GOOGLE_CONFIG_FILE).exists():
        return "google_checkpoint"
    if any((path / name).exists() for name in (*SAVED_MODEL_FILES, TFHUB_V1_MODULE_FILE)):
        return "tfhub"
    if (path / PRESET_CONFIG_FILE).exists():
        return "preset"
    contents = sorted(p.name for p in path.iterdir())[:10]
    raise AlbertWeightsError(
        f"{path} is not a known ALBERT format (found {contents}); expected {GOOGLE_CONFIG_FILE} + "
        f"model.ckpt-* (Google checkpoint), saved_model.pb (TF-Hub / SavedModel) or "
        f"{PRESET_CONFIG_FILE} + {PRESET_WEIGHTS_FILE} (keras-hub preset)"
    )


def load_albert(source: str | Path, **kw: Any):
    """Load ALBERT weights from any supported source (see ``detect_albert_source``).

    Keyword arguments go to ``load_albert_from_tfhub`` (``config``, ``num_layers``,
    ``num_heads``, ``tags``); the other loaders take none.
    """
    kind = detect_albert_source(source)
    if kind == "tfhub":
        return load_albert_from_tfhub(source, **kw)
    if kw:
        raise TypeError(f"load_albert got options {sorted(kw)} that a {kind} source does not take")
    if kind == "google_checkpoint":
        path = Path(str(source)).expanduser()
        return load_albert_from_google_checkpoint(path.parent if path.is_file() else path)
    return load_albert_from_preset(source)
