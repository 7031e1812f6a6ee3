"""A running (here: interrupted) exits training's checkpoint as an exits artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from elma_utils.early_exit.snapshot import main, snapshot_exits


@pytest.fixture
def interrupted(tmp_path, minilm_tokenizer, dev_v11):
    """A tiny joint_distill run stopped after its first checkpointed chunk, as a run part way is."""
    from qa_fixtures import TINY_WINDOWS, StopAfterChunks, save_tiny_exits

    from elma_utils.early_exit.exits_artifact import full_model_path
    from elma_utils.early_exit.experiment import load_exits, load_exits_model_from
    from elma_utils.model.exit_training import fit_exit_heads
    from elma_utils.squad.features import build_features

    exits = save_tiny_exits(tmp_path, minilm_tokenizer)
    full = full_model_path(exits, json.loads((exits / "exits.json").read_text()))
    start = load_exits(exits)[0]
    multi, _, _ = load_exits_model_from(full)
    multi.set_weights(start.get_weights())
    feats = build_features(dev_v11.examples[:30], minilm_tokenizer, progress=False, **TINY_WINDOWS)
    training = tmp_path / "tiny-exits-joint_distill-1ep"
    with pytest.raises(KeyboardInterrupt):
        fit_exit_heads(multi, feats, mode="joint_distill", batch_size=8, epochs=1.0, learning_rate=1e-3,
                       verbose=0, checkpoint_dir=training / "checkpoint", checkpoint_every=2,
                       extra_callbacks=[StopAfterChunks(1)])  # fmt: skip
    return full, training, start, multi


def test_the_snapshot_holds_the_checkpointed_weights(interrupted, tmp_path):
    from elma_utils.early_exit.experiment import load_exits

    full, training, start, trained = interrupted
    out = snapshot_exits(training, full, tmp_path / "snap")
    multi, _, _, ecfg = load_exits(out)
    assert ecfg["snapshot"]["chunks_done_at_least"] == 1 and ecfg["num_exits"] == trained.num_exits
    assert ecfg["snapshot"]["losses"]["loss"] > 0
    for a, b in zip(multi.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(multi.get_weights(), start.get_weights(), strict=True))
    with pytest.raises(FileExistsError, match="exists"):
        snapshot_exits(training, full, out)


def test_the_command_evaluates_the_snapshot_and_refuses_what_it_cannot_use(interrupted, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    full, training, _, _ = interrupted
    monkeypatch.setenv("ELMA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "snap"
    assert main(["--training", str(training), "--full", str(full), "--out", str(out), "--eval", "6"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("F1 per exit on 6 dev-v1.1 questions: "))
    f1 = [float(x) for x in line.split(": ")[1].split()]
    assert len(f1) == 3 and all(0 <= x <= 100 for x in f1)
    for argv, says in (
        (["--training", str(tmp_path / "nothing"), "--full", str(full), "--out", str(tmp_path / "s2")],
         "no finished chunk"),
        (["--training", str(training), "--full", str(tmp_path), "--out", str(tmp_path / "s3")],
         "no full-model artifact"),
        (["--training", str(training), "--full", str(full), "--out", str(out)], "exists"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err
