"""The learned offload threshold: pricing stored offloads, choosing E_offload, the bundle that
carries it, and the edge runtime that keeps questions below it on the device."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from offload_helpers import CONTEXTS, make_answer
from qa_fixtures import write_tiny_bundle

from elma_utils.edge.protocol import AskRequest, EdgeResult, ProtocolError
from elma_utils.export.bundle import (
    THRESHOLDS,
    BundleError,
    check_thresholds,
    read_thresholds,
    verify_bundle,
    with_thresholds,
)
from elma_utils.server.offload_threshold import (
    COST_KEY,
    OFFLOAD_KEY,
    StoredOffload,
    gain_per_disagreement,
    learn_from_store,
    learn_offload_threshold,
    offload_candidate,
    reported_questions,
    same_weights_versions,
    stored_offloads,
    weights_fingerprint,
)
from elma_utils.server.store import HardQuestionStore


# -- what a difference is worth -------------------------------------------------------------------------
def test_gain_per_disagreement_is_the_f1_the_server_adds_per_unit_of_disagreement():
    # 40 questions: 20 agree; of the 20 that differ the server wins 12 and the edge 8
    edge = [1.0] * 20 + [0.0] * 12 + [1.0] * 8
    server = [1.0] * 20 + [1.0] * 12 + [0.0] * 8
    d = [0.0] * 20 + [1.0] * 20
    g = gain_per_disagreement(edge, server, d)
    assert g["disagreements"] == 20 and g["ratio"] == pytest.approx(4 / 20)
    # an upper bootstrap percentile: errs towards offloading, more so at a higher percentile
    assert g["ratio"] < g["upper"] < 1.0
    low = gain_per_disagreement(edge, server, d, percentile=10.0)
    assert low["upper"] == pytest.approx(g["ratio"]) and low["upper"] < g["upper"]  # never below the ratio
    half = gain_per_disagreement([0.0] * 10, [0.5] * 10, [1.0] * 10)
    assert half["ratio"] == pytest.approx(0.5) and half["upper"] == pytest.approx(0.5)
    # too few disagreements to tell (here 2, the edge right in one): the server is assumed right
    few = gain_per_disagreement([1.0, 0.5, 0.0, 1.0], [1.0, 0.5, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0])
    assert few["ratio"] == pytest.approx(0.0) and few["upper"] == 1.0 and "assumed right" in few["why"]
    none = gain_per_disagreement([1.0, 0.0], [1.0, 0.0], [0.0, 0.0])
    assert none["disagreements"] == 0 and none["ratio"] is None and none["upper"] == 1.0
    with pytest.raises(ValueError, match="one value per question"):
        gain_per_disagreement([1.0], [1.0, 0.0], [0.0])


# -- choosing E_offload ------------------------------------------------------------------------------------
def offloads(*pairs: tuple[float, float]) -> list[StoredOffload]:
    return [StoredOffload(h, d) for h, d in pairs]


def test_threshold_is_the_largest_observed_entropy_within_the_budget():
    rows = offloads((0.50, 0.0), (0.55, 0.0), (0.60, 1.0), (0.70, 0.0), (0.80, 1.0), (0.90, 0.0))
    # 100 questions asked, a difference worth 0.2 F1: each disagreeing row costs 0.2 points
    learned = learn_offload_threshold(rows, 100, 0.2, e_t=0.45, budget=0.25, resamples=0)
    assert learned[OFFLOAD_KEY] == 0.70  # 0.80 would bring the cost to 0.4 > 0.25
    assert learned["kept_on_device"] == 4 and learned["disagreeing_kept"] == 1
    assert learned[COST_KEY] == pytest.approx(0.2) == learned["cost_plain"]
    assert learned["cost_steps"][-1] == (0.7, 0.2)
    everything = learn_offload_threshold(rows, 100, 0.0, e_t=0.45, budget=0.25)  # differences worth nothing
    assert everything[OFFLOAD_KEY] == 0.90 and everything["kept_on_device"] == 6  # the highest observed only
    nothing = learn_offload_threshold(offloads((0.6, 1.0)), 10, 1.0, e_t=0.45, budget=0.15)
    assert nothing[OFFLOAD_KEY] is None and nothing["kept_on_device"] == 0 and nothing[COST_KEY] == 0.0


def test_the_bootstrapped_cost_is_never_below_the_plain_sum_and_chooses_no_higher():
    rng = np.random.default_rng(3)
    pairs = zip(rng.uniform(0.5, 1.0, 30), (rng.random(30) < 0.3).astype(float), strict=True)
    rows = offloads(*((float(h), float(d)) for h, d in pairs))
    plain = learn_offload_threshold(rows, 200, 0.5, e_t=0.45, budget=0.6, resamples=0)
    boot = learn_offload_threshold(rows, 200, 0.5, e_t=0.45, budget=0.6)
    assert boot[OFFLOAD_KEY] is not None and plain[OFFLOAD_KEY] is not None
    assert boot[OFFLOAD_KEY] < plain[OFFLOAD_KEY] and boot["kept_on_device"] < plain["kept_on_device"]
    assert boot["cost_plain"] <= boot[COST_KEY] <= 0.6
    assert [c for _, c in boot["cost_steps"]] == sorted(c for _, c in boot["cost_steps"])


def test_threshold_only_rises_from_the_current_one_and_counts_what_it_already_spent():
    rows = offloads((0.5, 1.0), (0.6, 0.0), (0.7, 1.0), (0.8, 0.0))
    # the current E_offload 0.6 already keeps 0.5 and 0.6 (cost 0.1 spent); 0.7 adds 0.1, 0.8 adds 0
    learned = learn_offload_threshold(
        rows, 100, 0.1, e_t=0.4, current=0.6, spent=0.1, budget=0.2, resamples=0
    )
    assert learned[OFFLOAD_KEY] == 0.8 and learned["above_current"] == 2
    assert learned[COST_KEY] == pytest.approx(0.2)
    over = learn_offload_threshold(rows, 100, 0.1, e_t=0.4, current=0.6, spent=0.15, budget=0.2, resamples=0)
    assert over[OFFLOAD_KEY] is None  # 0.7 would exceed the budget; nothing above it can be reached


def test_tied_entropies_are_kept_or_offloaded_together():
    rows = offloads((0.6, 0.0), (0.7, 0.0), (0.7, 1.0))
    learned = learn_offload_threshold(rows, 10, 1.0, e_t=0.5, budget=5.0, resamples=0)
    assert learned[OFFLOAD_KEY] == 0.6  # both 0.7 rows cost 10 points together
    assert learn_offload_threshold(rows, 10, 1.0, e_t=0.5, budget=10.0, resamples=0)[OFFLOAD_KEY] == 0.7


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
            (ask(4, "", (0.9, 0.85)), ""),  # the server says "no answer", and so did the edge
            (ask(5, "Paris", ()), "Paris"),  # no entropies: nothing to price it by
        ):
            store.record(request, make_answer(request, server_text, no_answer=not server_text))
        other = ask(6, "Paris", (0.9, 0.75))
        store.record(dataclasses.replace(other, device_id="d2"), make_answer(other, "France"))
    path = tmp_path / "store.sqlite3"
    rows = {o.entropy: o.disagreement for o in stored_offloads(path, ["edge-a"], ["d1"])}
    assert rows == pytest.approx({0.7: 0.0, 0.8: 1.0, 0.6: 1.0 - 0.8, 0.85: 0.0})  # F1 of 2 of 3 words: 0.8
    assert len(stored_offloads(path, None)) == 6  # any version, any device; the one without entropies skipped
    assert {o.entropy for o in stored_offloads(path, ["edge-a"], ["d2"])} == {0.75}


# -- the bundle and the device -------------------------------------------------------------------------
def test_thresholds_check_refuses_an_offload_threshold_it_cannot_honour():
    ok = check_thresholds({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: 0.6})
    assert ok[OFFLOAD_KEY] == 0.6
    for bad, why in (
        ({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: 0.3}, "E_T ≤ E_offload"),
        ({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: float("nan")}, "finite number"),
        ({"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: "0.6"}, "finite number"),
        ({"policy": "never", OFFLOAD_KEY: 0.6}, "needs an entropy policy"),
        ({"policy": "patience", "patience": 2, "E_T": 0.4, OFFLOAD_KEY: 0.6}, "needs an entropy policy"),
        (
            {"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: 0.6, COST_KEY: "x"},
            "E_offload_cost must be a finite",
        ),
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
    assert [b.kept_below_offload_threshold for b in kept] == [b.solved for b in kept]  # no exit settled any
    # an explicit policy (the benchmarks' "every layer, then the server") is not the bundle's own:
    # E_offload does not apply to it
    from elma_utils.early_exit.policies import NeverExit

    assert not any(
        a.solved for a in after.answer_features(examples, after.features_for(examples), NeverExit())
    )
    after.offload_threshold = None  # a device told to offload everything it does not settle
    assert not any(a.solved for a in after.answer_features(examples, after.features_for(examples)))
    # the benchmarks' full-compute reference drops it with E_T
    from elma_utils.export.bundle import full_compute_copy

    full = read_thresholds(full_compute_copy(candidate, tmp_path / "full"))
    assert full["policy"] == "never" and OFFLOAD_KEY not in full and COST_KEY not in full


def test_a_retrained_edge_starts_without_the_old_weights_offload_threshold():
    from elma_utils.export.bundle import for_new_weights

    th = {"policy": "entropy", "E_T": 0.4, OFFLOAD_KEY: 0.6, COST_KEY: 0.1, "rule": "max"}
    assert for_new_weights(th) == {"policy": "entropy", "E_T": 0.4, "rule": "max"}
    assert th[OFFLOAD_KEY] == 0.6  # a copy
    # a recalibrated E_T above the old E_offload would otherwise make an unreadable bundle
    with pytest.raises(BundleError, match="E_T ≤ E_offload"):
        check_thresholds({**th, "E_T": 0.7})
    assert check_thresholds(for_new_weights({**th, "E_T": 0.7}))["E_T"] == 0.7


def test_offload_candidate_refuses_a_threshold_below_e_t(tmp_path, minilm_tokenizer):
    current = write_tiny_bundle(tmp_path / "current", minilm_tokenizer, entropy_threshold=0.5)
    with pytest.raises(BundleError, match="E_T ≤ E_offload"):
        offload_candidate(current, tmp_path / "candidate", {OFFLOAD_KEY: 0.4, COST_KEY: 0.0})
    with pytest.raises(ValueError, match="no E_offload was learned"):
        offload_candidate(current, tmp_path / "candidate", {OFFLOAD_KEY: None, COST_KEY: 0.0})


def test_learned_record_is_json(tmp_path):
    rows = [
        StoredOffload(float(h), float(d))
        for h, d in zip(np.linspace(0.5, 0.9, 5), [0, 1, 0, 0, 1], strict=True)
    ]
    learned = learn_offload_threshold(rows, 50, 0.3, e_t=0.45)
    assert json.loads(json.dumps(learned))[OFFLOAD_KEY] == learned[OFFLOAD_KEY]
    assert dataclasses.asdict(rows[0]) == {"entropy": 0.5, "disagreement": 0.0}


# -- the devices report what they asked: the denominator of the price -----------------------------------------
def test_edge_asked_is_checked_round_trips_and_is_signed_only_when_set(tmp_path):
    from elma_utils.edge.identity import DeviceRegistry, sign_request, signed_content
    from elma_utils.edge.protocol import decode, encode
    from elma_utils.edge.ssh_keys import generate_ed25519_key, public_key_line

    for bad in (0, -3, True, 1.5, "7", 10**10):
        with pytest.raises(ProtocolError, match="edge.asked"):
            EdgeResult(text="x", model_version="v", asked=bad)
    request = ask(1, "Paris", (0.9, 0.7))
    counted = dataclasses.replace(request, edge=dataclasses.replace(request.edge, asked=41))
    assert decode(encode(counted)).edge.asked == 41 and decode(encode(request)).edge.asked is None
    # a request without the count signs the very bytes it signed before the field existed
    assert b"asked" not in signed_content(request) and b'"asked":41' in signed_content(counted)
    key = generate_ed25519_key(tmp_path / "k", comment="d1")
    (tmp_path / "authorized_keys").write_text(public_key_line(key, "d1") + "\n")
    registry = DeviceRegistry(tmp_path / "authorized_keys")
    signed = sign_request(counted, key)
    registry.verify(decode(encode(signed)))
    registry.verify(decode(encode(sign_request(request, key))))  # a device that sends no count
    # a count changed on the way (to make keeping questions look cheaper) breaks the signature
    inflated = dataclasses.replace(signed, edge=dataclasses.replace(signed.edge, asked=4100))
    with pytest.raises(ProtocolError, match="forbidden"):
        registry.verify(inflated)


def counted_ask(i: int, device: str, version: str, asked: int | None, entropy: float = 0.8) -> AskRequest:
    edge = EdgeResult(text="Paris", model_version=version, entropies=(0.9, entropy), asked=asked)
    return AskRequest(id=f"c{i}", device_id=device, question=f"Question {i}?", edge=edge, context=CONTEXTS[0])


def test_the_store_keeps_each_devices_largest_count_never_below_its_offloads(tmp_path):
    import sqlite3

    path = tmp_path / "store.sqlite3"
    with HardQuestionStore(path) as store:
        for i, (device, version, asked) in enumerate(
            [("d1", "v1", 5), ("d1", "v1", 12), ("d1", "v1", 9),  # out of order: the largest stays
             ("d1", "v2", 3), ("d2", "v1", None), ("d2", "v1", None), ("d3", "v1", 1)]
        ):  # fmt: skip
            request = counted_ask(i, device, version, asked)
            store.record(request, make_answer(request, "Paris"))
        store.record(request, make_answer(request, "Paris"))  # a retry changes nothing
        # d3 said 1, but two of its offloads are stored: the count is never below them
        request = counted_ask(99, "d3", "v1", 1)
        store.record(request, make_answer(request, "Paris"))
        assert store.questions_asked(["v1"]) == {"d1": {"v1": 12}, "d2": {"v1": None}, "d3": {"v1": 2}}
        # a conflicting request (a used id, other content) is refused and its count is not kept
        conflict = dataclasses.replace(counted_ask(0, "d1", "v1", 500), question="Another question?")
        with pytest.raises(ProtocolError, match="conflict"):
            store.record(conflict, make_answer(conflict, "Paris"))
        assert store.questions_asked(["v1"])["d1"] == {"v1": 12}
        assert store.questions_asked(["v1", "v2"])["d1"] == {"v1": 12, "v2": 3}
        assert store.questions_asked([]) == {}
    counted, left_out = reported_questions(path, ["v1", "v2"])
    assert counted == {"d1": 15, "d3": 2} and left_out == ["d2"]  # no count: left out, not guessed
    assert reported_questions(path, ["v1"], ["d3"]) == ({"d3": 2}, [])
    # a store written before the counts existed gets the table when it is opened again
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE device_counts")
    with HardQuestionStore(path) as store:
        assert store.questions_asked(["v1"]) == {"d1": {"v1": None}, "d2": {"v1": None}, "d3": {"v1": None}}
        request = counted_ask(100, "d1", "v1", 30)
        store.record(request, make_answer(request, "Paris"))
        assert store.questions_asked(["v1"])["d1"] == {"v1": 30}


def test_versions_that_differ_only_in_thresholds_are_priced_together(tmp_path, minilm_tokenizer):
    from elma_utils.server import publish

    root = tmp_path / "root"
    first = write_tiny_bundle(tmp_path / "b0", minilm_tokenizer, entropy_threshold=0.5)
    v1 = publish.publish_bundle(first, root)
    learned = {OFFLOAD_KEY: 0.7, COST_KEY: 0.1}
    v2 = publish.publish_bundle(offload_candidate(first, tmp_path / "cand" / "candidate", learned), root)
    v3 = publish.publish_bundle(write_tiny_bundle(tmp_path / "b1", minilm_tokenizer, 0.5, seed=1), root)
    bundles = publish.bundles_dir(root)
    assert weights_fingerprint(bundles / v1) == weights_fingerprint(bundles / v2)
    assert weights_fingerprint(bundles / v1) != weights_fingerprint(bundles / v3)
    assert same_weights_versions(root, v2) == [v2, v1] and same_weights_versions(root, v3) == [v3]
    # v1 offloads more than v2 (its floor is E_T 0.5 < 0.7): pooled with v2; not the other way round,
    # v2 kept questions on the device that v1's count includes but the store never saw
    assert same_weights_versions(root, v1) == [v1]
    # what the last layer answers depends on the thresholds' rule too: not the same weights
    th = read_thresholds(first)
    other_rule = with_thresholds(first, tmp_path / "mean", {**th, "rule": "mean"}, "mean")
    assert weights_fingerprint(other_rule) != weights_fingerprint(first)
    (bundles / "v9-broken").mkdir()
    (bundles / "v9-broken" / "manifest.json").write_text("{not json")
    assert same_weights_versions(root, v2) == [v2, v1]  # an unreadable one is skipped, not fatal
    # nobody reported a count: nothing is learned, and the record says why
    store = tmp_path / "store.sqlite3"
    with HardQuestionStore(store) as s:
        request = counted_ask(0, "old-device", v3, None)
        s.record(request, make_answer(request, "Paris"))
    result = learn_from_store(
        store,
        root,
        full_model_dir=tmp_path,
        calibration=None,
        guard=None,  # never read: nothing to price
    )
    assert not result.published and result.left_out_devices == ["old-device"]
    assert "no device reported" in result.reason and "old-device" in result.reason


def test_the_device_counts_per_version_and_goes_on_counting_after_a_restart(tmp_path, minilm_tokenizer):
    """An offline device (no server: every offload waits in the outbox, as it would be sent)
    counts every question it answered with its version; a restart goes on from the count the
    outbox kept, a new version starts from its own."""
    from elma_utils.edge.client import EdgeQA
    from elma_utils.edge.outbox import Outbox
    from elma_utils.edge.runtime import EdgeModel

    never = EdgeModel.load(write_tiny_bundle(tmp_path / "b", minilm_tokenizer, entropy_threshold=-1.0))
    path = tmp_path / "outbox.sqlite3"

    def queued_counts() -> list[tuple[str, int]]:
        with Outbox(path) as box:
            return [(i.request.edge.model_version, i.request.edge.asked) for i in box.pending()]

    with Outbox(path) as box:
        qa = EdgeQA(never, None, box, model_version="v1")
        for i in range(3):
            assert qa.answer(f"Question {i}?", CONTEXTS[0]).source == "edge-fallback"
    with Outbox(path) as box:  # the device program starts again
        qa = EdgeQA(never, None, box, model_version="v1")
        qa.answer("Question 3?", CONTEXTS[0])
        qa.model_version = "v2"  # a sync swapped a new version in
        qa.answer("Question 4?", CONTEXTS[0])
        qa.model_version = "v1"  # and an operator rolled back
        qa.answer("Question 5?", CONTEXTS[0])
        assert box.asked_count("v1") == 5 and box.asked_count("v2") == 1 and box.asked_count("v9") == 0
    assert queued_counts() == [("v1", 1), ("v1", 2), ("v1", 3), ("v1", 4), ("v2", 1), ("v1", 5)]
    without = EdgeQA(never, None, None, model_version="v1")  # no outbox: counted in this process only
    without.answer("Question 6?", CONTEXTS[0])
    assert without._counted == ("v1", 1)
