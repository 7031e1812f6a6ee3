"""Adaptive width (skimming the passage after an early layer): keep rule, head training, the
Keras paths, the edge bundle, and the adaptive benchmark — on hand-worked data and tiny models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from qa_fixtures import tiny_span_model

from elma_utils.early_exit.policies import EntropyPolicy, NeverExit
from elma_utils.early_exit.runtime import EarlyExitRunner
from elma_utils.early_exit.skim import (
    NEG_INF,
    SkimHead,
    fit_skim_probe,
    gather_rows,
    keep_positions,
    pad_positions,
    scatter_logits,
    skim_targets,
)
from elma_utils.export.bundle import BundleError, verify_bundle, write_bundle
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.squad.features import build_features

SEQ = 96
WINDOWS = dict(max_seq_len=SEQ, doc_stride=48, max_query_len=24)


# ---------------------------------------------------------------- keep rule (hand-worked)


def _offsets(n_question: int, n_context: int, pad: int = 0) -> np.ndarray:
    """[CLS] q… [SEP] c… [SEP] pad…: context tokens get offsets ≥ 0, the rest -1."""
    L = 1 + n_question + 1 + n_context + 1 + pad
    off = np.full((L, 2), -1)
    c0 = n_question + 2
    off[c0 : c0 + n_context, 0] = np.arange(n_context) * 5
    off[c0 : c0 + n_context, 1] = np.arange(n_context) * 5 + 4
    return off


def test_keep_rule_keeps_cls_question_seps_and_the_blocks_above_tau():
    off = _offsets(3, 12, pad=4)  # context at 5..16, blocks of 4: [5-8] [9-12] [13-16]
    length = 18
    probs = np.zeros(len(off))
    probs[10] = 0.9  # block 1 is the best
    probs[15] = 0.3  # block 2 scores 0.3
    kept = keep_positions(probs, off, length, block=4, tau=0.5)
    assert kept.tolist() == [0, 1, 2, 3, 4] + list(range(9, 13)) + [17]
    kept = keep_positions(probs, off, length, block=4, tau=0.25)
    assert kept.tolist() == [0, 1, 2, 3, 4] + list(range(9, 17)) + [17]
    # the top block is kept even when nothing reaches tau; its neighbours with margin_blocks=1
    kept = keep_positions(probs, off, length, block=4, tau=0.99, margin_blocks=1)
    assert kept.tolist() == list(range(0, 18))
    assert keep_positions(probs, off, length, block=4, tau=0.99).tolist() == [
        0,
        1,
        2,
        3,
        4,
        9,
        10,
        11,
        12,
        17,
    ]
    # tau = 0 keeps every real token, never padding
    assert keep_positions(probs, off, length, block=4, tau=0.0).tolist() == list(range(length))


@pytest.mark.parametrize("seed", range(5))
def test_blocks_never_drop_cls_or_the_question(seed):
    rng = np.random.default_rng(seed)
    off = _offsets(int(rng.integers(1, 10)), int(rng.integers(1, 60)), pad=int(rng.integers(0, 5)))
    length = int((np.arange(len(off)) <= np.nonzero(off[:, 0] >= 0)[0][-1] + 1).sum())
    kept = keep_positions(rng.random(len(off)), off, length, block=int(rng.integers(1, 9)), tau=0.9)
    non_context = [i for i in range(length) if off[i, 0] < 0]
    assert set(non_context) <= set(kept.tolist())
    assert np.all(np.diff(kept) > 0) and kept.max() < length
    assert any(off[i, 0] >= 0 for i in kept)  # a window never loses its whole context


def test_gather_then_scatter_round_trips_offsets_and_logits():
    rng = np.random.default_rng(0)
    off = np.stack([_offsets(3, 20, pad=2), _offsets(3, 20, pad=2)])
    kept = [keep_positions(rng.random(28), off[r], 26, block=4, tau=0.6) for r in range(2)]
    pos = pad_positions(kept)
    assert pos.shape == (2, max(len(k) for k in kept)) and (
        pos[pos < 0].size == abs(len(kept[0]) - len(kept[1]))
    )
    got = gather_rows(off, pos, -1)
    for r in range(2):
        np.testing.assert_array_equal(got[r, : len(kept[r])], off[r, kept[r]])
        assert np.all(got[r, len(kept[r]) :] == -1)
    logits = rng.normal(size=(2, 28)).astype(np.float32)
    back = scatter_logits(gather_rows(logits, pos, 0.0), pos, 28)
    for r in range(2):
        np.testing.assert_array_equal(back[r, kept[r]], logits[r, kept[r]])
        dropped = np.setdiff1d(np.arange(28), kept[r])
        assert np.all(back[r, dropped] == NEG_INF)
    one = scatter_logits(logits[0, kept[0]], kept[0], 28)
    np.testing.assert_array_equal(one, back[0])
    padded = np.concatenate([kept[0], [-1, -1]])  # a fixed-shape bundle pads with -1
    np.testing.assert_array_equal(scatter_logits(logits[0, padded], padded, 28), back[0])


def test_skim_targets_are_the_full_models_span_and_no_answer_windows_have_none():
    off = np.stack([_offsets(2, 10), _offsets(2, 10)])  # context at 4..13
    start = np.full((2, 15), -5.0)
    end = np.full((2, 15), -5.0)
    start[0, 6], end[0, 8] = 5.0, 5.0  # window 0: span 6..8 beats [CLS]
    start[1, 0], end[1, 0] = 9.0, 9.0  # window 1: [CLS] wins ("not here")
    start[1, 10], end[1, 11] = 1.0, 1.0
    t = skim_targets(start, end, off)
    assert np.nonzero(t[0])[0].tolist() == [6, 7, 8] and not t[1].any()
    # the question's answer window is positive even when its [CLS] wins (SQuAD 1.1 always answers)
    t = skim_targets(start[1:], end[1:], off[1:], example_index=np.array([0]))
    assert np.nonzero(t[0])[0].tolist() == [10, 11]


def test_skim_probe_separates_a_synthetic_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 16)).astype(np.float32)
    y = x[:, 3] + 0.5 * x[:, 7] > 2.0  # rare positives (~4%)
    w, b, info = fit_skim_probe(x, y, steps=300)
    p = SkimHead(w, b, layer=1).token_probs(x)
    assert info["positives"] == int(y.sum()) and info["pos_weight"] > 10
    assert p[y].min() > np.quantile(p[~y], 0.5)
    assert np.mean(p[y]) > 0.8 and np.mean(p[~y]) < 0.3
    assert abs(w[3]) > 3 * np.abs(np.delete(w, [3, 7])).max()


def test_skim_head_save_load_and_bad_settings(tmp_path):
    head = SkimHead(np.arange(4, dtype=np.float32), 0.5, layer=2, block=8, tau=0.1, margin_blocks=1)
    back = SkimHead.load(head.save(tmp_path / "skim.npz"))
    np.testing.assert_array_equal(back.w, head.w)
    assert back.settings() == head.settings() and back.b == 0.5
    assert SkimHead.load(tmp_path / "skim.npz", tau=0.3).tau == 0.3
    for bad in ({"tau": 1.5}, {"block": 0}, {"layer": 0}, {"margin_blocks": -1}):
        with pytest.raises(ValueError):
            head.with_settings(**bad)
    whole = (tmp_path / "skim.npz").read_bytes()
    for content in (b"not a zip", b"", whole[:40]):  # garbage, empty, a truncated .npz
        (tmp_path / "bad.npz").write_bytes(content)
        with pytest.raises(ValueError, match="not a skim head"):
            SkimHead.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", w=head.w, b=0.5, layer=2.0, block=8.0)  # stored as floats
    assert type(SkimHead.load(tmp_path / "float.npz").layer) is int
    np.savez(tmp_path / "half.npz", w=head.w, b=0.5, layer=2.5)  # a layer that is no integer
    with pytest.raises(ValueError, match="integer"):
        SkimHead.load(tmp_path / "half.npz")


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def setup(dev_v11, minilm_tokenizer):
    multi = MultiExitQAModel.from_span_model(tiny_span_model(seed=0, num_layers=3))
    examples = dev_v11.examples[:10]
    feats = build_features(examples, minilm_tokenizer, progress=False, **WINDOWS)
    return multi, examples, feats


def _layer_states(multi, feats, layer: int) -> np.ndarray:
    x = feats.model_inputs(np.arange(len(feats)))
    return np.asarray(multi.encoder.hidden_states(x, upto=layer)[-1], dtype=np.float32)


@pytest.fixture(scope="module")
def head(setup):
    """A random skim head after layer 1 whose tau sits in a wide gap between block scores, so
    that float32 noise between Keras and LiteRT cannot move a block across it."""
    multi, _, feats = setup
    rng = np.random.default_rng(1)
    h = _layer_states(multi, feats, 1)
    w = rng.normal(size=h.shape[-1]).astype(np.float32)
    z = h @ w
    probe = SkimHead(w / z.std(), -float(np.mean(z) / z.std()), layer=1, block=8)
    scores = []
    for r in range(len(feats)):
        p = probe.token_probs(h[r])
        ctx = np.nonzero(feats.offsets[r, :, 0] >= 0)[0]
        scores += [p[ctx[i : i + 8]].max() for i in range(0, len(ctx), 8)]
    s = np.sort(scores)
    mid = s[len(s) // 4 : 3 * len(s) // 4 + 1]
    gap = int(np.argmax(np.diff(mid)))
    return probe.with_settings(tau=float((mid[gap] + mid[gap + 1]) / 2))


def test_tau_zero_reproduces_the_unskimmed_answers(setup, head):
    from elma_utils.early_exit.skim_model import skim_exit_logits
    from elma_utils.model.exit_training import predict_exit_logits
    from elma_utils.squad.postprocess import predict_answers

    multi, examples, feats = setup
    ref = EarlyExitRunner(multi, NeverExit()).run(examples, feats)
    got = EarlyExitRunner(multi, NeverExit(), skim=head.with_settings(tau=0.0)).run(examples, feats)
    assert [(a.text, a.exit_layer) for a in got] == [(a.text, a.exit_layer) for a in ref]
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g.entropies, r.entropies, atol=1e-5)
        assert g.kept_share == 1.0
    start, end = predict_exit_logits(multi, feats, progress=False)
    out = skim_exit_logits(multi, feats, head, taus=[0.0, head.tau], progress=False)
    assert np.all(out[0.0]["kept"] == feats.lengths)
    for k in range(multi.num_exits):
        a = predict_answers(examples, feats, start[:, k], end[:, k])
        b = predict_answers(examples, feats, out[0.0]["start"][:, k], out[0.0]["end"][:, k])
        assert [p.text for p in a] == [p.text for p in b]
    # layers up to the skim layer are untouched by any tau; later ones only see kept positions
    np.testing.assert_allclose(out[head.tau]["start"][:, 0], start[:, 0], atol=1e-4)
    assert (out[head.tau]["kept"] < feats.lengths).any()


def test_runner_and_batched_eval_path_skim_alike(setup, head):
    from elma_utils.early_exit.skim_model import skim_exit_logits
    from elma_utils.squad.postprocess import predict_answers

    multi, examples, feats = setup
    answers = EarlyExitRunner(multi, NeverExit(), skim=head).run(examples, feats)
    out = skim_exit_logits(multi, feats, head, progress=False)[head.tau]
    last = predict_answers(examples, feats, out["start"][:, -1], out["end"][:, -1])
    assert [a.text for a in answers] == [p.text for p in last]
    shares = [a.kept_share for a in answers]
    assert min(shares) < 1.0 and all(0 < s <= 1 for s in shares)
    for i, a in enumerate(answers):
        rows = feats.example_index == i
        assert a.kept_share == pytest.approx(out["kept"][rows].sum() / feats.lengths[rows].sum())
    # a question that exits at the skim layer or before reports no skimming
    early = EarlyExitRunner(multi, EntropyPolicy(threshold=1.0), skim=head).run(examples, feats)
    assert all(a.exit_layer == 1 and a.kept_share == 1.0 for a in early)


@pytest.fixture(scope="module")
def skim_bundle(setup, head, minilm_tokenizer, tmp_path_factory):
    multi, _, _ = setup
    return write_bundle(
        multi,
        minilm_tokenizer,
        tmp_path_factory.mktemp("skim") / "float32",
        seq_len=SEQ,
        precision="float32",
        thresholds={"policy": "entropy", "E_T": 0.5, "rule": "max"},
        model_version="tiny-skim-1",
        doc_stride=WINDOWS["doc_stride"],
        max_query_len=WINDOWS["max_query_len"],
        skim=head,
    )


def test_edge_float32_skim_answers_equal_the_keras_skim_path(setup, head, skim_bundle):
    from elma_utils.edge.runtime import EdgeModel

    multi, examples, feats = setup
    manifest = verify_bundle(skim_bundle)
    assert manifest["skim"] == {"file": "skim.npz", **head.settings()} and "skim.npz" in manifest["files"]
    edge = EdgeModel.load(skim_bundle)
    assert edge.skim.settings() == head.settings()
    never = EarlyExitRunner(multi, NeverExit(), skim=head).run(examples, feats)
    h2 = sorted(a.entropies[1] for a in never)
    thr = (h2[len(h2) // 2 - 1] + h2[len(h2) // 2]) / 2
    for policy in (NeverExit(), EntropyPolicy(threshold=thr)):
        ref = EarlyExitRunner(multi, policy, skim=head).run(examples, feats)
        got = edge.answer_features(examples, feats, policy=policy)
        assert [(a.text, a.char_start, a.char_end) for a in got] == [
            (a.text, a.char_start, a.char_end) for a in ref
        ]
        assert [(a.exit_layer, a.solved) for a in got] == [(a.exit_layer, a.solved) for a in ref]
        assert [a.kept_share for a in got] == pytest.approx([a.kept_share for a in ref])
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g.entropies, r.entropies, atol=1e-5)
            assert g.layer_texts[-1] == g.text and len(g.layer_texts) == g.exit_layer
    assert min(a.kept_share for a in edge.answer_features(examples, feats, policy=NeverExit())) < 1.0
    # skim=False: the same bundle at full width gives the unskimmed Keras answers
    plain = edge.answer_features(examples, feats, policy=NeverExit(), skim=False)
    ref = EarlyExitRunner(multi, NeverExit()).run(examples, feats)
    assert [a.text for a in plain] == [a.text for a in ref] and all(a.kept_share == 1.0 for a in plain)


def _rewrite_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        manifest["skim"][key] = value
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            lambda b: (b / "skim.npz").write_bytes((b / "skim.npz").read_bytes()[:-8]),
            r"skim\.npz: .*truncated",
        ),
        (lambda b: _flip(b / "skim.npz"), r"skim\.npz: sha256 does not match"),
        (lambda b: (b / "skim.npz").unlink(), r"missing file skim\.npz"),
        (lambda b: _rewrite_manifest(b, layer=3), r"skim layer must be an integer 1\.\.2"),
        (lambda b: _rewrite_manifest(b, tau=2.0), r"skim tau must be a number in 0\.\.1"),
        (lambda b: _rewrite_manifest(b, file="other.npz"), r"skim file 'other\.npz' is not listed"),
        (lambda b: shutil.copy(b / "skim.npz", b / "skim2.npz"), r"unexpected .*skim2\.npz"),
    ],
    ids=["truncated", "flipped", "deleted", "layer", "tau", "file", "extra"],
)
def test_tampered_skim_bundles_are_refused(skim_bundle, tmp_path, tamper, message):
    from elma_utils.edge.runtime import EdgeModel

    copy = shutil.copytree(skim_bundle, tmp_path / "copy")
    tamper(copy)
    with pytest.raises(BundleError, match=message):
        verify_bundle(copy)
    with pytest.raises(BundleError, match=message):
        EdgeModel.load(copy)


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- calibration (hand-made stats)


def _stats(f1, entropy, null_diff=None, kept_share=None):
    f1 = np.asarray(f1, dtype=float)
    out = {"f1": f1, "entropy": np.asarray(entropy, dtype=float),
           "null_diff": np.zeros_like(f1) if null_diff is None else np.asarray(null_diff, dtype=float)}  # fmt: skip
    if kept_share is not None:
        out["kept_share"] = np.asarray(kept_share, dtype=float)
    return out


def test_calibration_prefers_a_skim_that_keeps_f1_and_refuses_one_that_loses_it():
    from elma_utils.early_exit.skim_calibration import cross_fitted_adaptive, question_costs

    q = 40
    titles = [f"a{i // 4}" for i in range(q)]  # 10 articles
    f1 = np.ones((3, q))
    f1[0] = 0.0  # layer 1 never answers right: depth cannot exit there
    entropy = np.tile([[0.9], [0.1], [0.05]], (1, q))  # layer 2 is confident and right
    base = _stats(f1, entropy)
    good = _stats(f1, entropy, kept_share=np.full(q, 0.25))
    bad_f1 = f1.copy()
    bad_f1[1:] = 0.5
    bad = _stats(bad_f1, entropy, kept_share=np.full(q, 0.1))
    np.testing.assert_allclose(question_costs([1, 1, 1], np.full(2, 0.25), 1)[:, 0], [1, 1.25, 1.5])
    depth = cross_fitted_adaptive(base, {}, titles, skim_layer=1, mode="depth")
    assert (
        depth["avg_layers"] == 2
        and depth["f1_loss"] == 0
        and depth["speedup_cost_model"] == pytest.approx(1.5)
    )
    both = cross_fitted_adaptive(base, {0.1: good, 0.5: bad}, titles, skim_layer=1, mode="both")
    assert [s["tau"] for s in both["settings"]] == [0.1, 0.1]
    assert both["f1_loss"] == 0 and both["kept_token_share"] == pytest.approx(0.25)
    assert both["speedup_cost_model"] == pytest.approx(3 / 1.25)
    width = cross_fitted_adaptive(base, {0.1: good, 0.5: bad}, titles, skim_layer=1, mode="width")
    assert width["avg_layers"] == 3 and [s["E_T"] for s in width["settings"]] == [None, None]
    assert width["speedup_cost_model"] == pytest.approx(3 / 1.5)
    lossy = cross_fitted_adaptive(base, {0.5: bad}, titles, skim_layer=1, mode="width")
    assert [s["tau"] for s in lossy["settings"]] == [None, None] and lossy[
        "f1_loss"
    ] == 0  # no tau fits: none
    assert lossy["within_target_on_tuning_halves"] and lossy["speedup_cost_model"] == 1


def test_squad2_calibration_rejects_a_skim_that_flips_no_answer_calls():
    from elma_utils.early_exit.skim_calibration import bench_settings, cross_fitted_adaptive

    q = 40
    titles = [f"a{i // 4}" for i in range(q)]
    impossible = np.arange(q) % 2 == 0
    span_f1 = np.where(impossible, 0.0, 1.0)[None].repeat(2, 0)  # the span is right when there is one
    diff = np.where(impossible, 5.0, -5.0)[None].repeat(2, 0)  # and the null call is right too
    span_f1[0], diff[0] = 0.0, -5.0  # layer 1 answers wrongly: every question needs layer 2
    entropy = np.full((2, q), 0.5)
    base = _stats(span_f1, entropy, diff)
    flipped = diff.copy()
    flipped[1, 1::4] = 5.0  # skimming makes half of the answerable questions say "no answer"
    flips = _stats(span_f1, entropy, flipped, kept_share=np.full(q, 0.2))
    cf = cross_fitted_adaptive(base, {0.3: flips}, titles, skim_layer=1, mode="both", version="2.0",
                               impossible=impossible, max_f1_loss=30.0)  # fmt: skip
    assert [s["tau"] for s in cf["settings"]] == [
        None,
        None,
    ]  # the F1 budget would allow it; the flip rule not
    assert cf["flip_rate_from_skim"] == 0 and cf["flip_rate_vs_full"] == 0
    assert [s["tuning_flip_rate_by_tau"][0.3] for s in cf["settings"]] == [0.25, 0.25]  # of all questions
    width = cross_fitted_adaptive(base, {0.3: flips}, titles, skim_layer=1, mode="width", version="2.0",
                                  impossible=impossible, max_f1_loss=30.0)  # fmt: skip
    assert [s["tau"] for s in width["settings"]] == [None, None]  # every tau refused: width skims nothing
    assert width["speedup_cost_model"] == 1 and width["kept_token_share"] == 1 and width["f1_loss"] == 0
    allowed = cross_fitted_adaptive(base, {0.3: flips}, titles, skim_layer=1, mode="both", version="2.0",
                                    impossible=impossible, max_f1_loss=30.0, max_flip_rate=1.0)  # fmt: skip
    assert [s["tau"] for s in allowed["settings"]] == [0.3, 0.3]
    assert allowed["flip_rate_from_skim"] == pytest.approx(0.25) and allowed[
        "flip_rate_vs_full"
    ] == pytest.approx(0.25)
    assert allowed["kept_token_share"] == pytest.approx(0.2) and allowed["f1_loss"] == pytest.approx(25.0)
    s = bench_settings(titles, depth=cf, both=allowed)
    assert (
        set(s) == {"held_out_titles", "depth", "both"} and len(s["both"]) == 2 and s["both"][0]["tau"] == 0.3
    )
    assert 0 < len(s["held_out_titles"]) < 10


# ---------------------------------------------------------------- the benchmark, end to end


def test_adaptive_benchmark_runs_end_to_end(setup, head, minilm_tokenizer, tmp_path):
    from elma_utils.bench import adaptive

    multi, _, _ = setup
    bundle = write_bundle(multi, minilm_tokenizer, tmp_path / "int8", seq_len=SEQ, precision="int8",
                          thresholds={"policy": "entropy", "E_T": 0.8, "rule": "max"}, model_version="tiny-skim-8",
                          doc_stride=WINDOWS["doc_stride"], max_query_len=WINDOWS["max_query_len"], skim=head)  # fmt: skip
    out = tmp_path / "metrics" / "bench_adaptive.json"
    argv = ["--bundle", str(bundle), "--out", str(out), "--limit", "6", "--warmup", "1",
            "--predictions-dir", str(tmp_path / "pred"), "--figures-dir", str(tmp_path / "fig")]  # fmt: skip
    assert adaptive.main(argv) == 0
    result = json.loads(out.read_text())
    assert len(result["commit"]) == 40 and result["command"].startswith(
        "python -m elma_utils.bench.adaptive --bundle"
    )
    assert result["precision"] == "int8" and result["batch_size"] == 1 and result["interleaved"]
    keys = {"speedup", "f1", "full_f1", "f1_loss", "avg_layers", "kept_token_share", "questions"}
    for name in ("dev-v1.1", "dev-v2.0"):
        dev = result["dev_sets"][name]
        assert keys <= set(dev) and dev["questions"] == 6
        for config in ("full", "depth_only", "width_only"):
            assert keys <= set(dev[config])
        assert dev["full"]["speedup"] == 1.0 and dev["full"]["f1_loss"] == 0.0
        assert dev["width_only"]["avg_layers"] == 3 and dev["width_only"]["kept_token_share"] < 1.0
        assert dev["f1_loss"] == pytest.approx(dev["full_f1"] - dev["f1"])
        for bound in ("depth_only", "depth_width"):
            o = dev["oracle"][bound]
            assert o["speedup"] >= 1.0 and o["f1"] >= dev["full_f1"] - 1e-6
        assert dev["oracle"]["depth_width"]["speedup"] >= dev["oracle"]["depth_only"]["speedup"] - 1e-9
        for bound in ("depth_only", "depth_width"):  # a 1-F1 budget can only widen the zero-loss oracle
            b = dev["oracle"][f"{bound}_within_budget"]
            assert b["reachable"] and b["f1"] >= dev["full_f1"] - 1.0 - 1e-6
            assert b["speedup_upper_bound"] >= b["speedup_achieved"] - 1e-9
            assert b["speedup_upper_bound"] >= dev["oracle"][bound]["speedup"] - 1e-4  # 4 decimals
        assert dev["frontier"]["depth_only"] and dev["frontier"]["both"]
        preds = json.loads((tmp_path / "pred" / f"adaptive-predictions-{name}.json").read_text())
        details = json.loads((tmp_path / "pred" / f"adaptive-details-{name}.json").read_text())
        assert len(preds) == 6 and all(isinstance(v, str) for v in preds.values())
        assert set(details) == set(preds) and {"exit_layer", "kept_share"} <= set(
            next(iter(details.values()))
        )
        assert (tmp_path / "fig" / f"bench_adaptive_{name}.png").stat().st_size > 1000
    table = out.with_suffix(".md").read_text()
    assert "from the paper" in table and "measured here (int8 bundle)" in table and "Block-Skim" in table


def test_train_skim_head_distils_the_models_own_spans(setup):
    from elma_utils.early_exit.skim_model import skim_training_data, train_skim_head

    multi, _, feats = setup
    x, y = skim_training_data(multi, feats, 2, max_windows=None, negatives_per_positive=5.0, progress=False)
    assert x.shape == (len(y), 64) and 0 < y.sum() < len(y)
    assert (~y).sum() <= 5 * y.sum() + 64  # negatives sampled at about 5 per positive
    head, info = train_skim_head(multi, feats, 2, block=4, tau=0.3, steps=200, progress=False)
    assert head.layer == 2 and head.settings()["block"] == 4 and head.tau == 0.3
    assert info["positives"] > 0 and info["positives_above_median_negative"] > 0.6
