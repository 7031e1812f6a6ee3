"""Skimming in the loop (``early_exit.skim_finetune``): the targets moved onto kept positions,
the loss, and training on a tiny real model — frozen layers stay bit-identical, the tuned ones
learn the full model's answers on the skimmed sequence, a resumed run replays the same steps,
and the command writes an exits artifact ``adaptive_run`` can measure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qa_fixtures import TINY_WINDOWS, save_tiny_exits, tiny_span_model

from elma_utils.early_exit import skim_finetune as sf
from elma_utils.early_exit.skim import NEG_INF, SkimHead
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.squad.features import build_features

# ---------------------------------------------------------------- targets and loss (hand-made)


def test_labels_and_teacher_move_onto_the_kept_positions():
    positions = np.array([[0, 1, 4, 5, -1], [0, 2, 3, 6, 7]])
    teacher = np.arange(16, dtype=np.float32).reshape(2, 8)
    t = sf.skimmed_targets(positions, teacher, teacher + 100, np.array([4, 5]), np.array([5, 7]))
    np.testing.assert_array_equal(t["start_label"], [2, -1])  # row 1's start (5) was dropped
    np.testing.assert_array_equal(t["end_label"], [3, 4])
    np.testing.assert_array_equal(t["teacher_start"][0], [0, 1, 4, 5, NEG_INF])
    np.testing.assert_array_equal(t["teacher_end"][1], [108, 110, 111, 114, 115])
    assert sf.kept_label(positions, np.array([0, 0])).tolist() == [0, 0]  # [CLS] always kept


def test_distill_loss_is_kl_plus_the_kept_labels_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    # the teacher equal to every exit and no label kept: nothing to learn
    same = np.repeat(logits[:, :1], 3, axis=1)
    assert float(sf.distill_loss(same, same[:, 0], np.array([-1, -1]), 0.5, 2.0)) == pytest.approx(
        0.0, abs=1e-5
    )
    # pure cross-entropy (alpha 1) on the kept label only, averaged over rows and exits
    label = np.array([2, -1])
    got = float(sf.distill_loss(logits, logits[:, 0], label, 1.0, 2.0))
    log_p = logits[0] - np.log(np.exp(logits[0]).sum(axis=-1, keepdims=True))
    assert got == pytest.approx(-log_p[:, 2].sum() / 6, rel=1e-5)


# ---------------------------------------------------------------- training a tiny model


@pytest.fixture(scope="module")
def setup(dev_v11, minilm_tokenizer):
    feats = build_features(dev_v11.examples[:12], minilm_tokenizer, progress=False, **TINY_WINDOWS)
    rng = np.random.default_rng(2)
    head = SkimHead(rng.normal(size=64).astype(np.float32), 0.0, layer=1, block=8, tau=0.5)
    return feats, head


def _model() -> MultiExitQAModel:
    return MultiExitQAModel.from_span_model(tiny_span_model(seed=0, num_layers=3))


def _tuned(model: MultiExitQAModel) -> list[np.ndarray]:
    return [np.asarray(v) for part in sf._trained_parts(model, 1) for v in part.get_weights()]


def test_only_the_layers_after_the_skim_learn_and_they_learn_the_full_answers(setup):
    feats, head = setup
    model = _model()
    before = _tuned(model)
    info = sf.finetune_with_skim(model, head, feats, steps=30, taus=(0.5,), batch_size=8, learning_rate=3e-3,
                                 warmup_fraction=0.0, progress=False)  # fmt: skip
    assert info["finished"] and info["steps_done"] == 30 and info["resumed_from_step"] == 0
    assert info["last_loss"] < 0.7 * info["first_loss"]
    layer1 = model.backbone.transformer_layers[0].get_weights()
    ref = MultiExitQAModel.from_span_model(tiny_span_model(seed=0, num_layers=3))
    for a, b in zip(layer1, ref.backbone.transformer_layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the head's input is untouched
    for a, b in zip(model.exit_heads[0].get_weights(), ref.exit_heads[0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    emb = model.backbone.token_embedding.get_weights()[0]
    np.testing.assert_array_equal(emb, ref.backbone.token_embedding.get_weights()[0])
    assert any(not np.allclose(a, b) for a, b in zip(_tuned(model), before, strict=True))


def test_a_resumed_run_replays_the_same_steps(setup, tmp_path):
    feats, head = setup
    args = dict(
        steps=6, taus=(0.3, 0.5), batch_size=8, learning_rate=1e-3, progress=False, checkpoint_every=2
    )
    whole = _model()
    sf.finetune_with_skim(whole, head, feats, **args)
    part = _model()
    first = sf.finetune_with_skim(part, head, feats, checkpoint_dir=tmp_path, stop_after=3, **args)
    assert not first["finished"] and first["steps_done"] == 3 and (tmp_path / sf.CHECKPOINT).is_file()
    again = _model()  # a new process: fresh weights, the checkpoint restores the tuned state
    second = sf.finetune_with_skim(again, head, feats, checkpoint_dir=tmp_path, **args)
    assert second["resumed_from_step"] == 3 and second["finished"]
    for a, b in zip(_tuned(again), _tuned(whole), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    log = (tmp_path / sf.LOG).read_text().splitlines()
    assert log[0] == "step,tau,loss,kept_share,label_kept" and [r.split(",")[0] for r in log[1:]] == list(
        "123456"
    )
    assert all(0 < float(r.split(",")[3]) <= 1 for r in log[1:])
    other = SkimHead(head.w, head.b, layer=2)  # a checkpoint of another layer is refused
    with pytest.raises(ValueError, match=r"other settings \(skim_layer\)"):
        sf.finetune_with_skim(_model(), other, feats, checkpoint_dir=tmp_path, **args)
    with pytest.raises(ValueError, match=r"other settings \(steps, taus\)"):  # so are other taus or length
        sf.finetune_with_skim(
            _model(), head, feats, checkpoint_dir=tmp_path, **{**args, "steps": 8, "taus": (0.4,)}
        )


def test_bad_settings_are_refused_before_training(setup):
    feats, head = setup
    with pytest.raises(ValueError, match="must lie in 1..2"):
        sf.finetune_with_skim(_model(), head.with_settings(layer=3), feats, steps=1, progress=False)
    with pytest.raises(ValueError, match="keep thresholds"):
        sf.finetune_with_skim(_model(), head, feats, steps=1, taus=(0.0,), progress=False)


# ---------------------------------------------------------------- the command


def test_the_command_writes_an_exits_artifact_adaptive_run_can_measure(dev_v11, minilm_tokenizer, tmp_path,
                                                                       monkeypatch, capsys):  # fmt: skip
    from elma_utils.early_exit.experiment import load_exits
    from elma_utils.model.exit_training import predict_exit_logits

    monkeypatch.setenv("ELMA_CACHE_DIR", str(tmp_path / "cache"))
    exits = save_tiny_exits(tmp_path / "models", minilm_tokenizer, train_examples=24)
    head = SkimHead(
        np.random.default_rng(5).normal(size=64).astype(np.float32), 0.0, layer=2, block=8, tau=0.4
    )
    head.save(exits / "adaptive" / "L2" / "skim.npz")
    out = tmp_path / "tuned"
    with pytest.raises(SystemExit):
        sf.main(["--exits", str(exits), "--out", str(out)])  # neither --layer nor --head
    with pytest.raises(SystemExit):
        sf.main(["--exits", str(exits), "--layer", "1", "--out", str(out)])  # no head for layer 1
    assert "no skim head at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sf.main(["--exits", str(tmp_path), "--layer", "2", "--out", str(out)])
    assert "is no exits artifact" in capsys.readouterr().err
    assert not out.exists()

    argv = ["--exits", str(exits), "--layer", "2", "--out", str(out), "--epochs", "0.5", "--taus", "0.4",
            "--checkpoint-every", "1"]  # fmt: skip
    assert sf.main(argv) == 0
    assert "adaptive_run --exits" in capsys.readouterr().out
    ecfg = json.loads((out / "exits.json").read_text())
    assert (
        ecfg["mode"] == "skim_finetune"
        and ecfg["skim_head"]["layer"] == 2
        and ecfg["init_exits"] == str(exits)
    )
    assert ecfg["train"]["finished"] and ecfg["train"]["steps"] >= 1
    assert SkimHead.load(out / "adaptive" / "L2" / "skim.npz").settings() == head.settings()
    assert not (out / sf.CHECKPOINT).exists()
    tuned, tok, config, _ = load_exits(out)
    original, *_ = load_exits(exits)
    feats = build_features(dev_v11.examples[:3], tok, progress=False, **{k: config[k] for k in TINY_WINDOWS})
    a, _ = predict_exit_logits(tuned, feats, progress=False)
    b, _ = predict_exit_logits(original, feats, progress=False)
    np.testing.assert_allclose(a[:, :2], b[:, :2], atol=1e-5)  # exits up to the skim layer: as before
    assert not np.allclose(a[:, 2], b[:, 2], atol=1e-4)  # the tuned last exit: saved and loaded
    assert sf.main(argv) == 0  # done: the artifact is kept, nothing trains again
