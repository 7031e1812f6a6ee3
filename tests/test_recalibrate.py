"""A retrained edge's E_T is chosen again on calibration questions (early_exit.recalibrate).

Tiny random 3-layer model with its own exit heads, real dev questions. The Keras-side replay
that picks E_T must predict what the exported edge runtime then does on the same questions.
"""

from __future__ import annotations

import numpy as np
import pytest
from qa_fixtures import TINY_WINDOWS, save_tiny_artifact

from elma_utils.early_exit.experiment import load_exits_model_from
from elma_utils.early_exit.recalibrate import NOT_RECALIBRATED, recalibrate_entropy_threshold
from elma_utils.early_exit.skim import SkimHead
from elma_utils.export.bundle import read_thresholds, write_bundle
from elma_utils.server.publish import EvalSet, evaluate_bundle

WINDOWS = {"seq_len": TINY_WINDOWS["max_seq_len"], "doc_stride": TINY_WINDOWS["doc_stride"],
           "max_query_len": TINY_WINDOWS["max_query_len"]}  # fmt: skip
OLD = {"policy": "entropy", "E_T": 0.2, "rule": "max", "note": "kept"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory, minilm_tokenizer):
    full = save_tiny_artifact(tmp_path_factory.mktemp("full"), minilm_tokenizer, seed=3, num_layers=3)
    multi, tokenizer, _ = load_exits_model_from(full, 3)
    return multi, tokenizer


@pytest.fixture(scope="module")
def questions(dev_v11):
    return dev_v11.examples[400:440]


@pytest.mark.parametrize("max_f1_loss", [0.0, 100.0])
def test_new_e_t_meets_the_target_and_the_edge_runtime_does_what_the_replay_said(
    edge, questions, dev_v11, tmp_path, max_f1_loss
):
    multi, tokenizer = edge
    new, report = recalibrate_entropy_threshold(
        multi, tokenizer, questions, dev_v11.raw, "1.1", OLD, max_f1_loss=max_f1_loss, **WINDOWS
    )
    assert report["status"] == "recalibrated" and report["questions"] == len(questions)
    assert report["E_T_before"] == 0.2 and new["E_T"] == report["E_T"]
    assert {k: v for k, v in new.items() if k != "E_T"} == {k: v for k, v in OLD.items() if k != "E_T"}
    assert report["f1"] >= report["full_depth_f1"] - max_f1_loss - 1e-9
    if max_f1_loss == 100.0:  # anything goes: the cheapest setting, every question at layer 1
        assert report["avg_exit_layer"] == 1.0
    bundle = write_bundle(
        multi,
        tokenizer,
        tmp_path / "bundle",
        precision="float32",
        thresholds=new,
        model_version="t",
        **WINDOWS,
    )
    assert read_thresholds(bundle)["E_T"] == report["E_T"]
    measured = evaluate_bundle(bundle, [EvalSet("calibration", questions, dev_v11.raw, "1.1")])
    assert measured["avg_exit_layer"] == pytest.approx(report["avg_exit_layer"], abs=1e-9)
    assert measured["f1"] == pytest.approx(report["f1"], abs=1e-6)


def test_a_skimming_edge_is_recalibrated_on_what_its_runtime_computes(edge, questions, dev_v11, tmp_path):
    """With the bundle's skim head, the replay skims after layer 1 as the runtime does: the
    skimming bundle with the new E_T exits and scores exactly as the replay said."""
    multi, tokenizer = edge
    hidden = int(multi.backbone.hidden_dim)
    w = np.random.default_rng(5).normal(size=hidden) / np.sqrt(hidden)
    head = SkimHead(w.astype(np.float32), -2.0, layer=1, block=8, tau=0.5)  # keeps a minority of blocks
    new, report = recalibrate_entropy_threshold(
        multi, tokenizer, questions, dev_v11.raw, "1.1", OLD, max_f1_loss=0.0, skim=head, **WINDOWS
    )
    assert report["status"] == "recalibrated" and report["skimmed"] == head.settings()
    bundle = write_bundle(
        multi, tokenizer, tmp_path / "bundle", precision="float32", thresholds=new, model_version="t",
        skim=head, **WINDOWS,
    )  # fmt: skip
    measured = evaluate_bundle(bundle, [EvalSet("calibration", questions, dev_v11.raw, "1.1")])
    assert measured["avg_exit_layer"] == pytest.approx(report["avg_exit_layer"], abs=1e-9)
    assert measured["f1"] == pytest.approx(report["f1"], abs=1e-6)
    _, plain = recalibrate_entropy_threshold(
        multi, tokenizer, questions, dev_v11.raw, "1.1", OLD, max_f1_loss=0.0, **WINDOWS
    )
    assert plain["skimmed"] is None and plain["full_depth_f1"] != report["full_depth_f1"]  # it did skim


@pytest.mark.parametrize(
    ("thresholds", "why"),
    [
        ({"policy": "patience", "patience": 2}, "policy 'patience'"),
        ({"policy": "entropy", "E_T": 0.5, "no_answer_margin": 1.0, "null_threshold": -2.0}, "SQuAD 2.0"),
    ],
)
def test_other_policies_are_kept_as_they_are(edge, questions, dev_v11, thresholds, why):
    multi, tokenizer = edge
    same, report = recalibrate_entropy_threshold(
        multi, tokenizer, questions, dev_v11.raw, "1.1", thresholds, **WINDOWS
    )
    assert same == thresholds and report["status"] == NOT_RECALIBRATED and why in report["why"]


def test_no_calibration_questions_is_an_error(edge, dev_v11):
    multi, tokenizer = edge
    with pytest.raises(ValueError, match="no calibration questions"):
        recalibrate_entropy_threshold(multi, tokenizer, [], dev_v11.raw, "1.1", OLD, **WINDOWS)


def test_middle_of_gap():
    from elma_utils.early_exit.recalibrate import middle_of_gap

    h = [[0.2, 0.5, float("nan")], [0.8, 0.5, 0.3]]
    assert middle_of_gap(0.5, h) == pytest.approx(0.65)  # halfway to 0.8
    assert middle_of_gap(0.25, h) == pytest.approx(0.275)
    assert middle_of_gap(0.8, h) == pytest.approx(0.9)  # nothing above: halfway to 1
    assert middle_of_gap(1.0, h) == 1.0
