"""Dev questions through the whole system (edge early exit → ELMA's SSH endpoint → server):
the summary, the predictions file and its sources agree with each part run on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle

from elma_utils.bench.end_to_end import (
    ask_all,
    ask_held_out,
    end_to_end_summary,
    full_model_answers,
    write_end_to_end_predictions,
)
from elma_utils.bench.loopback import LoopbackDeployment
from elma_utils.early_exit.policies import EntropyPolicy
from elma_utils.model.inference import QAModel
from elma_utils.squad.metrics import per_question_scores, score_predictions

pytestmark = pytest.mark.network


def test_whole_system_on_dev_questions(tmp_path, minilm_tokenizer, dev_v11):
    examples = dev_v11.examples[:24]
    model = save_tiny_artifact(tmp_path / "model", minilm_tokenizer)
    bundle = write_tiny_bundle(tmp_path / "bundle", minilm_tokenizer, -1.0)  # every layer computed
    with LoopbackDeployment(model, bundle, tmp_path / "work", way_in="endpoint") as dep:
        edge_model = dep.edge.edge
        local = [edge_model.answer(e.question, e.context) for e in examples]
        # a threshold between the edge's own entropies: some questions stay, the rest go
        h = np.array([min(a.entropies) for a in local])
        edge_model.policy = EntropyPolicy(float(np.median(h)))
        local = [edge_model.answer(e.question, e.context) for e in examples]  # under that policy
        results = ask_all(dep.edge, examples, progress=False)
        wire = dep.tunnel.stats.wire_bytes_sent + dep.tunnel.stats.wire_bytes_received
        stored = dep.server.store.stats().offloads
    reference = full_model_answers(QAModel.load(model), examples)
    summary = end_to_end_summary(examples, results, dev_v11.raw, "1.1", reference=reference, wire_bytes=wire)

    source = np.array([r.source for r in results])
    assert set(source) == {"edge", "server"}  # no fallbacks: the server was up
    assert stored == int(np.sum(source == "server"))
    for e, r, a in zip(examples, results, local, strict=True):
        if r.source == "server":  # the server runs the full model: its answer is the reference
            assert r.text == reference[e.qas_id]
        else:  # settled on the device: the edge model's own answer, at its exit layer
            assert (r.text, r.exit_layer) == (a.text, a.exit_layer)
    assert summary["questions"] == 24
    assert summary["share"]["edge"] + summary["share"]["server"] == pytest.approx(1.0)
    assert summary["share"]["server"] == pytest.approx(np.mean(source == "server"))
    per_q = per_question_scores(
        dev_v11.raw, {e.qas_id: r.text for e, r in zip(examples, results, strict=True)}, "1.1"
    )
    assert summary["f1"] == pytest.approx(100 * np.mean([per_q[e.qas_id][1] for e in examples]))
    weighted = sum(summary["share"][s] * (summary["f1_by_source"][s] or 0.0) for s in ("edge", "server"))
    assert summary["f1"] == pytest.approx(weighted)
    assert summary["f1_minus_full_model"] == pytest.approx(summary["f1"] - summary["full_model_f1"])
    assert summary["wire_bytes_per_offload"] == pytest.approx(wire / np.sum(source == "server"))
    assert sum(summary["settled_on_edge_at_layer"].values()) == int(np.sum(source == "edge"))
    assert summary["targets"] == {"min_edge_share": 0.6, "max_f1_loss": 0.5}
    assert summary["targets_met"]["f1_within"] == (summary["full_model_f1"] - summary["f1"] <= 0.5)

    paths = write_end_to_end_predictions(tmp_path / "out", "1.1", examples, results)
    written = json.loads(paths["predictions"].read_text())
    scores = score_predictions(dev_v11.raw, written, "1.1")  # official: the rest of dev scores 0
    assert scores["f1"] * len(dev_v11.examples) / 24 == pytest.approx(summary["f1"])
    sources = json.loads(paths["sources"].read_text())
    assert [sources[e.qas_id]["source"] for e in examples] == source.tolist()
    assert all(
        sources[e.qas_id]["edge_layers"] == r.exit_layer for e, r in zip(examples, results, strict=True)
    )


def test_held_out_folds_use_their_own_threshold_and_a_dead_server_means_fallbacks(
    tmp_path, minilm_tokenizer, dev_v11
):
    """Fold 0 may never exit (E_T -1: every question offloaded), fold 1 always exits (E_T 2):
    each question follows its own fold's E_T; then, with the server gone, offloads fall back."""
    examples = dev_v11.examples[:12]
    folds = [np.arange(12) % 2 == 0, np.arange(12) % 2 == 1]
    model = save_tiny_artifact(tmp_path / "model", minilm_tokenizer)
    bundle = write_tiny_bundle(tmp_path / "bundle", minilm_tokenizer, 0.5)
    with LoopbackDeployment(model, bundle, tmp_path / "work", way_in="endpoint") as dep:
        own = dep.edge.edge.policy
        results = ask_held_out(dep.edge, examples, [-1.0, 2.0], folds, progress=False)
        assert dep.edge.edge.policy is own  # put back
        with pytest.raises(ValueError, match="exactly once"):
            ask_held_out(dep.edge, examples, [0.5, 0.5], [folds[0], folds[0]], progress=False)
        dep.server.close()
        dead = ask_all(dep.edge, examples[:4], progress=False)
    assert [r.source for r in results] == ["server", "edge"] * 6
    assert all(r.exit_layer == 1 for r in results[1::2])  # E_T 2 settles every question at layer 1
    summary = end_to_end_summary(examples[:4], dead, dev_v11.raw, wire_bytes=1000)
    assert [r.source for r in dead] == ["edge-fallback"] * 4 and all(r.error for r in dead)
    assert summary["share"]["edge-fallback"] == 1.0 and summary["wire_bytes_per_offload"] is None
    assert "targets_met" not in summary  # no reference given: no claim about the targets


def test_a_summary_needs_one_result_per_question(dev_v11):
    with pytest.raises(ValueError, match="2 examples but 1 results"):
        end_to_end_summary(dev_v11.examples[:2], [object()], dev_v11.raw)
