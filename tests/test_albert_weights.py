"""ALBERT weight loaders: every format against an independent NumPy ALBERT, and every bad input.

Each test writes a tiny random ALBERT in the real on-disk format (Google TF1 checkpoint,
TF2 SavedModel, TF1 Hub module, keras-hub preset), loads it through ``albert_weights``
and compares ``sequence_output`` with ``albert_fixtures.reference_sequence_output``, which
reads the Google-named arrays directly. A wrong name, transpose, reshape, group routing or
activation moves the output far beyond the 1e-4 tolerance (see the gelu test).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from albert_fixtures import (  # noqa: E402
    GROUPED_CONFIG,
    TINY_CONFIG,
    make_google_arrays,
    reference_sequence_output,
    sample_inputs,
    write_google_checkpoint,
    write_tf1_hub_module,
    write_tf2_saved_model,
)

from elma_utils.model.albert_weights import (  # noqa: E402
    AlbertWeightsError,
    albert_config_to_backbone_kwargs,
    build_albert_backbone,
    detect_albert_source,
    load_albert,
    load_albert_from_google_checkpoint,
    load_albert_from_preset,
    load_albert_from_tfhub,
)

TOLERANCE = 1e-4


def _sequence_output(backbone, inputs: dict) -> np.ndarray:
    return np.asarray(backbone(inputs)["sequence_output"])


def _assert_matches_reference(backbone, arrays: dict, config: dict) -> None:
    inputs = sample_inputs(config["vocab_size"])
    expected = reference_sequence_output(arrays, config, inputs)
    diff = np.abs(_sequence_output(backbone, inputs) - expected).max()
    assert diff < TOLERANCE, f"max abs diff {diff:.2e} vs the NumPy ALBERT"


@pytest.fixture(scope="module")
def tiny_arrays() -> dict[str, np.ndarray]:
    return make_google_arrays(TINY_CONFIG, seed=0)


@pytest.fixture(scope="module")
def google_dir(tmp_path_factory, tiny_arrays) -> Path:
    return write_google_checkpoint(
        tmp_path_factory.mktemp("google") / "albert_tiny", tiny_arrays, TINY_CONFIG
    )


@pytest.fixture(scope="module")
def google_backbone(google_dir):
    return load_albert_from_google_checkpoint(google_dir)


@pytest.fixture(scope="module")
def tf2_dir(tmp_path_factory, tiny_arrays) -> Path:
    return write_tf2_saved_model(tmp_path_factory.mktemp("tf2") / "saved_model", tiny_arrays)


# --------------------------------------------------------------------------- config


def test_config_to_backbone_kwargs_maps_google_keys():
    assert albert_config_to_backbone_kwargs(TINY_CONFIG) == {
        "vocabulary_size": 30000,
        "num_layers": 3,
        "num_heads": 2,
        "embedding_dim": 16,
        "hidden_dim": 32,
        "intermediate_dim": 64,
        "num_groups": 1,
        "num_inner_repetitions": 1,
        "dropout": 0.0,
        "max_sequence_length": 64,
        "num_segments": 2,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"num_attention_heads": 3}, "hidden_size=32 is not divisible by num_attention_heads=3"),
        ({"num_hidden_groups": 2}, "num_hidden_layers=3 is not divisible by num_hidden_groups=2"),
    ],
)
def test_config_refuses_what_the_backbone_cannot_compute(change, message):
    with pytest.raises(AlbertWeightsError, match=re.escape(message)):
        albert_config_to_backbone_kwargs({**TINY_CONFIG, **change})


def test_config_names_missing_keys():
    config = {k: v for k, v in TINY_CONFIG.items() if k not in ("hidden_size", "vocab_size")}
    with pytest.raises(AlbertWeightsError, match="missing required key.*vocab_size, hidden_size"):
        albert_config_to_backbone_kwargs(config)


def test_build_albert_backbone_uses_the_kwargs():
    backbone = build_albert_backbone(**albert_config_to_backbone_kwargs(GROUPED_CONFIG))
    assert [backbone.num_layers, backbone.num_groups, backbone.num_inner_repetitions] == [4, 2, 2]


# --------------------------------------------------------------------------- Google checkpoints


def test_google_checkpoint_matches_numpy_albert(google_backbone, tiny_arrays):
    _assert_matches_reference(google_backbone, tiny_arrays, TINY_CONFIG)


def test_google_checkpoint_pooled_output(google_backbone, tiny_arrays):
    inputs = sample_inputs(TINY_CONFIG["vocab_size"])
    sequence = reference_sequence_output(tiny_arrays, TINY_CONFIG, inputs)
    expected = np.tanh(
        sequence[:, 0] @ tiny_arrays["bert/pooler/dense/kernel"] + tiny_arrays["bert/pooler/dense/bias"]
    )
    found = np.asarray(google_backbone(inputs)["pooled_output"])
    assert np.abs(found - expected).max() < TOLERANCE


def test_tolerance_catches_an_exact_gelu(google_backbone, tiny_arrays, monkeypatch):
    """Google's gelu is the tanh form; the erf form lands outside the tolerance (~6e-4 here)."""
    import albert_fixtures

    erf = np.vectorize(math.erf)
    monkeypatch.setattr(albert_fixtures, "google_gelu", lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))))
    inputs = sample_inputs(TINY_CONFIG["vocab_size"])
    exact = albert_fixtures.reference_sequence_output(tiny_arrays, TINY_CONFIG, inputs)
    assert np.abs(_sequence_output(google_backbone, inputs) - exact).max() > 3 * TOLERANCE


def test_google_checkpoint_groups_inner_layers_and_no_projection(tmp_path):
    """Two groups x two inner layers; embedding == hidden, so Google has no projection."""
    arrays = make_google_arrays(GROUPED_CONFIG, seed=1)
    assert not any("embedding_hidden_mapping_in" in name for name in arrays)
    ckpt = write_google_checkpoint(tmp_path / "grouped", arrays, GROUPED_CONFIG)
    _assert_matches_reference(load_albert(ckpt), arrays, GROUPED_CONFIG)


def test_google_checkpoint_picks_highest_step_or_given_prefix(tmp_path):
    old, new = make_google_arrays(GROUPED_CONFIG, seed=2), make_google_arrays(GROUPED_CONFIG, seed=3)
    write_google_checkpoint(tmp_path, old, GROUPED_CONFIG, name="model.ckpt-5")
    write_google_checkpoint(tmp_path, new, GROUPED_CONFIG, name="model.ckpt-20")
    _assert_matches_reference(load_albert_from_google_checkpoint(tmp_path), new, GROUPED_CONFIG)
    _assert_matches_reference(load_albert(str(tmp_path / "model.ckpt-5")), old, GROUPED_CONFIG)


def test_google_checkpoint_names_every_missing_variable(tmp_path):
    arrays = make_google_arrays(GROUPED_CONFIG, seed=4)
    del arrays["bert/pooler/dense/bias"]
    del arrays["bert/encoder/transformer/group_1/inner_group_1/LayerNorm_1/gamma"]
    ckpt = write_google_checkpoint(tmp_path, arrays, GROUPED_CONFIG)
    with pytest.raises(AlbertWeightsError, match="missing variable") as info:
        load_albert_from_google_checkpoint(ckpt)
    assert "bert/pooler/dense/bias" in str(info.value)
    assert "group_1/inner_group_1/LayerNorm_1/gamma" in str(info.value)


def test_google_checkpoint_names_shape_mismatch(tmp_path):
    arrays = make_google_arrays(GROUPED_CONFIG, seed=5)
    arrays["bert/pooler/dense/kernel"] = arrays["bert/pooler/dense/kernel"][:, :31]
    ckpt = write_google_checkpoint(tmp_path, arrays, GROUPED_CONFIG)
    message = "bert/pooler/dense/kernel: expected shape (32, 32), found (32, 31)"
    with pytest.raises(AlbertWeightsError, match=re.escape(message)):
        load_albert_from_google_checkpoint(ckpt)


def test_truncated_checkpoint_data_is_named(tmp_path):
    ckpt = write_google_checkpoint(tmp_path, make_google_arrays(GROUPED_CONFIG, seed=6), GROUPED_CONFIG)
    data = next(ckpt.glob("model.ckpt-best.data-*"))
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(AlbertWeightsError, match="cannot read variable 'bert/embeddings/word_embeddings'"):
        load_albert(ckpt)


def test_google_checkpoint_without_checkpoint_files(tmp_path):
    (tmp_path / "albert_config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(AlbertWeightsError, match=r"no TensorFlow checkpoint \(\*\.index file\)"):
        load_albert_from_google_checkpoint(tmp_path)


def test_google_checkpoint_with_bad_config_json(tmp_path):
    (tmp_path / "albert_config.json").write_text("{not json")
    with pytest.raises(AlbertWeightsError, match="albert_config.json is not valid JSON"):
        load_albert(tmp_path)


# --------------------------------------------------------------------------- TF-Hub


def test_tfhub_saved_model_with_prefix_infers_config(tf2_dir, tiny_arrays):
    backbone = load_albert_from_tfhub(tf2_dir, num_layers=3, num_heads=2)
    assert backbone.num_layers == 3 and backbone.vocabulary_size == 30000
    _assert_matches_reference(backbone, tiny_arrays, TINY_CONFIG)


def test_tfhub_saved_model_with_explicit_config(tf2_dir, tiny_arrays):
    _assert_matches_reference(load_albert(str(tf2_dir), config=TINY_CONFIG), tiny_arrays, TINY_CONFIG)


def test_tfhub_inference_asks_for_heads_it_cannot_infer(tf2_dir):
    with pytest.raises(AlbertWeightsError, match="cannot infer num_attention_heads for hidden_size=32"):
        load_albert_from_tfhub(tf2_dir)


@pytest.fixture(scope="module")
def tf1_module(tmp_path_factory, tiny_arrays) -> Path:
    return write_tf1_hub_module(tmp_path_factory.mktemp("tf1") / "albert_hub", tiny_arrays, TINY_CONFIG)


def test_tfhub_v1_module_uses_its_config_asset(tf1_module, tiny_arrays):
    assert detect_albert_source(tf1_module) == "tfhub"
    _assert_matches_reference(load_albert(tf1_module), tiny_arrays, TINY_CONFIG)


def test_tf1_saved_model_with_two_graphs_needs_tags(tf1_module, tiny_arrays, tmp_path):
    """Without tfhub_module.pb, hub.load cannot choose between the {} and {train} graphs."""
    plain = tmp_path / "tf1_plain"
    shutil.copytree(tf1_module, plain)
    (plain / "tfhub_module.pb").unlink()
    with pytest.raises(AlbertWeightsError, match=r"could not load .*needs tags=\[\.\.\.\]"):
        load_albert_from_tfhub(plain)
    _assert_matches_reference(load_albert_from_tfhub(plain, tags=[]), tiny_arrays, TINY_CONFIG)


def test_tfhub_saved_model_without_albert_variables(tmp_path):
    module = write_tf2_saved_model(tmp_path / "other", {"dense/kernel": np.ones((2, 2), np.float32)})
    with pytest.raises(AlbertWeightsError, match="bert/embeddings/word_embeddings.*not an ALBERT module"):
        load_albert_from_tfhub(module)


def test_corrupt_saved_model_is_named(tmp_path):
    module = write_tf2_saved_model(tmp_path / "broken", {"bert/pooler/dense/bias": np.ones(4, np.float32)})
    graph = module / "saved_model.pb"
    graph.write_bytes(graph.read_bytes()[:100])
    with pytest.raises(AlbertWeightsError, match="tensorflow_hub could not load .*broken.*saved_model.pb"):
        load_albert(module)


def test_tfhub_directory_without_saved_model(tmp_path):
    with pytest.raises(AlbertWeightsError, match="not a SavedModel"):
        load_albert_from_tfhub(tmp_path)


# --------------------------------------------------------------------------- presets


def test_preset_round_trip_gives_identical_outputs(google_backbone, tmp_path):
    preset = tmp_path / "albert_preset"
    google_backbone.save_to_preset(str(preset))
    assert detect_albert_source(str(preset)) == "preset"
    inputs = sample_inputs(TINY_CONFIG["vocab_size"])
    expected = _sequence_output(google_backbone, inputs)
    for reloaded in (load_albert(preset), load_albert_from_preset(str(preset))):
        assert reloaded.get_config() == google_backbone.get_config()
        np.testing.assert_array_equal(_sequence_output(reloaded, inputs), expected)


def test_preset_of_another_class_is_refused(tmp_path):
    config = {
        "module": "keras_hub.src.models.bert.bert_backbone",
        "registered_name": "keras_hub>BertBackbone",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlbertWeightsError, match="holds keras_hub>BertBackbone, not an AlbertBackbone"):
        load_albert(tmp_path)


def test_unknown_preset_name_is_named():
    with pytest.raises(AlbertWeightsError, match="could not load ALBERT preset 'no_such_albert'"):
        load_albert("no_such_albert")


# --------------------------------------------------------------------------- dispatch and paths


@pytest.mark.parametrize(
    ("handle", "kind"),
    [
        ("https://tfhub.dev/google/albert_base/3", "tfhub"),
        ("https://www.kaggle.com/models/google/albert/TensorFlow1/base/3", "tfhub"),
        ("kaggle://keras/albert/keras/albert_base_en_uncased/2", "preset"),
        ("hf://albert/albert-base-v2", "preset"),
        ("albert_base_en_uncased", "preset"),
    ],
)
def test_detect_remote_handles(handle, kind):
    assert detect_albert_source(handle) == kind


@pytest.mark.parametrize(
    "loader",
    [load_albert, load_albert_from_google_checkpoint, load_albert_from_tfhub, load_albert_from_preset],
)
def test_missing_path_is_named(loader, tmp_path):
    missing = tmp_path / "nowhere" / "albert_base"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        loader(missing)


def test_unknown_directory_format(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(AlbertWeightsError, match=r"not a known ALBERT format \(found \['notes.txt'\]\)"):
        load_albert(tmp_path)


def test_options_for_a_source_that_takes_none(google_dir):
    with pytest.raises(TypeError, match="num_layers"):
        load_albert(google_dir, num_layers=3)
