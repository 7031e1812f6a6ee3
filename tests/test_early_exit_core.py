"""Early exit core (pure NumPy): span entropy, policies, calibration sweep, entropy predictor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from elma_utils.early_exit import (
    NO_SPAN,
    CombinedPolicy,
    EntropyExitPredictor,
    EntropyPolicy,
    ExitPolicy,
    LayerOutput,
    NeverExit,
    PatiencePolicy,
    aggregate_by_example,
    answer_space,
    best_span,
    choose_threshold,
    evaluate_predictor,
    exit_confidence,
    layerwise_question_stats,
    masked_normalised_entropy,
    no_answer_margin,
    question_no_answer_margin,
    settled_no_answer,
    simulate_exits,
    span_entropy,
    sweep_exit_layers,
    sweep_thresholds,
)
from elma_utils.squad.data import Answer, SquadExample, examples_to_squad_json
from elma_utils.squad.features import QAFeatures
from elma_utils.squad.postprocess import best_spans_per_feature, predict_answers

RNG = np.random.default_rng(0)


def _mask(n: int, valid: list[int] | range) -> np.ndarray:
    m = np.zeros((1, n), bool)
    m[0, list(valid)] = True
    return m


# ---------------------------------------------------------------- entropy


@pytest.mark.parametrize("n", [2, 3, 7, 50, 383])
def test_uniform_over_valid_positions_is_one_for_any_length(n):
    logits = np.full((1, 384), 2.5)
    logits[0, n + 1 :] = RNG.normal(size=384 - n - 1) * 30  # masked: anything
    assert masked_normalised_entropy(logits, _mask(384, range(1, n + 1)))[0] == pytest.approx(1.0, abs=1e-12)


def test_one_hot_is_zero_and_single_position_is_zero():
    logits = np.full((1, 10), -1e3)
    logits[0, 4] = 0.0
    assert masked_normalised_entropy(logits, np.ones((1, 10), bool))[0] == pytest.approx(0.0, abs=1e-12)
    assert masked_normalised_entropy(RNG.normal(size=(1, 10)), _mask(10, [3]))[0] == 0.0


def test_hand_worked_two_positions():
    logits = np.array([[0.0, math.log(3.0), 99.0]])  # p = (1/4, 3/4); position 2 masked
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert masked_normalised_entropy(logits, _mask(3, [0, 1]))[0] == pytest.approx(expected, rel=1e-12)


def test_masked_positions_never_matter():
    logits = RNG.normal(size=(4, 32))
    mask = RNG.random((4, 32)) < 0.5
    mask[:, 0] = True
    ref = masked_normalised_entropy(logits, mask)
    for fill in (-1e4, 1e4, 0.0, np.nan, np.inf):
        changed = np.where(mask, logits, fill)
        np.testing.assert_allclose(masked_normalised_entropy(changed, mask), ref, rtol=1e-12)


def test_length_invariance_position_and_padding():
    valid = RNG.normal(size=12) * 3
    values = []
    for total, offset in [(16, 3), (64, 20), (384, 300)]:
        logits = np.full((1, total), -1e4)
        logits[0, offset : offset + 12] = valid
        values.append(masked_normalised_entropy(logits, _mask(total, range(offset, offset + 12)))[0])
    np.testing.assert_allclose(values, values[0], rtol=1e-12)
    assert 0.0 < values[0] < 1.0


def test_large_logits_are_stable_and_leading_dims_work():
    logits = RNG.normal(size=(3, 2, 20)) * 1e3
    h = masked_normalised_entropy(logits, np.ones((2, 20), bool))
    assert h.shape == (3, 2) and np.isfinite(h).all() and ((h >= 0) & (h <= 1)).all()


def test_empty_answer_space_and_bad_mask_are_errors():
    with pytest.raises(ValueError, match="no valid position"):
        masked_normalised_entropy(np.zeros((2, 4)), np.array([[1, 0, 0, 0], [0, 0, 0, 0]], bool))
    with pytest.raises(ValueError, match="does not fit"):
        masked_normalised_entropy(np.zeros((2, 4)), np.ones((2, 5), bool))


def test_span_entropy_rules():
    mask = np.ones((1, 8), bool)
    sharp = np.full((1, 8), -1e3)
    sharp[0, 3] = 0.0
    flat = np.zeros((1, 8))
    assert span_entropy(sharp, flat, mask)[0] == pytest.approx(1.0)  # max: the vague end decides
    assert span_entropy(flat, sharp, mask, rule="max")[0] == pytest.approx(1.0)
    assert span_entropy(sharp, flat, mask, rule="mean")[0] == pytest.approx(0.5)
    start, end = RNG.normal(size=(5, 8)), RNG.normal(size=(5, 8))
    h_s, h_e = masked_normalised_entropy(start, mask), masked_normalised_entropy(end, mask)
    np.testing.assert_allclose(span_entropy(start, end, mask), np.maximum(h_s, h_e))
    with pytest.raises(ValueError, match="unknown span entropy rule"):
        span_entropy(start, end, mask, rule="min")


def test_joint_rule_uniform_one_and_sharp_zero():
    mask = np.ones((2, 12), bool)
    assert span_entropy(np.zeros((2, 12)), np.zeros((2, 12)), mask, rule="joint") == pytest.approx([1.0, 1.0])
    s = np.full((1, 12), -1e3)
    e = np.full((1, 12), -1e3)
    s[0, 4], e[0, 6] = 0.0, 0.0
    assert span_entropy(s, e, mask[:1], rule="joint")[0] == pytest.approx(0.0, abs=1e-12)
    # masked values do not matter for the joint rule either
    m = mask[:1].copy()
    m[0, 9:] = False
    a = RNG.normal(size=(1, 12))
    b = RNG.normal(size=(1, 12))
    ref = span_entropy(a, b, m, rule="joint")
    a[0, 9:], b[0, 9:] = 1e4, -1e4
    np.testing.assert_allclose(span_entropy(a, b, m, rule="joint"), ref)


def _features(n: int, seq: int, ctx_start: int = 3, ctx_len: int = 10, example_index=None) -> QAFeatures:
    offsets = np.full((n, seq, 2), -1, np.int32)
    for t in range(ctx_len):
        offsets[:, ctx_start + t] = (5 * t, 5 * t + 4)
    return QAFeatures(
        token_ids=np.ones((n, seq), np.int32),
        lengths=np.full(n, ctx_start + ctx_len + 1, np.int32),
        context_start=np.full(n, ctx_start, np.int32),
        offsets=offsets,
        start_positions=np.zeros(n, np.int32),
        end_positions=np.zeros(n, np.int32),
        example_index=np.zeros(n, np.int32) if example_index is None else np.asarray(example_index, np.int32),
    )


def test_answer_space_from_features_or_offsets():
    feats = _features(2, 16)
    m = answer_space(feats, include_cls=False)
    assert m.shape == (2, 16) and m[:, 3:13].all() and m.sum() == 20
    with_cls = answer_space(feats.offsets, include_cls=True)
    assert with_cls[:, 0].all() and with_cls.sum() == 22
    assert answer_space(feats.offsets[..., 0], include_cls=True, length=8).shape == (2, 8)


def test_best_span_matches_the_post_processing():
    feats = _features(6, 24, ctx_len=18)
    start, end = RNG.normal(size=(2, 6, 24)) * 3
    mask = answer_space(feats, include_cls=True)  # [CLS] in the mask must not become a span
    s, e, score, null = best_span(start, end, mask, n_best=5, max_answer_len=4)
    ref = best_spans_per_feature(start, end, feats, n_best=5, max_answer_len=4)
    for got, want in zip((s, e, score, null), ref, strict=True):
        np.testing.assert_allclose(got, want)


def test_no_answer_margin_hand_worked_and_per_question():
    feats = _features(3, 16, example_index=[0, 0, 1])
    start = np.full((3, 16), -5.0)
    end = np.full((3, 16), -5.0)
    start[:, 0], end[:, 0] = [1.0, 0.5, 2.0], [1.0, 0.0, 2.0]  # null = 2, 0.5, 4
    start[:, 4], end[:, 5] = [3.0, 1.0, 1.0], [2.0, 1.0, 1.0]  # best = 5, 2, 2
    mask = answer_space(feats, include_cls=True)
    np.testing.assert_allclose(no_answer_margin(start, end, mask), [-3.0, -1.5, 2.0])
    per_q = question_no_answer_margin(start, end, mask, feats.example_index)
    np.testing.assert_allclose(per_q, [0.5 - 5.0, 2.0])
    examples = [SquadExample(f"q{i}", "q?", "x" * 60, (), False, "t", "t#0") for i in range(2)]
    preds = predict_answers(examples, feats, start, end)
    np.testing.assert_allclose(per_q, [p.null_score_diff for p in preds])


def test_settled_no_answer_and_exit_confidence():
    diff = np.array([-3.0, -0.5, 0.4, 2.0])
    np.testing.assert_array_equal(settled_no_answer(diff, 0.0, 1.0), [True, False, False, True])
    np.testing.assert_array_equal(settled_no_answer(diff, 1.5, 1.0), [True, True, True, False])
    h = np.array([0.1, 0.1, 0.5, 0.1])
    np.testing.assert_array_equal(exit_confidence(h, 0.2), [True, True, False, True])
    np.testing.assert_array_equal(exit_confidence(h, 0.2, diff, 0.0, 1.0), [True, False, False, True])
    with pytest.raises(ValueError, match="null_diff"):
        exit_confidence(h, 0.2, no_answer_margin=1.0)


def test_aggregate_by_example():
    values = np.array([[0.1, 0.7, 0.3, 0.2], [1.0, 2.0, 3.0, 4.0]])
    idx = np.array([2, 0, 2, 0])
    np.testing.assert_allclose(aggregate_by_example(values, idx, "max"), [[0.7, np.nan, 0.3], [4, np.nan, 3]])
    np.testing.assert_allclose(
        aggregate_by_example(values[0], idx, "min", num_examples=4), [0.2, np.nan, 0.1, np.nan]
    )
    np.testing.assert_allclose(aggregate_by_example(values[1], idx, "mean"), [3.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_by_example(values, idx, "median")
    with pytest.raises(ValueError, match="windows"):
        aggregate_by_example(values, idx[:3])


# ---------------------------------------------------------------- policies


def _outputs(entropies, spans=None, diffs=None):
    spans = spans or [(1, 2)] * len(entropies)
    diffs = diffs or [None] * len(entropies)
    return [
        LayerOutput(k + 1, None, None, h, s, null_diff=d)
        for k, (h, s, d) in enumerate(zip(entropies, spans, diffs, strict=True))
    ]


def _run(policy, outputs) -> int | None:
    """Call decide after each layer, as the runtime does; the exit layer or None."""
    for k in range(1, len(outputs) + 1):
        decision = policy.decide(outputs[:k])
        if decision is not None:
            return decision.layer
    return None


def test_entropy_policy_exits_at_first_confident_layer():
    outs = _outputs([0.9, 0.5, 0.2, 0.1])
    assert _run(EntropyPolicy(0.3), outs) == 3
    assert _run(EntropyPolicy(0.5), outs) == 2  # ≤ is enough
    assert _run(EntropyPolicy(0.05), outs) is None
    assert isinstance(EntropyPolicy(0.3), ExitPolicy)
    with pytest.raises(ValueError):
        EntropyPolicy(float("nan"))


def test_no_answer_margin_blocks_an_exit():
    outs = _outputs([0.1, 0.1, 0.1], diffs=[0.2, -0.5, -2.5])
    assert _run(EntropyPolicy(0.3), outs) == 1
    assert _run(EntropyPolicy(0.3, no_answer_margin=1.0), outs) == 3
    assert _run(EntropyPolicy(0.3, no_answer_margin=1.0, null_threshold=0.5), outs) == 2
    assert _run(EntropyPolicy(0.3, no_answer_margin=1.0, null_threshold=-1.0), outs) == 1
    with pytest.raises(ValueError, match="null_diff"):
        _run(EntropyPolicy(0.3, no_answer_margin=1.0), _outputs([0.1]))


def test_patience_counts_consecutive_layers_and_resets():
    a, b = (3, 5), (4, 5)
    outs = _outputs([0.9] * 6, spans=[a, a, b, b, b, a])
    assert _run(PatiencePolicy(1), outs) == 1
    assert _run(PatiencePolicy(2), outs) == 2
    assert _run(PatiencePolicy(3), outs) == 5  # a, a then the change to b resets the count
    assert _run(PatiencePolicy(4), outs) is None
    with pytest.raises(ValueError):
        PatiencePolicy(0)


def test_never_and_combined():
    outs = _outputs([0.9, 0.8, 0.1, 0.1], spans=[(1, 1), (2, 2), (2, 2), (2, 2)])
    assert _run(NeverExit(), outs) is None
    combined = CombinedPolicy(any_of=[EntropyPolicy(0.2), PatiencePolicy(2)])
    decision = None
    for k in range(1, 5):
        decision = combined.decide(outs[:k])
        if decision:
            break
    assert decision.layer == 3 and decision.reason.startswith("EntropyPolicy")
    assert _run(CombinedPolicy(any_of=[EntropyPolicy(0.05), PatiencePolicy(2)]), outs) == 3
    with pytest.raises(ValueError):
        CombinedPolicy(any_of=[])


class _CustomPolicy:
    """Only decide(): exits when entropy fell below half of layer 1's."""

    def decide(self, layer_outputs):
        if layer_outputs[-1].entropy <= 0.5 * layer_outputs[0].entropy:
            from elma_utils.early_exit import ExitDecision

            return ExitDecision(layer_outputs[-1].layer, "halved")
        return None


def test_simulate_exits_agrees_with_the_objects_on_random_data():
    k_layers, n = 6, 300
    rng = np.random.default_rng(1)
    entropy = np.clip(rng.random((k_layers, n)) - 0.1 * np.arange(k_layers)[:, None], 0, 1)
    spans = rng.integers(0, 3, size=(k_layers, n, 2))
    diffs = rng.normal(size=(k_layers, n)) * 2
    policies = [
        EntropyPolicy(0.3),
        EntropyPolicy(0.1),
        EntropyPolicy(0.3, no_answer_margin=1.0, null_threshold=0.5),
        PatiencePolicy(2),
        PatiencePolicy(3),
        NeverExit(),
        CombinedPolicy(any_of=[EntropyPolicy(0.15), PatiencePolicy(3)]),
        _CustomPolicy(),
    ]
    for policy in policies:
        fast = simulate_exits(entropy, spans, policy, per_layer_null_diff=diffs)
        for q in range(n):
            outs = _outputs(list(entropy[:, q]), [tuple(s) for s in spans[:, q]], list(diffs[:, q]))
            assert fast[q] == (_run(policy, outs) or k_layers + 1), (policy, q)
    by_dict = simulate_exits(entropy, spans, {"threshold": 0.15, "patience": 3})
    np.testing.assert_array_equal(by_dict, simulate_exits(entropy, spans, policies[6]))
    assert (simulate_exits(entropy, None, {}) == k_layers + 1).all()
    with pytest.raises(ValueError, match="unknown policy parameter"):
        simulate_exits(entropy, spans, {"treshold": 0.1})
    with pytest.raises(ValueError, match="per_layer_span"):
        simulate_exits(entropy, spans[:, :5], PatiencePolicy(2))


def test_layer_output_from_logits():
    feats = _features(2, 16)
    mask = answer_space(feats, include_cls=True)
    context = " ".join(f"w{t:03d}" for t in range(10))  # token t covers chars 5t..5t+4
    start = np.full((2, 16), -4.0)
    end = np.full((2, 16), -4.0)
    start[1, 5], end[1, 6] = 6.0, 5.0  # window 1, tokens 5..6 = context tokens 2..3
    out = LayerOutput.from_logits(2, start, end, mask, feats.offsets, context)
    assert out.best_span == (10, 19) and out.text == "w002 w003" and out.layer == 2
    assert out.entropy == pytest.approx(np.max(span_entropy(start, end, mask)))
    assert out.null_diff == pytest.approx(-8.0 - 11.0)
    assert out.entropy_for("mean") == pytest.approx(np.max(span_entropy(start, end, mask, "mean")))
    unanswerable = LayerOutput.from_logits(2, start, end, mask, feats.offsets, context, null_threshold=-20.0)
    assert unanswerable.best_span == NO_SPAN and unanswerable.text == ""
    tokens_only = LayerOutput.from_logits(1, start, end, mask)
    assert tokens_only.best_span == (16 + 5, 16 + 6)
    with pytest.raises(ValueError, match="needs the logits"):
        _outputs([0.1])[0].entropy_for("joint")


# ---------------------------------------------------------------- calibration


def _held_out(k_layers: int = 6, n: int = 400, seed: int = 2):
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    layers = np.arange(1, k_layers + 1)[:, None]
    entropy = np.clip(
        difficulty[None, :] * (1.2 - layers / k_layers) + rng.normal(0, 0.05, (k_layers, n)), 0, 1
    )
    f1 = np.clip(1.0 - entropy + rng.normal(0, 0.05, (k_layers, n)), 0, 1)
    return f1, entropy


def test_sweep_is_monotonic_in_the_threshold():
    f1, entropy = _held_out()
    sweep = sweep_thresholds(f1, entropy, layer_latency_ms=np.full(6, 2.0), base_latency_ms=1.0)
    assert np.all(np.diff(sweep.values) > 0)
    assert np.all(np.diff(sweep.avg_exit_layer) <= 1e-12)
    assert np.all(np.diff(sweep.share_offloaded) <= 1e-12)
    assert np.all(np.diff(sweep.expected_latency) <= 1e-12)
    assert sweep.avg_exit_layer[-1] == 1.0 and sweep.speedup[-1] == pytest.approx(13.0 / 3.0)
    assert sweep.reference_f1 == pytest.approx(100 * f1[-1].mean())
    json.dumps(sweep.summary(), allow_nan=False)


def _crafted():
    """3 layers, 4 questions; F1 and entropy worked by hand."""
    f1 = np.array(
        [
            [1.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 0.5],
            [1.0, 1.0, 1.0, 1.0],
        ]
    )
    entropy = np.array(
        [
            [0.1, 0.5, 0.3, 0.9],
            [0.1, 0.2, 0.3, 0.9],
            [0.1, 0.2, 0.3, 0.9],
        ]
    )
    return f1, entropy


def test_choose_threshold_takes_the_cheapest_within_one_f1():
    f1, entropy = _crafted()
    sweep = sweep_thresholds(
        f1, entropy, layer_latency_ms=[10.0, 10.0, 10.0], thresholds=[0.1, 0.2, 0.3, 0.9]
    )
    # exits: E=0.1 → (1, 4, 4, 4); 0.2 → (1, 2, 4, 4); 0.3 → (1, 2, 1, 4); 0.9 → (1, 1, 1, 1)
    np.testing.assert_array_equal(sweep.exit_layers[2], [1, 2, 1, 4])
    np.testing.assert_allclose(sweep.f1, [100.0, 100.0, 75.0, 25.0])
    np.testing.assert_allclose(sweep.expected_latency, [25.0, 22.5, 17.5, 10.0])
    assert sweep.reference_f1 == 100.0
    chosen = choose_threshold(sweep, max_f1_loss=1.0)
    assert chosen.value == 0.2 and chosen.f1 == 100.0 and chosen.speedup == pytest.approx(30.0 / 22.5)
    assert choose_threshold(sweep, max_f1_loss=25.0).value == 0.3
    assert choose_threshold(sweep, max_f1_loss=60.0).value == 0.3
    assert choose_threshold(sweep, max_f1_loss=80.0).value == 0.9
    impossible = sweep_thresholds(f1, entropy, thresholds=[0.3, 0.9], reference_f1=100.0)
    with pytest.raises(ValueError, match="no threshold keeps F1 within 1.0"):
        choose_threshold(impossible)


def test_offloaded_questions_get_the_server_answer_and_its_cost():
    f1, entropy = _crafted()
    server = np.array([1.0, 1.0, 1.0, 0.0])
    sweep = sweep_thresholds(
        f1, entropy, [10.0, 10.0, 10.0], thresholds=[0.2], offload_f1=server, offload_latency_ms=50.0
    )
    # exits (1, 2, off, off): F1 = (1 + 1 + 1 + 0) / 4; latency = (10 + 20 + 80 + 80) / 4
    assert sweep.f1[0] == pytest.approx(75.0) and sweep.reference_f1 == pytest.approx(75.0)
    assert sweep.expected_latency[0] == pytest.approx(47.5) and sweep.share_offloaded[0] == 0.5
    assert sweep.offloading and sweep.avg_exit_layer[0] == pytest.approx(9 / 4)


def test_sweep_rejects_percent_f1_and_patience_sweep_works():
    f1, entropy = _crafted()
    with pytest.raises(ValueError, match="0..1"):
        sweep_thresholds(100 * f1, entropy)
    with pytest.raises(ValueError, match="differ"):
        sweep_thresholds(f1, entropy[:, :3])
    spans = np.zeros((3, 4, 2), int)
    exits = np.stack([simulate_exits(entropy, spans, PatiencePolicy(p)) for p in (1, 2, 3)])
    sweep = sweep_exit_layers("patience", [1, 2, 3], exits, f1)
    np.testing.assert_allclose(sweep.avg_exit_layer, [1, 2, 3])
    assert choose_threshold(sweep, 1.0).value == 3


def test_plots_return_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elma_utils.early_exit import plot_exit_histogram, plot_f1_vs_exit_layer, plot_f1_vs_latency

    f1, entropy = _held_out(n=50)
    sweep = sweep_thresholds(f1, entropy, thresholds=np.linspace(0, 1, 11))
    chosen = choose_threshold(sweep, 5.0)
    for fig in (
        plot_f1_vs_exit_layer(sweep, chosen, max_f1_loss=5.0),
        plot_f1_vs_latency(sweep, chosen.index),
        plot_exit_histogram(sweep.exit_layers[chosen.index], 6),
    ):
        assert fig.axes
        plt.close(fig)


def test_layerwise_question_stats_on_a_tiny_example():
    context = " ".join(f"w{t:03d}" for t in range(10))
    gold = (Answer("w002 w003", 10),)
    examples = [SquadExample(f"q{i}", "which?", context, gold, False, "t", "t#0") for i in range(2)]
    dataset = examples_to_squad_json(examples, "1.1")
    feats = _features(2, 16, example_index=[0, 1])
    start = np.full((2, 2, 16), -4.0)
    end = np.full((2, 2, 16), -4.0)
    start[:, :, 5], end[:, :, 6] = 6.0, 5.0  # both layers: tokens 5..6 = "w002 w003"
    end[0, 1, 6], end[0, 1, 12] = -4.0, 5.0  # layer 1, question 1: "w002 … w009"
    stats = layerwise_question_stats(examples, feats, start, end, dataset, "1.1")
    np.testing.assert_allclose(stats["f1"], [[1.0, 2 * (1.0 * 0.25) / 1.25], [1.0, 1.0]])
    np.testing.assert_array_equal(stats["span"][:, 0], [[10, 19], [10, 19]])
    assert stats["span"][0, 1].tolist() == [10, 49] and stats["entropy"].shape == (2, 2)


# ---------------------------------------------------------------- entropy predictor


def _synthetic_exits(n: int, k_layers: int = 6, seed: int = 3):
    """Entropy at layer 1 in [0, 1) decides: bands of 0.2 → exit layers 2, 3, 4, 5 and 'no exit'."""
    h = np.random.default_rng(seed).random(n)
    exits = np.array([2, 3, 4, 5, k_layers + 1])[np.minimum((h / 0.2).astype(int), 4)]
    return h, exits


def test_predictor_recovers_a_deterministic_exit_layer():
    h, exits = _synthetic_exits(4000)
    uniform = EntropyExitPredictor(num_layers=6, binning="uniform").fit(h, exits, bins=20)
    h_test, exits_test = _synthetic_exits(1000, seed=4)
    np.testing.assert_array_equal(uniform.predict(h_test), exits_test)
    np.testing.assert_array_equal(uniform.should_offload_now(h_test), exits_test == 7)
    by_quantile = EntropyExitPredictor(num_layers=6).fit(h, exits, bins=20)
    assert np.mean(by_quantile.predict(h_test) == exits_test) > 0.9
    assert uniform.p_no_exit(0.99) == 1.0 and uniform.p_no_exit(0.1) == 0.0


def test_predictor_ignores_questions_that_exited_by_layer_j_and_fills_empty_bins():
    h = np.array([0.05, 0.06, 0.5, 0.55, 0.9, 0.95])
    exits = np.array([1, 1, 3, 3, 5, 5])  # K = 4: 5 = no exit
    pred = EntropyExitPredictor(num_layers=4, binning="uniform").fit(h, exits, bins=10)
    assert pred.counts.sum(axis=1).min() > 0
    assert pred.predict(0.05) == 3  # nearest non-empty bin: layer 3 (the exited ones are left out)
    assert pred.predict(0.99) == 5 and pred.should_offload_now(0.97)


def test_predictor_when_every_question_exits_by_layer_j_never_offloads_early():
    # a loose threshold: nothing runs past layer 1, so the table has nothing to say
    # about hopeless questions and must never send one to the server early
    h = np.array([0.1, 0.4, 0.7, 0.9])
    pred = EntropyExitPredictor(num_layers=4).fit(h, np.ones(4, dtype=int), bins=4)
    assert not pred.should_offload_now(np.linspace(0, 1, 11), p_no_exit_threshold=0.01).any()
    assert set(pred.predict(np.linspace(0, 1, 11)).tolist()) == {1}
    report = evaluate_predictor(pred, h, np.ones(4, dtype=int), np.ones(4), np.zeros(4))
    assert report["share_offloaded_early"] == 0.0 and report["f1_change"] == 0.0
    with pytest.raises(ValueError, match="no questions"):
        EntropyExitPredictor(num_layers=4).fit(np.array([]), np.array([], dtype=int))


def test_predictor_round_trips_through_json():
    h, exits = _synthetic_exits(2000)
    pred = EntropyExitPredictor(num_layers=6, quantile=0.75, threshold=0.25).fit(h, exits, bins=15)
    again = EntropyExitPredictor.from_dict(json.loads(json.dumps(pred.to_dict())))
    probe = np.linspace(-0.1, 1.1, 500)
    np.testing.assert_array_equal(again.predict(probe), pred.predict(probe))
    np.testing.assert_array_equal(again.p_no_exit(probe), pred.p_no_exit(probe))
    assert (again.threshold, again.quantile, again.layer) == (0.25, 0.75, 1)
    bad = pred.to_dict() | {"counts": pred.to_dict()["counts"][:-1]}
    with pytest.raises(ValueError, match="do not fit"):
        EntropyExitPredictor.from_dict(bad)
    with pytest.raises(ValueError, match="format"):
        EntropyExitPredictor.from_dict({"edges": []})
    with pytest.raises(RuntimeError, match="not fitted"):
        EntropyExitPredictor(num_layers=6).predict(0.5)


def test_evaluate_predictor_hand_worked():
    pred = EntropyExitPredictor(num_layers=4, binning="uniform").fit(
        np.array([0.1, 0.2, 0.8, 0.9]), np.array([2, 3, 5, 5]), bins=2
    )
    h = np.array([0.05, 0.3, 0.7, 0.95, 0.6])
    exits = np.array([1, 3, 5, 5, 2])  # question 4 would have exited at layer 2 but looks hopeless
    exit_f1 = np.array([1.0, 1.0, 0.0, 0.0, 1.0])
    server = np.array([1.0, 1.0, 1.0, 0.5, 0.0])
    report = evaluate_predictor(pred, h, exits, exit_f1, server, layer_latency_ms=[1.0, 2.0, 3.0, 4.0])
    assert report["share_offloaded_early"] == pytest.approx(3 / 5)
    assert (report["correctly_offloaded"], report["wrongly_offloaded"]) == (2, 1)
    # edge layers: before (1, 3, 4, 4, 2) = 14, after (1, 3, 1, 1, 1) = 7
    assert report["avg_edge_layers_before"] == pytest.approx(14 / 5)
    assert report["edge_layers_saved_share"] == pytest.approx(0.5)
    # F1 before (1, 1, 1, .5, 1) → after (1, 1, 1, .5, 0)
    assert report["f1_change"] == pytest.approx(-20.0)
    assert report["edge_ms_saved_per_question"] == pytest.approx((0 + 0 + 9 + 9 + 2) / 5)
