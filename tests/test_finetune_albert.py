"""ALBERT end to end: Google checkpoint → `finetune` → artifact → QAModel with SentencePiece."""

from __future__ import annotations

import dataclasses
import json

import pytest
from albert_fixtures import TINY_CONFIG, make_google_arrays, write_google_checkpoint

from elma_utils import config
from elma_utils.cli import main
from elma_utils.model.finetune import finetune
from elma_utils.model.inference import QAModel


@pytest.fixture()
def isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMA_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("ELMA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_albert_checkpoint_finetunes_into_a_working_qa_model(isolated_dirs):
    ckpt = write_google_checkpoint(
        isolated_dirs / "albert_tiny", make_google_arrays(TINY_CONFIG, seed=0), TINY_CONFIG
    )
    profile = dataclasses.replace(
        config.get_profile("smoke"),
        backbone="albert",
        backbone_source=str(ckpt),
        train_examples=48,
        v2_unanswerable_ratio=0.0,
        max_seq_len=64,
        doc_stride=32,
        max_query_len=16,
    )
    out = finetune(profile, "albert-tiny", verbose=0)
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["backbone"]["kind"] == "albert"
        and cfg["backbone"]["kwargs"]["num_layers"] == TINY_CONFIG["num_hidden_layers"]
    )
    metrics = json.loads((out / "metrics.json").read_text())["train"]
    assert metrics["span_recovery"]["rate"] >= 0.95 and metrics["total_steps"] >= 1
    qa = QAModel.load(out)
    assert qa.tokenizer.kind == "sentencepiece"
    context = "The Normans gave their name to Normandy, a region in France, in the 10th century."
    ans = qa.answer("Where is Normandy?", context)
    assert ans.text and context[ans.char_start : ans.char_end] == ans.text
    # a finished artifact is not trained again
    assert finetune(profile, "albert-tiny", verbose=0) == out
    too_long = dataclasses.replace(profile, max_seq_len=128)
    with pytest.raises(ValueError, match="exceeds the backbone's 64 positions"):
        finetune(too_long, "albert-too-long", verbose=0)


def test_cli_reports_bad_backbone_source(isolated_dirs, capsys):
    code = main(
        [
            "train",
            "--profile",
            "smoke",
            "--backbone",
            "albert",
            "--backbone-source",
            str(isolated_dirs / "nope"),
        ]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err
