"""The multi-exit network: exits after every layer, training modes, the loss worked by hand."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from elma_utils.model.backbones import TINY_BERT, build_bert_backbone
from elma_utils.model.exit_training import fit_exit_heads, predict_exit_logits
from elma_utils.model.multi_exit import ExitLoss, MultiExitQAModel
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.squad.features import build_features


def _span_model(seed=0):
    keras.utils.set_random_seed(seed)
    m = SpanQAModel(build_bert_backbone(dropout=0.0, **{**TINY_BERT, "num_layers": 3}))
    m.build_for()
    return m


def _inputs(seq=24):
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (2, seq)).astype("int32")
    seg = np.zeros_like(ids)
    seg[:, 8:] = 1
    return {"token_ids": ids, "segment_ids": seg, "padding_mask": np.ones_like(ids)}


def test_last_exit_reproduces_the_fine_tuned_model():
    span = _span_model()
    multi = MultiExitQAModel.from_span_model(span)
    x = _inputs()
    out = multi(x)
    assert out["start_logits"].shape == (2, 3, 24)
    np.testing.assert_allclose(out["start_logits"][:, -1], span(x)["start_logits"], atol=1e-5)
    np.testing.assert_allclose(out["end_logits"][:, -1], span(x)["end_logits"], atol=1e-5)
    edge = MultiExitQAModel.from_span_model(span, num_exits=2)
    assert edge(x)["start_logits"].shape == (2, 2, 24)
    with pytest.raises(ValueError, match="num_exits must be in 1..3"):
        MultiExitQAModel(span.backbone, num_exits=4)


def test_trainable_parts_per_mode():
    multi = MultiExitQAModel.from_span_model(_span_model())
    multi.set_trainable_for("two_stage")
    names = {v.path for v in multi.trainable_variables}
    assert names and all("exit_" in n for n in names) and not any("exit_3" in n for n in names)
    multi.set_trainable_for("joint")
    names = {v.path for v in multi.trainable_variables}
    assert any("transformer_layer_0" in n for n in names) and any("exit_3" in n for n in names)
    assert not any("pooled_dense" in n for n in names)
    with pytest.raises(ValueError, match="unknown exit training mode"):
        multi.set_trainable_for("magic")


def test_exit_loss_by_hand():
    n = 8
    uniform = np.zeros((1, 2, n), "float32")
    label = np.array([3])
    # two exits with uniform logits: each CE = log(n)
    assert float(ExitLoss(2, "two_stage")(label, uniform)) == pytest.approx(np.log(n), rel=1e-5)
    # joint weights 1/3 and 2/3: exit 2 is one-hot on the label (CE≈0) → loss = log(n)/3
    y = uniform.copy()
    y[0, 1, 3] = 50.0
    assert float(ExitLoss(2, "joint")(label, y)) == pytest.approx(np.log(n) * (1 / 3), rel=1e-3)
    # distillation: an exit equal to its teacher has KL 0, so its loss is alpha * CE
    same = np.zeros((1, 2, n), "float32")
    loss = float(ExitLoss(2, "distill", alpha=0.5)(label, same))
    assert loss == pytest.approx(0.5 * (0.5 * np.log(n)) + 0.5 * np.log(n), rel=1e-5)


def test_two_stage_training_changes_only_the_exits(dev_v11, minilm_tokenizer):
    feats = build_features(
        dev_v11.examples[:40],
        minilm_tokenizer,
        max_seq_len=96,
        doc_stride=48,
        max_query_len=24,
        progress=False,
    )
    span = _span_model()
    multi = MultiExitQAModel.from_span_model(span)
    before_backbone = [w.copy() for w in span.backbone.get_weights()]
    before_final = [w.copy() for w in multi.exit_heads[-1].get_weights()]
    before_first = [w.copy() for w in multi.exit_heads[0].get_weights()]
    stats = fit_exit_heads(
        multi, feats, mode="two_stage", batch_size=8, epochs=2.0, learning_rate=5e-3, verbose=0
    )
    assert stats["steps"] >= 4
    for a, b in zip(before_backbone, span.backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before_final, multi.exit_heads[-1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b) for a, b in zip(before_first, multi.exit_heads[0].get_weights(), strict=True)
    )
    start, end = predict_exit_logits(multi, feats, progress=False)
    assert start.shape == (len(feats), 3, 96)
    # the last exit's logits equal the fine-tuned model's (training changed no shared weight)
    x = feats.model_inputs(np.arange(4))
    np.testing.assert_allclose(start[:4, -1, :96], span(x)["start_logits"], atol=1e-4)


def test_joint_distill_checkpoints_and_a_resumed_run_matches_an_uninterrupted_one(
    dev_v11, minilm_tokenizer, tmp_path
):
    """A long joint_distill run (a whole epoch on a CPU) survives being killed: every chunk is
    checkpointed (weights and optimizer state) and a fresh process continues exactly."""
    import json

    from qa_fixtures import StopAfterChunks

    feats = build_features(dev_v11.examples[:30], minilm_tokenizer, max_seq_len=96, doc_stride=48,
                           max_query_len=24, progress=False)  # fmt: skip
    args = dict(
        mode="joint_distill", batch_size=8, epochs=1.0, learning_rate=1e-3, verbose=0, checkpoint_every=2
    )
    whole = MultiExitQAModel.from_span_model(_span_model())
    stats = fit_exit_heads(whole, feats, checkpoint_dir=tmp_path / "a", **args)
    assert stats["steps"] % 2 == 0 and stats["steps"] >= 4 and stats["resumed_from_step"] == 0
    assert json.loads((tmp_path / "a" / "state.json").read_text())["chunks_done"] == stats["steps"] // 2
    with pytest.raises(KeyboardInterrupt):
        fit_exit_heads(MultiExitQAModel.from_span_model(_span_model()), feats, checkpoint_dir=tmp_path / "b",
                       extra_callbacks=[StopAfterChunks(1)], **args)  # fmt: skip
    resumed = MultiExitQAModel.from_span_model(_span_model(seed=7))  # other weights: all from the checkpoint
    again = fit_exit_heads(resumed, feats, checkpoint_dir=tmp_path / "b", **args)
    assert again["resumed_from_step"] == 2 and again["steps"] == stats["steps"]
    start = MultiExitQAModel.from_span_model(_span_model())
    moved = [not np.allclose(a, b) for a, b in zip(whole.get_weights(), start.get_weights(), strict=True)]
    assert any(moved)  # joint_distill trains the backbone too
    for a, b in zip(whole.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
