"""Every figure the package makes has a title, axis labels with units, values on its bars and,
on a trade-off curve, the chosen operating point (``elma_utils.plotting``)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from elma_utils.plotting import (  # noqa: E402
    OPERATING_POINT_GID,
    figure_problems,
    finish_axes,
    has_unit,
    label_bars,
    mark_operating_point,
    tag_histogram,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _markers(fig) -> list:
    return [line for ax in fig.axes for line in ax.lines if line.get_gid() == OPERATING_POINT_GID]


def _sweep():
    from elma_utils.early_exit.calibration import choose_threshold, sweep_thresholds

    rng = np.random.default_rng(0)
    k, n = 4, 60
    difficulty = rng.random(n)
    entropy = np.clip(difficulty[None, :] * (1.2 - np.arange(1, k + 1)[:, None] / k), 0, 1)
    f1 = np.clip(1.0 - entropy + rng.normal(0, 0.05, (k, n)), 0, 1)
    sweep = sweep_thresholds(f1, entropy, np.full(k, 2.5), thresholds=np.linspace(0, 1, 11))
    return sweep, choose_threshold(sweep, 5.0)


# ------------------------------------------------------------------ the checker itself can fail


def test_has_unit():
    assert has_unit("latency per question (ms)") and has_unit("size [MB]") and has_unit("F1 (%, official)")
    assert not has_unit("latency per question") and not has_unit("F1 ()") and not has_unit("")


def test_a_bare_figure_fails_every_check():
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [4, 5, 6])
    ax.bar([1, 2], [3, 4])
    problems = figure_problems(fig, chosen=True)
    assert any("no title" in p for p in problems)
    assert any("no x label" in p for p in problems) and any("no y label" in p for p in problems)
    assert any("bars without values" in p for p in problems)
    assert any("no operating point" in p for p in problems)


def test_a_label_without_a_unit_fails_and_a_category_axis_needs_none():
    fig, ax = plt.subplots()
    label_bars(ax, ax.bar(["float32", "int8"], [44.0, 11.0]), "{:.0f}")
    finish_axes(ax, "Bundle size", "precision", "bundle size")
    assert figure_problems(fig) == ["axes 0 (Bundle size): y label 'bundle size' names no unit in brackets"]
    ax.set_ylabel("bundle size (MB)")
    assert figure_problems(fig) == []
    assert [t.get_text() for t in ax.texts] == ["44", "11"]


def test_some_bars_unlabelled_fail_and_histogram_bins_need_no_labels():
    fig, ax = plt.subplots()
    bars = ax.bar([1, 2, 3], [3, 4, 5])
    label_bars(ax, bars, labels=["a", "", ""])
    finish_axes(ax, "t", "x (ms)", "y (count)")
    assert any("bars without values" in p for p in figure_problems(fig))
    fig, ax = plt.subplots()
    _, _, patches = ax.hist([[1, 2, 2, 3], [2, 3, 3]], bins=3)
    finish_axes(ax, "t", "x (tokens)", "y (count)")
    assert any("bars without values" in p for p in figure_problems(fig))
    tag_histogram(patches)
    assert figure_problems(fig) == []


def test_finish_axes_refuses_an_empty_title_or_label():
    _, ax = plt.subplots()
    for args in (("", "x (ms)", "y (ms)"), ("t", " ", "y (ms)"), ("t", "x (ms)", "")):
        with pytest.raises(ValueError, match="empty"):
            finish_axes(ax, *args)


def test_mark_operating_point_is_found_and_annotated():
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    finish_axes(ax, "t", "x (ms)", "y (%)")
    assert figure_problems(fig, chosen=True) == ["no operating point marked (plotting.mark_operating_point)"]
    mark_operating_point(ax, 1.5, 3.5, "E_T = 0.4")
    assert figure_problems(fig, chosen=True) == []
    (marker,) = _markers(fig)
    assert (list(marker.get_xdata()), list(marker.get_ydata())) == ([1.5], [3.5])
    assert "E_T = 0.4" in [t.get_text() for t in ax.texts]
    assert "chosen: E_T = 0.4" in ax.get_legend_handles_labels()[1]


# ------------------------------------------------------------------ each plotting function


def test_context_length_histogram():
    from elma_utils.squad.stats import plot_context_lengths

    lengths = {"train": np.array([30, 80, 150, 300]), "dev": np.array([40, 90])}
    fig = plot_context_lengths(lengths, max_seq_len=128)
    assert figure_problems(fig) == []
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "train (4 contexts, 50% fit one window)" in labels  # room: 128 - 16 - 3 = 109 tokens


def test_training_curve():
    from elma_utils.squad.stats import plot_training_curve

    rows = [
        {"epoch": str(e), "loss": 3.0 - e, "start_logits_loss": 1.5, "end_logits_loss": 1.4} for e in range(3)
    ]
    assert figure_problems(plot_training_curve(rows)) == []


@pytest.mark.parametrize("name", ["plot_f1_vs_exit_layer", "plot_f1_vs_latency"])
def test_tradeoff_curves_mark_the_chosen_threshold(name):
    from elma_utils.early_exit import calibration

    plot = getattr(calibration, name)
    sweep, chosen = _sweep()
    fig = plot(sweep, chosen, max_f1_loss=5.0)
    assert figure_problems(fig, chosen=True) == []
    (marker,) = _markers(fig)
    assert marker.get_ydata()[0] == pytest.approx(chosen.f1)
    assert any(t.get_text().startswith(f"E_T = {chosen.value:.3g}") for t in fig.axes[0].texts)
    assert "(ms)" in fig.axes[0].get_xlabel() or name.endswith("exit_layer")
    assert figure_problems(plot(sweep), chosen=True) == [
        "no operating point marked (plotting.mark_operating_point)"
    ]
    assert figure_problems(plot(sweep, chosen.index, title="mine")) == []


def test_exit_histogram_writes_the_counts_on_the_bars():
    from elma_utils.early_exit.calibration import plot_exit_histogram

    fig = plot_exit_histogram(np.array([1, 1, 2, 3, 3, 3, 4]), num_layers=3)
    assert figure_problems(fig) == []
    assert [t.get_text() for t in fig.axes[0].texts] == ["2", "1", "3", "1"]  # layers 1..3, then server
    assert fig.axes[0].get_title() == "Questions per exit layer (7 questions)"


def _stages_result():
    from elma_utils.bench.harness import stage_names

    names = stage_names(2)
    modes = {
        m: {
            "stage_mean_ms": {n: scale * (i + 1) for i, n in enumerate(names)},
            "end_to_end": {"p50_ms": 30.0},
        }
        for m, scale in (("no_early_exit", 1.0), ("early_exit", 0.5))
    }
    bundle = {"num_layers": 2, "model_version": "v1", "modes": modes}
    return {"bundles": {"int8": bundle}, "energy_sources": {"auto_source": "cpu_time"}}, names


def test_stage_bars_carry_their_totals():
    from elma_utils.bench.harness import plot_stages

    result, names = _stages_result()
    fig = plot_stages(result)
    assert figure_problems(fig) == []
    total = sum(range(1, len(names) + 1))
    without_asr = total - (names.index("asr") + 1)
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes}
    assert texts["int8: v1 (2 layers)\nmean per stage; dashed: end-to-end p50"] == [
        f"{total:.0f} ms",
        f"{total / 2:.0f} ms",
    ]
    assert texts["after speech recognition (ASR left out)"] == [
        f"{without_asr:.0f} ms",
        f"{without_asr / 2:.0f} ms",
    ]


def test_adaptive_frontier_marks_the_chosen_configuration():
    from elma_utils.bench.adaptive_report import plot_frontier

    curve = [{"speedup": s, "f1": 80 - 3 * s} for s in (1.0, 1.5, 2.0, 3.0)]
    dev = {
        "frontier": {"depth_only": curve, "both": curve},
        "full": {"speedup": 1.0, "f1": 80.0},
        "depth_only": {"speedup": 1.6, "f1": 78.5},
        "width_only": {"speedup": 1.3, "f1": 79.0},
        "speedup": 2.0,
        "f1": 79.2,
        "full_f1": 80.0,
    }
    fig = plot_frontier(dev, "Adaptive compute, dev-v1.1")
    assert figure_problems(fig, chosen=True) == []
    whole, zoom = fig.axes
    for ax in (whole, zoom):  # the chosen point on both panels
        (marker,) = [line for line in ax.lines if line.get_gid() == OPERATING_POINT_GID]
        assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (2.0, 79.2)
    assert zoom.get_ylim() == (77.0, 81.0)  # full F1 - 3 .. full F1 + 1: the budget line is readable
    assert whole.get_ylim()[0] < 72  # the whole sweep down to F1 71
    labels = zoom.get_legend_handles_labels()[1]
    assert "chosen: depth + width (2.00×, F1 79.2)" in labels and "full F1 − 1 (the budget)" in labels


def test_adaptive_figures_drawn_again_from_the_benchmark_json(tmp_path):
    import json

    from elma_utils.bench.adaptive_report import main

    curve = [{"speedup": s, "f1": 80 - 3 * s} for s in (1.0, 1.5)]
    dev = {"frontier": {"depth_only": curve, "both": curve}, "full": {"speedup": 1.0, "f1": 80.0},
           "depth_only": {"speedup": 1.2, "f1": 78.5}, "width_only": {"speedup": 1.3, "f1": 79.0},
           "speedup": 1.4, "f1": 79.2, "full_f1": 80.0}  # fmt: skip
    bench = tmp_path / "bench_adaptive.json"
    bench.write_text(json.dumps({"precision": "int8", "dev_sets": {"dev-v1.1": dev, "dev-v2.0": dev}}))
    assert main([str(bench), "--figures-dir", str(tmp_path / "figures")]) == 0
    for v in ("1.1", "2.0"):
        assert (tmp_path / "figures" / f"bench_adaptive_dev-v{v}.png").stat().st_size > 10_000
    drawn = json.loads(bench.read_text())["figures_produced_by"]
    assert drawn["command"].startswith("python -m") and "commit" in drawn
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "other.json"), "--figures-dir", str(tmp_path / "figures")])


def test_growth_rounds():
    from elma_utils.bench.growth_rounds import plot_rounds

    def group(share, f1):
        return {"share_on_device": share, "system_f1": f1, "device_f1": f1 - 2}

    rounds = [
        {"target": "exits", "round": r, "deployment": group(40 + 10 * r, 70 + r), "other": group(45, 72)}
        for r in range(3)
    ]
    assert figure_problems(plot_rounds(rounds)) == []
    # a round whose new version the device picked up is marked with what was published
    rounds[1]["sync"] = {"picked_up": True}
    rounds[1]["offload"] = {"published": True, "learned": {"E_offload": 0.612}}
    rounds[2]["sync"] = {"picked_up": True}
    fig = plot_rounds(rounds)
    assert figure_problems(fig) == []
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert notes == ["published: E_offload 0.61", "published: retrained edge"]
