"""The learned offload threshold: pricing stored offloads, choosing E_offload, the bundle that
carries it, and the edge runtime that keeps questions below it on the device."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from offload_helpers import CONTEXTS, make_answer
from qa_fixtures import write_tiny_bundle

from elma_utils.edge.protocol import AskRequest, EdgeResult
from elma_utils.export.bundle import THRESHOLDS, BundleError, check_thresholds, read_thresholds, verify_bundle
from elma_utils.server.offload_threshold import (
    COST_KEY,
    OFFLOAD_KEY,
    StoredOffload,
    gain_per_disagreement,
    learn_offload_threshold,
    offload_candidate,
    stored_offloads,
)
from elma_utils.server.store import HardQuestionStore


# -- what a difference is worth -------------------------------------------------------------------------
def test_gain_per_disagreement_is_the_f1_the_server_adds_per_unit_of_disagreement():
    # four questions: two where the answers agree, one where the server is right and the edge
    # wrong, one where the edge is right and the server wrong: a difference is worth nothing on average
    edge, server, d = [1.0, 0.5, 0.0, 1.0], [1.0, 0.5, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]
    g = gain_per_disagreement(edge, server, d)
    assert g["disagreements"] == 2 and g["ratio"] == pytest.approx(0.0)
    assert 0.0 <= g["upper"] <= 1.0  # an upper percentile: errs towards offloading
    right = gain_per_disagreement(
        [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]
    )  # the server always wins its differences
    assert right["ratio"] == pytest.approx(1.0) and right["upper"] == pytest.approx(1.0)
    half = gain_per_disagreement([0.0] * 10, [0.5] * 10, [1.0] * 10)
    assert half["ratio"] == pytest.approx(0.5) and half["upper"] == pytest.approx(0.5)
    none = gain_per_disagreement(
        [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]
    )  # nothing to learn from: assume the worst
    assert none["disagreements"] == 0 and none["upper"] == 1.0
    with pytest.raises(ValueError, match="one value per question"):
        gain_per_disagreement([1.0], [1.0, 0.0], [0.0])


# -- choosing E_offload ------------------------------------------------------------------------------------
def offloads(*pairs: tuple[float, float]) -> list[StoredOffload]:
    return [StoredOffload(h, d) for h, d in pairs]


def test_threshold_is_the_largest_observed_entropy_within_the_budget():
    rows = offloads((0.50, 0.0), (0.55, 0.0), (0.60, 1.0), (0.70, 0.0), (0.80, 1.0), (0.90, 0.0))
    # 100 questions asked, a difference worth 0.2 F1: each disagreeing row costs 0.2 points
    learned = learn_offload_threshold(rows, 100, 0.2, e_t=0.45, budget=0.25)
    assert learned[OFFLOAD_KEY] == 0.70  # 0.80 would bring the cost to 0.4 > 0.25
    assert learned["kept_on_device"] == 4 and learned["disagreeing_kept"] == 1
    assert learned[COST_KEY] == pytest.approx(0.2)
    assert learned["cost_steps"][-1] == (0.7, 0.2)
    everything = learn_offload_threshold(rows, 100, 0.0, e_t=0.45, budget=0.25)  # differences worth nothing
    assert everything[OFFLOAD_KEY] == 0.90 and everything["kept_on_device"] == 6  # the highest observed only
    nothing = learn_offload_threshold(offloads((0.6, 1.0)), 10, 1.0, e_t=0.45, budget=0.15)
    assert nothing[OFFLOAD_KEY] is None and nothing["kept_on_device"] == 0 and nothing[COST_KEY] == 0.0


def test_threshold_only_rises_from_the_current_one_and_counts_what_it_already_spent():
    rows = offloads((0.5, 1.0), (0.6, 0.0), (0.7, 1.0), (0.8, 0.0))
    # the current E_offload 0.6 already keeps 0.5 and 0.6 (cost 0.1 spent); 0.7 adds 0.1, 0.8 adds 0
    learned = learn_offload_threshold(rows, 100, 0.1, e_t=0.4, current=0.6, spent=0.1, budget=0.2)
    assert learned[OFFLOAD_KEY] == 0.8 and learned["above_current"] == 2
    assert learned[COST_KEY] == pytest.approx(0.2)
    over = learn_offload_threshold(rows, 100, 0.1, e_t=0.4, current=0.6, spent=0.15, budget=0.2)
    assert over[OFFLOAD_KEY] is None  # 0.7 would exceed the budget; nothing above it can be reached


def test_tied_entropies_are_kept_or_offloaded_together():
    rows = offloads((0.6, 0.0), (0.7, 0.0), (0.7, 1.0))
    learned = learn_offload_threshold(rows, 10, 1.0, e_t=0.5, budget=5.0)
    assert learned[OFFLOAD_KEY] == 0.6  # both 0.7 rows cost 10 points together
    assert learn_offload_threshold(rows, 10, 1.0, e_t=0.5, budget=10.0)[OFFLOAD_KEY] == 0.7


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="questions_asked"):
        learn_offload_threshold([], 0, 0.5, e_t=0.3)
    with pytest.raises(ValueError, match="0..1"):
        learn_offload_threshold([], 5, 1.5, e_t=0.3)


# -- the store holds both answers -------------------------------------------------------------------------
def ask(i: int, edge_text: str, entropies: tuple[float, ...], version: str = "edge-a") -> AskRequest:
    edge = EdgeResult(text=edge_text, model_version=version, entropies=entropies)
    return AskRequest(id=f"r{i}", device_id="d1", question=f"Question {i}?", edge=edge, context=CONTEXTS[0])


def test_stored_offloads_price_each_offload_with_the_last_layer_entropy(tmp_path):
    with HardQuestionStore(tmp_path / "store.sqlite3") as store:
        for request, server_text in (
            (ask(0, "Paris", (0.9, 0.7)), "Paris"),  # same answer: nothing lost by keeping it
            (ask(1, "capital", (0.9, 0.8)), "Paris"),  # no word in common
            (ask(2, "most populous city", (0.9, 0.6)), "populous city"),  # partial overlap
            (ask(3, "Paris", (0.95, 0.9), version="edge-b"), "France"),
        ):
            store.record(request, make_answer(request, server_text))
    rows = {o.entropy: o.disagreement for o in stored_offloads(tmp_path / "store.sqlite3", ["edge-a"])}
    assert rows == pytest.approx({0.7: 0.0, 0.8: 1.0, 0.6: 1.0 - 0.8})  # F1 of 2 of 3 words: 0.8
    assert len(stored_offloads(tmp_path / "store.sqlite3")) == 4  # any version


# -- the bundle and the device -------------------------------------------------------------------------
def test_thresholds_check_refuses_an_offload_threshold_it_cannot_honour():
    ok = check_thresholds({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: 0.6})
    assert ok[OFFLOAD_KEY] == 0.6
    for bad, why in (
        ({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: 0.3}, "E_T ≤ E_offload"),
        ({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: float("nan")}, "finite number"),
        ({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: "0.6"}, "finite number"),
        ({"policy": "never", OFFLOAD_KEY: 0.6}, "needs an entropy policy"),
    ):
        with pytest.raises(BundleError, match=why):
            check_thresholds(bad)


def test_the_device_keeps_questions_below_the_learned_threshold(tmp_path, dev_v11, minilm_tokenizer):
    from elma_utils.edge.runtime import EdgeModel

    examples = [e for e in dev_v11.examples[:40] if not e.is_impossible][:8]
    current = write_tiny_bundle(tmp_path / "current", minilm_tokenizer, entropy_threshold=-1.0)
    before = EdgeModel.load(current)
    answers = before.answer_features(examples, before.features_for(examples))
    assert not any(a.solved for a in answers)  # E_T -1: nothing settles, everything would be offloaded
    entropies = sorted(a.entropy for a in answers)
    middle = entropies[3]
    # read_thresholds refuses E_offload < E_T: the learned value is always ≥ E_T, as here
    learned = {OFFLOAD_KEY: middle, COST_KEY: 0.05}
    candidate = offload_candidate(current, tmp_path / "candidate", learned)
    manifest = verify_bundle(candidate)  # the new thresholds.json is listed with its sha256
    assert read_thresholds(candidate)[OFFLOAD_KEY] == middle
    assert json.loads((candidate / THRESHOLDS).read_text())[COST_KEY] == 0.05
    assert manifest["model_version"].startswith("candidate-offload")
    assert read_thresholds(current).get(OFFLOAD_KEY) is None  # the current bundle is untouched
    after = EdgeModel.load(candidate)
    kept = after.answer_features(examples, after.features_for(examples))
    for a, b in zip(answers, kept, strict=True):
        assert b.solved == (a.entropy <= middle)  # kept exactly where offloading would not pay
        assert (b.text, b.exit_layer, b.entropy) == (a.text, a.exit_layer, a.entropy)  # same answer
    assert sum(b.solved for b in kept) == sum(h <= middle for h in entropies) >= 4
    after.offload_threshold = None  # a device told to offload everything it does not settle
    assert not any(a.solved for a in after.answer_features(examples, after.features_for(examples)))


def test_offload_candidate_refuses_a_threshold_below_e_t(tmp_path, minilm_tokenizer):
    current = write_tiny_bundle(tmp_path / "current", minilm_tokenizer, entropy_threshold=0.5)
    with pytest.raises(BundleError, match="E_T ≤ E_offload"):
        offload_candidate(current, tmp_path / "candidate", {OFFLOAD_KEY: 0.4, COST_KEY: 0.0})


def test_learned_record_is_json(tmp_path):
    rows = [
        StoredOffload(float(h), float(d))
        for h, d in zip(np.linspace(0.5, 0.9, 5), [0, 1, 0, 0, 1], strict=True)
    ]
    learned = learn_offload_threshold(rows, 50, 0.3, e_t=0.45)
    assert json.loads(json.dumps(learned))[OFFLOAD_KEY] == learned[OFFLOAD_KEY]
    assert dataclasses.asdict(rows[0]) == {"entropy": 0.5, "disagreement": 0.0}
