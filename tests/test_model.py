"""Backbones, weight parity with Hugging Face, the span model, training resume, artifacts."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from qa_fixtures import StopAfterChunks

from elma_utils.model import artifacts
from elma_utils.model.backbones import TINY_BERT, LayerwiseEncoder, build_bert_backbone
from elma_utils.model.inference import QAModel
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.model.training import fit_span_model
from elma_utils.squad.features import build_features


def _inputs(batch=2, seq=40, seed=0, vocab=30000):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (batch, seq)).astype("int32")
    seg = np.zeros_like(ids)
    seg[:, seq // 2 :] = 1
    mask = np.ones_like(ids)
    mask[-1, seq - 8 :] = 0
    return {"token_ids": ids, "segment_ids": seg, "padding_mask": mask}


def test_minilm_hidden_states_match_huggingface_bert():
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    from elma_utils.model.minilm import load_bert_backbone_from_hf, minilm_model_dir

    backbone, kwargs = load_bert_backbone_from_hf()
    assert kwargs["num_layers"] == 6 and kwargs["hidden_dim"] == 384
    x = _inputs()
    ours = [s.numpy() for s in LayerwiseEncoder(backbone).hidden_states(x)]
    hf = BertModel.from_pretrained(str(minilm_model_dir())).eval()
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(x["token_ids"], dtype=torch.long),
            token_type_ids=torch.tensor(x["segment_ids"], dtype=torch.long),
            attention_mask=torch.tensor(x["padding_mask"], dtype=torch.long),
            output_hidden_states=True,
        ).hidden_states
    keep = x["padding_mask"].astype(bool)
    assert len(ours) == len(ref) == 7
    for layer, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert np.abs(a[keep] - b.numpy()[keep]).max() < 1e-4, f"layer {layer}"
    functional = backbone(x)["sequence_output"].numpy()
    assert np.abs(functional[keep] - ours[-1][keep]).max() < 1e-5


def test_layerwise_encoder_matches_albert_functional_graph():
    from elma_utils.model.albert_weights import build_albert_backbone

    backbone = build_albert_backbone(
        vocabulary_size=30000,
        num_layers=4,
        num_heads=2,
        embedding_dim=16,
        hidden_dim=32,
        intermediate_dim=64,
        num_groups=2,
        num_inner_repetitions=1,
        dropout=0.0,
    )
    x = _inputs()
    enc = LayerwiseEncoder(backbone)
    states = enc.hidden_states(x)
    assert len(states) == 5 and states[0].shape[-1] == 32
    assert np.allclose(backbone(x)["sequence_output"].numpy(), states[-1].numpy(), atol=1e-5)
    assert len(enc.hidden_states(x, upto=2)) == 3
    # layers 0,1 use group 0 and layers 2,3 group 1: different outputs for the same input
    h = states[1]
    assert not np.allclose(
        enc.layer(0, h, x["padding_mask"]).numpy(), enc.layer(2, h, x["padding_mask"]).numpy()
    )


def _tiny_model(seed=0, dropout=0.0):
    keras.utils.set_random_seed(seed)
    model = SpanQAModel(build_bert_backbone(dropout=dropout, **TINY_BERT))
    model.build_for()
    return model


def test_span_logits_are_masked_outside_context_and_cls():
    model = _tiny_model()
    x = _inputs(vocab=30000)
    out = model(x)
    start = out["start_logits"].numpy()
    question = x["segment_ids"] == 0
    question[:, 0] = False
    assert (start[question] < -1e3).all()
    assert (start[x["padding_mask"] == 0] < -1e3).all()
    assert (np.abs(start[:, 0]) < 100).all()


@pytest.fixture(scope="module")
def small_features(dev_v11, minilm_tokenizer):
    return build_features(
        dev_v11.examples[:48],
        minilm_tokenizer,
        max_seq_len=96,
        doc_stride=48,
        max_query_len=24,
        progress=False,
    )


TRAIN = dict(
    batch_size=8,
    epochs=1.0,
    learning_rate=2e-3,
    warmup_fraction=0.1,
    weight_decay=0.01,
    checkpoint_every=3,
    seed=5,
    verbose=0,
)


def test_training_learns_and_resumes_exactly(tmp_path, small_features):
    steps = len(small_features) // 8
    assert steps >= 6
    full = _tiny_model()
    stats = fit_span_model(
        full, small_features, checkpoint_dir=tmp_path / "a", log_csv=tmp_path / "a.csv", **TRAIN
    )
    losses = [float(r.split(",")[1]) for r in (tmp_path / "a.csv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0]  # learning, not just running
    assert stats["resumed_from_step"] == 0 and stats["total_steps"] % 3 == 0

    interrupted = _tiny_model()
    with pytest.raises(KeyboardInterrupt):
        fit_span_model(
            interrupted,
            small_features,
            checkpoint_dir=tmp_path / "b",
            extra_callbacks=[StopAfterChunks(1)],
            **TRAIN,
        )
    assert json.loads((tmp_path / "b" / "state.json").read_text())["chunks_done"] == 1
    resumed = _tiny_model(seed=99)  # different initial weights: everything must come from the checkpoint
    stats = fit_span_model(resumed, small_features, checkpoint_dir=tmp_path / "b", **TRAIN)
    assert stats["resumed_from_step"] == 3
    for a, b in zip(full.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_artifact_round_trip_and_qamodel(tmp_path, minilm_tokenizer):
    model = _tiny_model(seed=3)
    cfg = {
        "backbone": {"kind": "bert", "kwargs": TINY_BERT},
        "max_seq_len": 64,
        "doc_stride": 32,
        "max_query_len": 16,
    }
    artifacts.save_artifact(tmp_path / "m", model, minilm_tokenizer, cfg)
    qa = QAModel.load(tmp_path / "m")
    x = _inputs(vocab=30000)
    np.testing.assert_allclose(
        qa.model(x)["start_logits"].numpy(), model(x)["start_logits"].numpy(), atol=1e-6
    )
    context = "The Denver Broncos defeated the Carolina Panthers 24 to 10 in Super Bowl 50. " * 3
    ans = qa.answer("Who won Super Bowl 50?", context)
    assert context[ans.char_start : ans.char_end] == ans.text and ans.text
    batch = qa.predict([("Who won?", context), ("Who lost?", context)])
    assert len(batch) == 2 and batch[0] == ans.__class__(**{**batch[0].to_dict()})


def test_qamodel_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QAModel.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        QAModel.load(tmp_path / "empty")
    with pytest.raises(TypeError, match="str or Path"):
        QAModel.load(42)
    qa = QAModel(_tiny_model(), None, {"max_seq_len": 64, "doc_stride": 32, "max_query_len": 16})
    with pytest.raises(ValueError, match="question is empty"):
        qa.answer("  ", "context")
    with pytest.raises(TypeError, match="context must be a str"):
        qa.answer("why?", b"bytes")


JAX_TRAIN = """
import json, sys, numpy as np, keras
assert keras.backend.backend() == "jax"
from elma_utils.model.backbones import TINY_BERT, build_bert_backbone
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.model.training import fit_span_model
from elma_utils.squad.features import QAFeatures
from pathlib import Path
out = Path(sys.argv[1])
feats = QAFeatures.load(out / "features.npz")
keras.utils.set_random_seed(0)
model = SpanQAModel(build_bert_backbone(dropout=0.0, **TINY_BERT)); model.build_for()
fit_span_model(model, feats, checkpoint_dir=out / "ckpt", batch_size=8, epochs=1.0, learning_rate=1e-3,
               warmup_fraction=0.1, weight_decay=0.01, checkpoint_every=2, verbose=0)
model.save_weights(out / "model.weights.h5")
x = feats.model_inputs(np.arange(4))
np.save(out / "start.npy", np.asarray(model(x)["start_logits"]))
"""


def test_training_on_jax_backend_loads_on_tensorflow(tmp_path, small_features):
    pytest.importorskip("jax")
    small_features.save(tmp_path / "features.npz")
    env = {**__import__("os").environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", JAX_TRAIN, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    model = _tiny_model(seed=7)
    model.load_weights(tmp_path / "model.weights.h5")
    x = small_features.model_inputs(np.arange(4))
    np.testing.assert_allclose(model(x)["start_logits"].numpy(), np.load(tmp_path / "start.npy"), atol=1e-4)


def test_artifact_weights_hold_no_optimizer_state(tmp_path, small_features, minilm_tokenizer):
    model = _tiny_model()
    fit_span_model(model, small_features, checkpoint_dir=tmp_path / "ckpt", **{**TRAIN, "epochs": 0.3})
    cfg = {
        "backbone": {"kind": "bert", "kwargs": TINY_BERT},
        "max_seq_len": 96,
        "doc_stride": 48,
        "max_query_len": 24,
    }
    artifacts.save_artifact(tmp_path / "m", model, minilm_tokenizer, cfg)
    size = (tmp_path / "m" / "model.weights.h5").stat().st_size
    assert size < model.count_params() * 4 * 1.2  # float32 weights only, not Adam's two moments
    qa = QAModel.load(tmp_path / "m")
    x = small_features.model_inputs(np.arange(2))
    np.testing.assert_allclose(qa.model(x)["end_logits"].numpy(), model(x)["end_logits"].numpy(), atol=1e-6)
