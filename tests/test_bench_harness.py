"""The pipeline benchmark harness with real parts: a tiny edge bundle whose E_T lets some questions
exit at layer 1 and sends others to the server, a tiny server model behind `elma serve` and ELMA's
SSH endpoint on loopback (its own process), Whisper on espeak-ng clips, and the CPU-time energy
source (RAPL and tegrastats hidden, so the result is the same on every machine). Timings are never
asserted; what is asserted holds by construction (stages add up to end-to-end, percentiles are
ordered) or follows from the exit policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle

from elma_utils.bench.energy import describe_energy_sources
from elma_utils.bench.harness import (
    PRIOR_ENERGY,
    default_figure_name,
    dev_questions,
    format_table,
    local_offload_server,
    main,
    plot_stages,
    run_pipeline_benchmark,
    stage_names,
)
from elma_utils.early_exit.policies import NeverExit
from elma_utils.edge.runtime import EdgeModel

pytestmark = [pytest.mark.network, pytest.mark.slow]
RUNS, SPOKEN, TYPED = 2, 2, 4


@pytest.fixture(scope="module")
def questions(dev_v11, tmp_path_factory):
    """2 spoken (espeak-ng, en-us) + 4 typed dev-v1.1 questions, from different articles."""
    seen, examples = set(), []
    for e in dev_v11.examples:
        if not e.is_impossible and e.title not in seen:
            seen.add(e.title)
            examples.append(e)
    return dev_questions(
        SPOKEN, TYPED, examples=examples, spoken_dir=tmp_path_factory.mktemp("spoken"), seed=None
    )


@pytest.fixture(scope="module")
def bundle_and_expected(tmp_path_factory, minilm_tokenizer, questions):
    """A bundle whose E_T makes one typed question exit at layer 1 and another go to the server.

    A probe bundle with the same weights (seed) gives each typed question's entropy per layer;
    E_T is put between the lowest layer-1 entropy and the highest per-question minimum."""
    tmp = tmp_path_factory.mktemp("edge")
    probe = EdgeModel.load(write_tiny_bundle(tmp / "probe", minilm_tokenizer, -1.0, seed=5))
    typed = [q for q in questions if q.kind == "typed"]
    ent = np.array([probe.answer(q.question, q.context, policy=NeverExit()).entropies for q in typed])
    low, high = ent[:, 0].min(), ent.min(axis=1).max()
    assert low < high, f"the tiny model's entropies do not allow a split: {ent}"
    e_t = float((low + high) / 2)
    expected = {}
    for q, row in zip(typed, ent, strict=True):
        settled = np.nonzero(row <= e_t)[0]
        expected[q.qas_id] = int(settled[0]) + 1 if settled.size else None  # None: offloaded
    return write_tiny_bundle(tmp / "bundle", minilm_tokenizer, e_t, seed=5), expected


@pytest.fixture(scope="module")
def server_model(tmp_path_factory, minilm_tokenizer):
    return save_tiny_artifact(tmp_path_factory.mktemp("server-model") / "tiny", minilm_tokenizer)


@pytest.fixture(scope="module")
def result(bundle_and_expected, server_model, questions, tmp_path_factory):
    bundle, _ = bundle_and_expected
    with pytest.MonkeyPatch.context() as mp:  # hide RAPL and tegrastats: CPU time on every machine
        mp.setenv("ELMA_POWERCAP_ROOT", str(tmp_path_factory.mktemp("no-powercap")))
        mp.setenv("ELMA_TEGRASTATS", "/nonexistent/tegrastats")
        with local_offload_server(server_model, tmp_path_factory.mktemp("serve")) as link:
            return run_pipeline_benchmark([bundle], questions, link=link, runs=RUNS, warmup=1)


def _bundle(result):
    [(label, b)] = result["bundles"].items()
    assert label == "float32"
    return b


def test_result_structure_machine_and_energy_source(result, questions):
    json.dumps(result, allow_nan=False)  # strict JSON
    assert result["energy_sources"]["auto_source"] == "cpu_time"
    assert result["machine"]["cores"] >= 1 and result["machine"]["keras_backend"]
    c = result["config"]
    assert (c["runs"], c["spoken"], c["typed"], c["questions"]) == (RUNS, SPOKEN, TYPED, len(questions))
    assert c["peak_rss_reset"] is True and set(result["rss_mb"]) == {
        "before_bundles",
        "after_loading_float32",
    }
    b = _bundle(result)
    assert set(b["modes"]) == {"early_exit", "no_early_exit"}
    assert b["server_warmup"]["source"] == "server"
    for name, mode in b["modes"].items():
        e = mode["energy"]
        assert (e["source"], e["joules"], e["joules_per_question"]) == ("cpu_time", None, None)
        assert e["questions"] == RUNS * len(questions) == mode["samples"] and e["windows"] == RUNS
        assert e["cpu_seconds"] > 0 and e["peak_rss_mb"] > 0
        rows = [r for r in b["samples"] if r["mode"] == name]
        # each energy window holds its questions: its wall time covers their end-to-end times
        assert e["wall_seconds"] >= sum(r["e2e_ms"] for r in rows) / 1000
    assert result["tunnel"]["connects"] == 1 and result["tunnel"]["reconnects"] == 0  # one persistent link
    assert result["link_round_trip"]["ssh_persistent"]["lines"] == 50
    assert result["link_round_trip"]["plain_tcp"]["p50_ms"] > 0


def test_findings_state_the_early_exit_comparison_in_words(result):
    c = _bundle(result)["comparison"]
    [line, prior] = result["findings"]
    assert line.startswith("float32: early exit") and prior == PRIOR_ENERGY
    assert f"edge layers computed x{c['layers_computed_ratio']:.2f}" in line
    assert f"end to end x{c['end_to_end_mean_ratio']:.2f}" in line
    # no joules on this machine: the sentence says so and names the stand-in
    assert "no energy counter here" in line
    assert f"CPU-seconds per question stand in: x{c['cpu_seconds_per_question_ratio']:.2f}" in line
    assert "ASR is " in line  # two of the questions are spoken


def test_stages_add_up_to_end_to_end(result):
    b = _bundle(result)
    names = set(stage_names(b["num_layers"]))
    for r in b["samples"]:
        assert set(r["stages"]) <= names
        assert all(v >= -1e-9 for v in r["stages"].values()), r["stages"]
        assert sum(r["stages"].values()) == pytest.approx(r["e2e_ms"], abs=1e-6)
        assert ("asr" in r["stages"]) == (r["kind"] == "spoken")
        assert r["layers"] == sum(s.startswith("layer_") for s in r["stages"])
        assert ("server" in r["stages"]) == (r["source"] == "server")
    # what no stage accounts for (harness glue) is a small part of the total
    other = sum(r["stages"]["other"] for r in b["samples"])
    assert other <= 0.1 * sum(r["e2e_ms"] for r in b["samples"])
    for mode in b["modes"].values():  # the stacked bars add up to the mean end-to-end time
        assert sum(mode["stage_mean_ms"].values()) == pytest.approx(mode["end_to_end"]["mean_ms"], abs=0.01)


def test_percentiles_are_ordered(result):
    for mode in _bundle(result)["modes"].values():
        stats = [*mode["stages"].values(), mode["end_to_end"], mode["edge"], mode["offload_round_trip"]]
        for p in stats:
            if p["n"]:
                assert p["min_ms"] <= p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert mode["stages"]["tokenise"]["n"] == mode["stages"]["layer_1"]["n"] == mode["samples"]


def test_early_exit_computes_fewer_layers_and_offloads_the_rest(result, bundle_and_expected, server_model):
    from elma_utils.model.inference import QAModel

    _, expected = bundle_and_expected
    b = _bundle(result)
    early, never = b["modes"]["early_exit"], b["modes"]["no_early_exit"]
    assert never["exit_layers"] == {"2": never["samples"]} and never["offloaded_fraction"] == 0
    assert early["layers_computed_total"] < never["layers_computed_total"]
    assert b["comparison"]["layers_computed_ratio"] < 1
    assert early["exit_layers"].get("1", 0) >= RUNS and early["sources"].get("server", 0) >= RUNS
    qa = QAModel.load(server_model)
    typed = {q["qas_id"]: q["question"] for q in result["questions"] if q["kind"] == "typed"}
    for r in b["samples"]:
        if r["mode"] == "no_early_exit":
            assert r["source"] in ("edge", "edge-last-layer") and r["layers"] == 2
        elif r["qas_id"] in typed:
            layer = expected[r["qas_id"]]
            assert (r["source"], r["exit_layer"]) == (("edge", layer) if layer else ("server", 2)), r
    offloaded = [r for r in b["samples"] if r["mode"] == "early_exit" and r["source"] == "server"
                 and r["qas_id"] in typed]  # fmt: skip
    assert offloaded
    server_said = _server_answers(qa, result, {r["qas_id"] for r in offloaded})
    assert all(r["answer"] == server_said[r["qas_id"]] for r in offloaded)


def _server_answers(qa, result, ids):
    """What the tiny server model says, run directly (the contexts come from the dev set)."""
    from elma_utils.squad.data import load_squad

    by_id = {e.qas_id: e for e in load_squad("1.1", "dev", download=False).examples if e.qas_id in ids}
    pairs = [(by_id[i].question, by_id[i].context) for i in sorted(ids)]
    return {i: a.text for i, a in zip(sorted(ids), qa.predict(pairs), strict=True)}


def test_spoken_questions_are_heard_and_scored(result):
    b = _bundle(result)
    spoken = [r for r in b["samples"] if r["kind"] == "spoken"]
    assert len(spoken) == SPOKEN * RUNS * 2 and all(r["heard"] for r in spoken)
    assert b["asr_wer"] >= 0
    for mode in b["modes"].values():
        assert (
            mode["end_to_end_spoken"]["n"] == SPOKEN * RUNS and mode["end_to_end_typed"]["n"] == TYPED * RUNS
        )
        assert 0 <= mode["quality"]["f1"] <= 100 and mode["quality"]["n"] == mode["samples"]


def test_table_and_figure(result):
    table = format_table(result)
    assert "| early_exit p50 | p95 | p99 | n |" in table and "| **end to end** |" in table
    assert "| energy J (cpu_time) | — | — |" in table and "| layer_2 |" in table
    fig = plot_stages(result)
    top, bottom = (
        fig.axes[:2] if fig.axes[0].get_position().y0 > fig.axes[1].get_position().y0 else fig.axes[1::-1]
    )
    b = _bundle(result)
    for x, name in enumerate(b["modes"]):  # one mode's bars stack up to its mean end-to-end time
        mode = b["modes"][name]

        def stack_top(ax, x=x):
            return max(
                p.get_y() + p.get_height()
                for p in ax.patches
                if abs(p.get_x() + p.get_width() / 2 - x) < 0.01
            )

        assert stack_top(top) == pytest.approx(mode["end_to_end"]["mean_ms"], abs=0.01)
        assert stack_top(bottom) == pytest.approx(
            mode["end_to_end"]["mean_ms"] - mode["stage_mean_ms"]["asr"], abs=0.01
        )
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_cli_on_an_offline_device_writes_metrics_and_figure(bundle_and_expected, tmp_path, capsys):
    """No server: unsettled questions fall back to the device's own answer (the outbox case)."""
    bundle, _ = bundle_and_expected
    rc = main(["--bundle", str(bundle), "--audio-n", "0", "--typed-n", "3", "--runs", "1", "--warmup", "0",
               "--seed", "-1", "--out", "99_bench_cli", "--reports-dir", str(tmp_path)])  # fmt: skip
    assert rc == 0
    saved = json.loads((tmp_path / "metrics" / "99_bench_cli.json").read_text())
    assert (tmp_path / "figures" / "99_stage_latency.png").stat().st_size > 0
    early = saved["bundles"]["float32"]["modes"]["early_exit"]
    assert set(early["sources"]) <= {"edge", "edge-fallback"} and early["samples"] == 3
    assert "samples" not in saved["bundles"]["float32"] and "link_round_trip" not in saved
    rows = json.loads((tmp_path / "runs" / "99_bench_cli-samples.json").read_text())["float32"]
    assert len(rows) == 6 and {r["mode"] for r in rows} == {"early_exit", "no_early_exit"}
    assert "| **end to end** |" in capsys.readouterr().out


# -- notebook 00's environment report and the notebook cell lists -----------------------------------
TX2_RELEASE = (
    "# R32 (release), REVISION: 6.1, GCID: 27863751, BOARD: t186ref, EABI: aarch64, DATE: Mon Jul 26 2021\n"
)


def test_jetson_status_reads_the_release_file(tmp_path, monkeypatch):
    from elma_utils.bench.environment import jetson_status

    release = tmp_path / "nv_tegra_release"
    release.write_text(TX2_RELEASE)
    monkeypatch.setenv("ELMA_UNAME_M", "aarch64")
    s = jetson_status(release)
    assert (s["is_jetson"], s["l4t"], s["arch"]) == (True, "R32.6.1", "aarch64")
    monkeypatch.setenv("ELMA_UNAME_M", "x86_64")  # a release file alone is not a Jetson (as in lib.sh)
    assert jetson_status(release)["is_jetson"] is False
    assert jetson_status(tmp_path / "missing")["release"] is None


def test_environment_report_on_this_machine():
    from elma_utils.bench.environment import environment_report, format_environment

    env = environment_report()
    json.dumps(env, allow_nan=False)
    assert env["interpreters"]["edge_runtime_uses"] == "ai_edge_litert"  # the project's pin is installed
    assert env["packages"]["numpy"] == np.__version__ and env["venv"]["elma_installed"]
    source = describe_energy_sources()["auto_source"]  # cpu_time here; rapl/tegrastats where readable
    assert env["energy_sources"]["auto_source"] == source
    assert env["ready"]["energy_in_joules"] is (source != "cpu_time")
    assert env["commands"]["espeak-ng"]["path"] and env["commands"]["sshd"]["path"]  # the tests here use both
    dry = env["jetson_setup_dry_run"]
    assert set(dry) >= {"00_system_packages.sh", "01_external_ssd.sh", "03_performance_mode.sh"}
    assert all(r["rc"] == 0 for r in dry.values()), dry
    assert "nvpmodel -m 0" in dry["03_performance_mode.sh"]["commands"]
    text = format_environment(env)
    assert "**Jetson**: no" in text and "| energy_in_joules | no |" in text


def test_default_figure_names_follow_the_report_sections():
    assert default_figure_name("04_device_benchmark") == "04_stage_latency"
    assert default_figure_name("bench_pipeline") == "bench_pipeline_stage_latency"
