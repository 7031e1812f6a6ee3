"""The growth loop on a deployment domain: the split, the gate that prices offloads, and the rounds.

The rounds run end to end with tiny real models: a random 3-layer full model serves; the
first edge keeps 2 layers with zeroed exit heads, so it settles nothing and offloads every
question it is asked over the real SSH endpoint; the server stores them, the edge is
retrained and published, and the device picks the new version up over SFTP.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle

from elma_utils.server import publish
from elma_utils.server.deployment_domain import DomainSizes, article_timeline, split_domain
from elma_utils.server.growth_rounds import ROUND_KEYS, RoundsSettings, run_growth_rounds
from elma_utils.server.round_measure import MEASURES, targets_met
from elma_utils.server.store import HardQuestionStore
from elma_utils.squad.data import examples_to_squad_json


# -- the split ---------------------------------------------------------------------------------------
@dataclass
class Q:
    qas_id: str
    context_id: str
    title: str = "A"
    synthetic: bool = False


def test_interleaved_timeline_asks_every_paragraph_first_and_keeps_later_questions_apart():
    article = (
        [Q(f"p0q{i}", "p0") for i in range(5)] + [Q("p1q0", "p1")] + [Q(f"p2q{i}", "p2") for i in range(2)]
    )
    asked, later = article_timeline(article, 0.6)
    # p0: round(3.0) = 3 asked; p1: a lone question is asked; p2: round(1.2) = 1 asked
    assert [q.qas_id for q in asked] == ["p0q0", "p1q0", "p2q0", "p0q1", "p0q2"]
    assert [q.qas_id for q in later] == ["p2q1", "p0q3", "p0q4"]
    asked, later = article_timeline(article, 0.6, order="document")
    assert [q.qas_id for q in asked] == ["p0q0", "p0q1", "p0q2", "p0q3", "p0q4"]  # round(4.8) = 5
    assert [q.qas_id for q in later] == ["p1q0", "p2q0", "p2q1"]


def test_split_by_article_has_no_overlap_and_the_later_questions_are_never_asked(dev_v11):
    sizes = DomainSizes(articles=3, paragraphs_per_article=None, rounds=3, other_questions=150,
                        calibration_questions=120, guard_questions=90, offload_pool_questions=None)  # fmt: skip
    d = split_domain(dev_v11.examples, sizes, seed=1)
    titles = {
        "deployment": set(d.deployment_articles),
        "other": {e.title for e in d.other},
        "calibration": {e.title for e in d.calibration},
        "guard": {e.title for e in d.guard},
        "offload_pool": {e.title for e in d.offload_pool},
    }
    names = list(titles)
    for i, a in enumerate(names):  # by article: no article in two groups
        for b in names[i + 1 :]:
            assert not titles[a] & titles[b], (a, b)
    assert {e.title for e in d.asked + d.later} == titles["deployment"]
    asked, later = {e.qas_id for e in d.asked}, {e.qas_id for e in d.later}
    assert not asked & later
    everything = [e for e in dev_v11.examples if e.title in titles["deployment"]]
    assert asked | later == {e.qas_id for e in everything}
    assert (len(d.other), len(d.calibration), len(d.guard)) == (150, 120, 90)
    # the pool: every question of the articles left over, whole articles
    left = set(dev_v11_titles(dev_v11)) - set().union(*(titles[k] for k in names if k != "offload_pool"))
    assert titles["offload_pool"] == left and len(left) >= 30
    assert len(d.offload_pool) == sum(e.title in left for e in dev_v11.examples)
    assert [e.qas_id for e in d.gain_questions] == [e.qas_id for e in d.calibration + d.offload_pool]
    assert d.describe()["offload_pool"] == len(d.offload_pool)
    capped = split_domain(dev_v11.examples, dataclasses.replace(sizes, offload_pool_questions=50), seed=1)
    assert len(capped.offload_pool) == 50 and capped.guard == d.guard
    # time: every paragraph with two questions or more keeps some for later; rounds are consecutive
    per_paragraph = collections.Counter(e.context_id for e in everything)
    later_paragraphs = {e.context_id for e in d.later}
    assert {p for p, n in per_paragraph.items() if n >= 2} <= later_paragraphs
    sizes_per_round = [len(r) for r in d.asked_rounds]
    assert len(sizes_per_round) == 3 and max(sizes_per_round) - min(sizes_per_round) <= 1
    assert [e.qas_id for r in d.asked_rounds for e in r] == [e.qas_id for e in d.asked]
    assert split_domain(dev_v11.examples, sizes, seed=1).describe() == d.describe()  # seeded


def dev_v11_titles(dev) -> list[str]:
    return sorted({e.title for e in dev.examples})


def test_split_refuses_sizes_the_file_cannot_fill(dev_v11):
    with pytest.raises(ValueError, match="articles"):
        split_domain(dev_v11.examples, DomainSizes(articles=46))
    with pytest.raises(ValueError, match="cannot fill guard"):
        split_domain(dev_v11.examples, DomainSizes(articles=2, other_questions=5000, guard_questions=9000))
    with pytest.raises(ValueError, match="asked_fraction"):
        DomainSizes(asked_fraction=1.0)
    with pytest.raises(ValueError, match="offload_pool_questions"):
        DomainSizes(offload_pool_questions=-1)


def test_sizes_come_from_the_profile_and_a_smoke_profile_keeps_the_smoke_sizes(dev_v11):
    from elma_utils.config import PROFILES

    for name in ("smoke", "smoke-albert"):
        assert DomainSizes.from_profile(PROFILES[name]) == DomainSizes(), name
        assert PROFILES[name].growth_targets == ("exits",) and PROFILES[name].growth_replay_questions == 16
    cpu = DomainSizes.from_profile(PROFILES["cpu"])
    assert (cpu.articles, cpu.paragraphs_per_article, cpu.rounds, cpu.guard_questions) == (12, None, 3, 400)
    assert PROFILES["cpu"].growth_targets == ("exits", "exits+layers")
    assert cpu.offload_pool_questions is None  # every question the other groups leave over
    assert DomainSizes.from_profile(PROFILES["cpu"], rounds=2, order=None) == dataclasses.replace(
        cpu, rounds=2
    )
    d = split_domain(dev_v11.examples, cpu, seed=0)  # the cpu sizes fit in dev-v1.1
    assert len(d.deployment_articles) == 12 and len(d.asked_rounds) == 3 and len(d.guard) == 400
    assert len(d.offload_pool) > 4000  # the rest of dev-v1.1: enough questions above E_T to price one


# -- the gate prices what it changes -------------------------------------------------------------------
def scores(f1: float, share: float, system_f1: float | None = None, n: int = 400) -> dict:
    out = {"questions": n, "f1": f1, "exact": f1 - 10, "share_solved": share, "avg_exit_layer": 5.0}
    if system_f1 is not None:
        out["system_f1"] = system_f1
    return out


def test_gate_refuses_a_candidate_that_settles_more_but_loses_whole_system_f1():
    # edge-only F1 rises (it answers more of its unsettled questions right) but the questions it
    # now settles instead of offloading get worse answers than the server's
    current, candidate = scores(70.0, 90.0, system_f1=78.0), scores(72.0, 97.0, system_f1=76.5)
    gate = publish.gate_report(current, candidate)
    assert gate["criterion"] == "system_f1" and gate["decision"] == "refuse"
    assert gate["refusal"] == (
        "candidate whole-system F1 (edge answers for what it settles, the server's for what it "
        "offloads) 76.50 is below 78.00 (current 78.00 minus tolerance 0) on 400 held-out questions"
    )
    assert [c["passed"] for c in gate["checks"]] == [False, True]
    assert publish.publish_refusal(current, candidate) == gate["refusal"]
    # judged on the edge alone, the same candidate would have passed
    assert publish.publish_refusal(scores(70.0, 90.0), scores(72.0, 97.0)) is None
    # one side priced and the other not is a mistake, not a quiet fallback to edge F1
    with pytest.raises(ValueError, match="only the candidate result has whole-system F1"):
        publish.gate_report(scores(70.0, 90.0), scores(72.0, 97.0, system_f1=76.5))


def test_gate_accepts_a_candidate_that_settles_more_without_losing_whole_system_f1():
    current = scores(74.0, 90.0, system_f1=78.0)
    for candidate in (scores(71.0, 97.0, system_f1=78.0), scores(71.0, 97.0, system_f1=77.8)):
        gate = publish.gate_report(current, candidate, tolerance=0.3)
        assert gate["decision"] == "publish" and gate["refusal"] is None, gate
    # fewer settled is still refused (more offloads), even with a better whole-system F1
    assert "it would offload more" in publish.publish_refusal(current, scores(74.0, 80.0, system_f1=79.0))


def test_evaluate_bundle_scores_the_whole_system(tmp_path, dev_v11, minilm_tokenizer):
    examples = [e for e in dev_v11.examples[:40] if not e.is_impossible][:10]
    raw = examples_to_squad_json(examples)
    gold = {e.qas_id: e.answers[0].text for e in examples}
    never = write_tiny_bundle(tmp_path / "never", minilm_tokenizer, entropy_threshold=-1.0)
    always = write_tiny_bundle(tmp_path / "always", minilm_tokenizer, entropy_threshold=2.0)
    s = publish.EvalSet("s", examples, raw, "1.1", server_answers=gold)
    offloads_all = publish.evaluate_bundle(never, [s])
    assert offloads_all["share_solved"] == 0.0 and offloads_all["system_f1"] == pytest.approx(100.0)
    assert offloads_all["settled_f1"] is None
    settles_all = publish.evaluate_bundle(always, [s])
    assert settles_all["share_solved"] == 100.0 and settles_all["avg_exit_layer"] == 1.0
    assert (
        settles_all["system_f1"]
        == pytest.approx(settles_all["f1"])
        == pytest.approx(settles_all["settled_f1"])
    )
    assert settles_all["f1"] < 50.0  # a random model: the server's answers are what made it 100
    no_server = publish.evaluate_bundle(never, [s, publish.EvalSet("t", examples, raw, "1.1")])
    assert "system_f1" in no_server["sets"]["s"] and "system_f1" not in no_server  # pooled: all or none


def test_targets_are_judged_from_round_zero_to_the_last_round():
    def groups(share, sys_f1, dev_f1, o_sys, o_dev):
        return {"deployment": {"share_on_device": share, "avg_layers": 5.0, "device_f1": dev_f1, "system_f1": sys_f1},
                "other": {"share_on_device": 95.0, "avg_layers": 5.0, "device_f1": o_dev, "system_f1": o_sys}}  # fmt: skip

    met = targets_met(groups(80.0, 75.0, 70.0, 76.0, 74.0), groups(85.5, 74.8, 71.0, 75.6, 73.6))
    assert met["all_met"], met
    assert not targets_met(groups(80, 75, 70, 76, 74), groups(84.9, 75, 70, 76, 74))["checks"]["share_gain"]
    assert not targets_met(groups(80, 75, 70, 76, 74), groups(90, 74.6, 70, 76, 74))["checks"][
        "system_f1_kept"
    ]
    assert not targets_met(groups(80, 75, 70, 76, 74), groups(90, 75, 70, 75.4, 74))["checks"][
        "no_forgetting"
    ]


# -- the rounds, end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rounds(tmp_path_factory, dev_v11, train_v11, minilm_tokenizer):
    from elma_utils.early_exit.experiment import load_exits_model_from
    from elma_utils.export.bundle import write_bundle

    work = tmp_path_factory.mktemp("growth-rounds")
    full = save_tiny_artifact(work / "full", minilm_tokenizer, seed=1, num_layers=3)
    edge, _, _ = load_exits_model_from(full, 2)
    for head in edge.exit_heads:  # settles nothing: every asked question is offloaded and stored
        head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    exits = publish.save_exits(edge, full, work / "exits0", mode="zeroed")
    bundle = write_bundle(
        edge, minilm_tokenizer, work / "bundle0", seq_len=96, precision="float32",
        thresholds={"policy": "entropy", "E_T": 0.97, "rule": "max"}, model_version="tiny-edge-zeroed",
        doc_stride=48, max_query_len=24,
    )  # fmt: skip
    sizes = DomainSizes(articles=2, paragraphs_per_article=2, rounds=2, other_questions=8,
                        calibration_questions=8, guard_questions=8)  # fmt: skip
    domain = split_domain(dev_v11.examples, sizes, seed=0)
    replay = [e for e in train_v11.examples[:40] if not e.is_impossible][:8]
    # the gate lets every candidate through (its checks are tested above): the test needs publications
    settings = RoundsSettings(
        epochs=2.0, learning_rate=1e-2, batch_size=8, tolerance=100.0, max_share_drop=100.0
    )
    out = run_growth_rounds(full, bundle, exits, work / "rounds", domain, replay, settings, ["exits"])
    return {"out": out, "domain": domain, "work": work / "rounds"}


@pytest.fixture(scope="module")
def refused(rounds, train_v11):
    """One round with the default gate: the retrained tiny edge settles questions it answers worse
    than the server, so whole-system F1 falls and the current version stays on the device."""
    d = rounds["domain"]
    work = rounds["work"].parent
    domain = dataclasses.replace(d, asked_rounds=[d.asked_rounds[0]])
    replay = [e for e in train_v11.examples[:40] if not e.is_impossible][:8]
    settings = RoundsSettings(epochs=2.0, learning_rate=1e-2, batch_size=8, learn_offload=False)
    return run_growth_rounds(
        work / "full", work / "bundle0", work / "exits0", work / "refused", domain, replay, settings
    )


@pytest.fixture(scope="module")
def offload_learned(rounds, train_v11):
    """One round where the retrained edge is always refused (it must win by 100 points) and the
    server learns an offload threshold instead, with a budget that lets it keep every stored
    offload: the chain learn → gate → publish → sync → the device answers more by itself."""
    d = rounds["domain"]
    work = rounds["work"].parent
    replay = [e for e in train_v11.examples[:40] if not e.is_impossible][:8]
    settings = RoundsSettings(
        epochs=1.0, learning_rate=1e-2, batch_size=8, tolerance=-100.0, offload_budget=1e4,
        max_system_f1_loss=100.0,
    )  # fmt: skip
    out = run_growth_rounds(
        work / "full", work / "bundle0", work / "exits0", work / "offload", d, replay, settings
    )
    return {**out, "device_root": work / "offload" / "exits" / "device", "later": d.later}


def test_default_gate_refuses_a_candidate_that_loses_whole_system_f1_and_the_device_keeps_its_version(
    refused,
):
    start, r = refused["rounds"]
    g = r["grow"]
    assert not g["published"] and g["decision"] == "refuse", g["reason"]
    assert "whole-system F1" in g["reason"]
    sys_check, share_check = g["gate"]["checks"]
    assert sys_check["check"] == "system_f1" and not sys_check["passed"]
    assert sys_check["candidate"] < sys_check["current"]
    # edge-only, the candidate looked better: it answers where the current edge only offloads
    assert g["gate_sets"]["candidate"]["store_eval"]["f1"] >= g["gate_sets"]["current"]["store_eval"]["f1"]
    assert r["sync"]["status"] == "up_to_date" and not r["sync"]["picked_up"]
    assert r["device_version"] == start["device_version"]
    assert refused["summary"]["exits"]["published"] == 0


def test_every_round_records_every_key(rounds):
    out = rounds["out"]
    assert [r["round"] for r in out["rounds"]] == [0, 1, 2]
    for r in out["rounds"]:
        assert set(ROUND_KEYS) <= set(r), set(ROUND_KEYS) - set(r)
        for group in ("deployment", "other"):
            assert set(MEASURES) <= set(r[group])
            assert 0.0 <= r[group]["share_on_device"] <= 100.0 and 1.0 <= r[group]["avg_layers"] <= 2.0
        assert r["deployment"]["questions"] == len(rounds["domain"].later)
        assert r["other"]["questions"] == len(rounds["domain"].other)
    start = out["rounds"][0]
    assert start["grow"] is None and start["deployment"]["share_on_device"] == 0.0  # zeroed heads
    # settles nothing: whole system = the server's answers (its answers are computed once, offline)
    assert start["change"]["deployment"]["system_f1"] == 0.0
    for r in out["rounds"][1:]:
        g = r["grow"]
        assert {"published", "decision", "reason", "gate", "E_T", "train_questions", "original_questions",
                "candidate"} <= set(g)  # fmt: skip
        assert g["gate"]["criterion"] == "system_f1" and len(g["gate"]["checks"]) == 2
        assert g["original_questions"] == 8 and g["train_questions"] > 0
        assert set(g["candidate"]) >= {"deployment", "other"}
    summary = out["summary"]["exits"]
    assert set(summary["targets"]["checks"]) == {"share_gain", "system_f1_kept", "no_forgetting"}
    json.dumps(out)  # the metrics file can hold it


def test_published_versions_are_picked_up_by_the_device(rounds):
    out = rounds["out"]
    versions = [r["device_version"] for r in out["rounds"]]
    for r in out["rounds"][1:]:
        assert r["grow"]["published"], r["grow"]["reason"]
        assert r["sync"]["picked_up"] and r["sync"]["bytes"] > 0
        assert r["device_version"] == r["grow"]["version"] == r["sync"]["version"]
    assert len(set(versions)) == 3 and out["summary"]["exits"]["picked_up_by_device"] == 2
    device = rounds["work"] / "exits" / "device"
    from elma_utils.edge.sync import current_version

    assert current_version(device) == versions[-1]


def test_only_asked_questions_reach_the_store(rounds):
    d, out = rounds["domain"], rounds["out"]
    store_path = rounds["work"] / "exits" / "loop" / "server" / "hard-questions.sqlite3"
    with HardQuestionStore(store_path) as store:
        store.export_squad(rounds["work"] / "t.json", rounds["work"] / "e.json", 0.0, version="1.1")
    stored = {
        qa["question"]
        for a in json.loads((rounds["work"] / "t.json").read_text())["data"]
        for p in a["paragraphs"]
        for qa in p["qas"]
    }
    assert stored and stored <= {e.question for e in d.asked}
    assert not stored & ({e.question for e in d.later} - {e.question for e in d.asked})
    # the zeroed edge settles none: each question goes to the server, or (a server reply later than
    # the client's timeout, on a loaded machine) is answered by the edge's fallback after trying
    first = out["rounds"][1]
    assert first["offloaded"] + first["fallbacks"] == len(d.asked_rounds[0]) and first["offloaded"] > 0


def test_a_learned_offload_threshold_is_published_and_the_device_answers_more_itself(offload_learned):
    start, r, again = offload_learned["rounds"]
    assert not r["grow"]["published"] and "below" in r["grow"]["reason"]
    o = r["offload"]
    assert o["published"] and o["decision"] == "publish", o["reason"]
    learned = o["learned"]
    # zeroed exit heads: every stored offload has the same last-layer entropy (the uniform one)
    assert learned["E_offload"] >= learned["E_T"] == 0.97
    assert learned["stored_offloads"] == r["offloaded"] > 0 and learned["kept_on_device"] == r["offloaded"]
    # the denominator is what the device reported asking (edge.asked), through the real client:
    # every question of the round, unless the last ones fell back and wait in the outbox
    device = f"growth-{r['target']}"
    assert o["asked_by_device"] == {device: learned["questions_asked"]} and o["left_out_devices"] == []
    if r["fallbacks"] == 0:
        assert learned["questions_asked"] == r["asked"]
    assert r["offloaded"] <= learned["questions_asked"] <= r["asked"]
    # what a disagreement is worth was priced on the calibration questions and the offload pool
    assert o["gain"]["of_questions"] == 8 + 16
    assert {"ratio", "upper", "disagreements"} <= set(o["gain"])
    assert [c["check"] for c in o["gate"]["checks"]] == ["system_f1", "share_solved"]
    # judged against the same weights without E_offload, on the guard questions
    assert o["candidate"]["share_solved"] > o["base"]["share_solved"] == 0.0
    # the device picked the new version up over SFTP and now keeps what it used to offload
    assert r["sync"]["picked_up"] and r["device_version"] == o["version"] == r["sync"]["version"]
    assert r["deployment"]["share_on_device"] > start["deployment"]["share_on_device"] == 0.0
    assert r["deployment"]["share_on_device"] == o["candidate_probe"]["deployment"]["share_on_device"]
    assert r["deployment"]["avg_layers"] == start["deployment"]["avg_layers"]  # same weights, same depth
    # round 2 retrains from the published bundle: the candidate starts without the old weights'
    # E_offload (else a recalibrated E_T above it would make an unreadable bundle) and is measured
    g2 = again["grow"]
    assert g2["E_T_before"] == 0.97
    assert g2["candidate"]["deployment"]["questions"] == len(offload_learned["later"])
    summary = offload_learned["summary"]["exits"]
    assert summary["retrained_published"] == 0 and summary["picked_up_by_device"] >= 1
    assert summary["offload_thresholds_published"] == summary["published"] >= 1
    assert summary["offload_thresholds"][0] == learned["E_offload"]
    from elma_utils.edge.sync import current_bundle
    from elma_utils.export.bundle import read_thresholds

    device_bundle = current_bundle(offload_learned["device_root"])
    assert read_thresholds(device_bundle)["E_offload"] >= learned["E_offload"]


# -- what is retrained, and the report -------------------------------------------------------------------
def test_retrain_targets_and_the_hook_for_another_part_of_the_edge(monkeypatch):
    from elma_utils.server import growth_rounds

    assert RoundsSettings("exits").retrain_options()["mode"] == "distill"
    assert RoundsSettings("exits+layers", learning_rate=1e-4).retrain_options() == {
        "mode": "joint_distill",
        "learning_rate": 1e-4,
    }
    with pytest.raises(ValueError, match="unknown retrain target 'skim'"):
        RoundsSettings("skim").retrain_options()
    monkeypatch.setattr(growth_rounds, "RETRAIN_TARGETS", dict(growth_rounds.RETRAIN_TARGETS))
    growth_rounds.register_retrain_target("exits+skim", mode="distill", learning_rate=1e-3)
    assert RoundsSettings("exits+skim").retrain_options() == {"mode": "distill", "learning_rate": 1e-3}
    with pytest.raises(ValueError, match="needs a mode"):
        growth_rounds.register_retrain_target("nothing")


def test_the_report_keeps_notebook_07s_other_keys_and_records_commit_and_command(tmp_path, rounds):
    from elma_utils import reporting
    from elma_utils.bench.growth_rounds import FIGURE_NAME, save_growth_report

    reporting.save_metrics("07_dataset_growth_and_sync", {"grown": {"asked": 4}}, tmp_path)
    path = save_growth_report(rounds["out"], "python -m elma_utils.bench.growth_rounds --rounds 2", tmp_path)
    m = reporting.load_metrics(path)
    assert m["grown"] == {"asked": 4} and [r["round"] for r in m["rounds"]] == [0, 1, 2]
    prov = m["growth_rounds"]["provenance"]
    assert prov["command"].endswith("--rounds 2") and len(prov["commit"] or "") == 40
    assert m["growth_rounds"]["summary"]["exits"]["published"] == 2
    assert (tmp_path / "figures" / f"{FIGURE_NAME}.png").stat().st_size > 0
    from elma_utils.bench.growth_rounds import plot_rounds
    from elma_utils.plotting import figure_problems

    assert figure_problems(plot_rounds(m["rounds"])) == []
