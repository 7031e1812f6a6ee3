"""ALBERT through the pipeline's profiles: smoke-albert (tiny random ALBERT, real 30k vocabulary)
and full-albert (ALBERT-base from a preset), the shared-layer bundle, and the offline refusal."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from elma_utils import config
from elma_utils.cli import build_parser, main
from elma_utils.early_exit.policies import NeverExit
from elma_utils.early_exit.runtime import EarlyExitRunner
from elma_utils.edge.runtime import EdgeModel
from elma_utils.export.bundle import verify_bundle, write_bundle
from elma_utils.model import artifacts
from elma_utils.model.backbones import TINY_ALBERT, is_albert
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.squad.features import build_features

SEQ = 64
WINDOWS = dict(max_seq_len=SEQ, doc_stride=32, max_query_len=24)


def test_smoke_albert_builds_a_random_albert_with_the_30k_sentencepiece_vocabulary():
    profile = config.get_profile("smoke-albert")
    smoke = config.get_profile("smoke")
    assert profile.backbone == "tiny-albert" and profile.backbone_source is None
    assert profile.is_smoke and profile.random_weights and "random" in profile.model_description
    # smoke's sizes: only the name and the backbone differ
    assert {k: v for k, v in profile.to_dict().items() if k not in ("name", "backbone")} == {
        k: v for k, v in smoke.to_dict().items() if k not in ("name", "backbone")
    }
    backbone, kwargs = artifacts.build_backbone(profile.backbone, source=profile.backbone_source)
    assert is_albert(backbone) and kwargs == TINY_ALBERT
    assert backbone.num_groups == 1 and backbone.num_layers == 2
    tokenizer = artifacts.tokenizer_for(profile.backbone)
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_path == config.albert_spm_path()
    assert backbone.vocabulary_size == tokenizer.vocab_size == 30000
    assert artifacts.backbone_family("tiny-albert") == "albert" == artifacts.backbone_family("albert")
    assert artifacts.backbone_family("tiny-bert") == "bert"


def test_full_albert_is_albert_base_from_the_preset_and_takes_another_source(monkeypatch):
    monkeypatch.delenv("ELMA_BACKBONE_SOURCE", raising=False)
    profile = config.get_profile("full-albert")
    assert (profile.backbone, profile.backbone_source) == ("albert", "albert_base_en_uncased")
    assert profile.train_examples is None and profile.eval_examples is None and not profile.is_smoke
    monkeypatch.setenv("ELMA_BACKBONE_SOURCE", "/models/albert_base_v2")
    assert config.get_profile("full-albert").backbone_source == "/models/albert_base_v2"
    assert config.get_profile("smoke-albert").backbone_source is None  # random: no weights to take


def test_profile_listings_name_both_albert_profiles(capsys):
    for command in ("train", "pipeline"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "smoke-albert" in out and "full-albert" in out
    with pytest.raises(ValueError, match="smoke-albert.*full-albert|full-albert.*smoke-albert"):
        config.get_profile("albert-smoke")


@pytest.fixture(scope="module")
def tiny_albert(dev_v11, albert_tokenizer, tmp_path_factory):
    keras.utils.set_random_seed(3)
    backbone, _ = artifacts.build_backbone("tiny-albert", dropout=0.0)
    span = SpanQAModel(backbone)
    span.build_for()
    multi = MultiExitQAModel.from_span_model(span)
    examples = dev_v11.examples[:6]
    feats = build_features(examples, albert_tokenizer, progress=False, **WINDOWS)
    bundle = write_bundle(
        multi,
        albert_tokenizer,
        tmp_path_factory.mktemp("albert") / "float32",
        seq_len=SEQ,
        precision="float32",
        thresholds={"policy": "never"},
        model_version="tiny-albert-test",
        doc_stride=WINDOWS["doc_stride"],
        max_query_len=WINDOWS["max_query_len"],
    )
    return multi, examples, feats, bundle


def test_tiny_albert_bundle_has_one_shared_part_called_once_per_layer(tiny_albert):
    multi, _, feats, bundle = tiny_albert
    k = multi.num_exits
    manifest = verify_bundle(bundle)
    models = sorted(f for f in manifest["files"] if f.endswith(".tflite"))
    assert models == sorted(
        ["embeddings.tflite", "group_1.tflite"] + [f"exit_{i}.tflite" for i in range(1, k + 1)]
    )
    assert [s["layer"] for s in manifest["layers"]] == ["group_1.tflite"] * k
    assert manifest["backbone"] == "AlbertBackbone"
    edge = EdgeModel.load(bundle)
    edge.reset_counts()
    edge.answer_features(tiny_albert[1], feats, policy=NeverExit())
    assert edge.parts["group_1.tflite"].calls == k * len(feats)
    assert all(edge.parts[f"exit_{i}.tflite"].calls == len(feats) for i in range(1, k + 1))


def test_tiny_albert_edge_answers_equal_the_keras_runner(tiny_albert):
    multi, examples, feats, bundle = tiny_albert
    edge = EdgeModel.load(bundle)
    ref = EarlyExitRunner(multi, NeverExit()).run(examples, feats, length=SEQ)
    got = edge.answer_features(examples, feats, policy=NeverExit())
    assert [(a.text, a.char_start, a.char_end) for a in got] == [
        (a.text, a.char_start, a.char_end) for a in ref
    ]
    for g, r in zip(got, ref, strict=True):
        assert len(g.entropies) == multi.num_exits
        np.testing.assert_allclose(g.entropies, r.entropies, atol=1e-5)
    # from raw text, with the bundle's SentencePiece model and no Keras tokenizer
    ex = examples[0]
    text = edge.answer(ex.question, ex.context, policy=NeverExit())
    assert (text.text, text.char_start) == (got[0].text, got[0].char_start)


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """No cached preset and no way out: every download is refused at once."""
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy", "ELMA_BACKBONE_SOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ELMA_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("ELMA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_full_albert_refuses_in_one_line_when_the_preset_cannot_be_downloaded(offline, command, capsys):
    assert main([command, "--profile", "full-albert"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(
        f"elma {command}: error: cannot download the keras-hub preset 'albert_base_en_uncased'"
    )
    assert "--backbone-source" in err and "Google ALBERT checkpoint" in err
    assert not (offline / "artifacts").exists() or not any((offline / "artifacts").iterdir())


def test_albert_cost_counts_the_shared_part_once_per_layer():
    from elma_utils.bench.albert_cost import summarise

    schedule = [{"layer": "group_1.tflite", "head": f"exit_{i}.tflite"} for i in (1, 2, 3)]
    median = {"embeddings.tflite": 1.0, "group_1.tflite": 10.0, "exit_1.tflite": 0.5, "exit_2.tflite": 0.5}
    median["exit_3.tflite"] = 1.5
    parts = {k: {"median": v, "min": v / 2} for k, v in median.items()}
    sizes = {"embeddings.tflite": 100, "group_1.tflite": 1000, "tokenizer/x.model": 50}
    sizes.update({f"exit_{i}.tflite": 10 for i in (1, 2, 3)})
    got = summarise({"128": parts}, schedule, sizes)
    row = got["per_seq_len"]["128"]
    assert row["layer_ms"] == [10.5, 10.5, 11.5] and row["layer_ms_median"] == 10.5
    assert row["all_layers_ms"] == 1.0 + 10.5 + 10.5 + 11.5
    assert row["best_layer_ms"] == [5.25, 5.25, 5.75] and row["best_all_layers_ms"] == 0.5 + 16.25
    assert (got["model_bytes"], got["bundle_bytes"]) == (1130, 1180)


def test_full_albert_takes_its_weights_from_backbone_source_offline(offline, monkeypatch):
    from albert_fixtures import TINY_CONFIG, make_google_arrays, write_google_checkpoint

    from elma_utils.cli import _check_backbone_source

    ckpt = write_google_checkpoint(offline / "albert_tiny", make_google_arrays(TINY_CONFIG), TINY_CONFIG)
    monkeypatch.setenv("ELMA_BACKBONE_SOURCE", str(ckpt))  # what `elma pipeline --backbone-source` sets
    profile = config.get_profile("full-albert")
    assert profile.backbone_source == str(ckpt)
    _check_backbone_source("full-albert")  # no download: the checkpoint is read
    backbone, kwargs = artifacts.build_backbone(profile.backbone, source=profile.backbone_source)
    assert is_albert(backbone) and kwargs["num_layers"] == TINY_CONFIG["num_hidden_layers"]


def test_adaptive_width_on_albert_edge_answers_equal_the_keras_skim_path(dev_v11, albert_tokenizer, tmp_path):
    """A skim head after layer 1 of a 3-layer tiny ALBERT: the shared part then runs on the kept
    positions only, on the edge as in Keras."""
    from elma_utils.early_exit.skim import SkimHead

    keras.utils.set_random_seed(5)
    backbone, _ = artifacts.build_backbone("tiny-albert", {**TINY_ALBERT, "num_layers": 3}, dropout=0.0)
    span = SpanQAModel(backbone)
    span.build_for()
    multi = MultiExitQAModel.from_span_model(span)
    examples = dev_v11.examples[:8]
    feats = build_features(examples, albert_tokenizer, progress=False, **{**WINDOWS, "max_seq_len": 96})
    h = np.asarray(multi.encoder.hidden_states(feats.model_inputs(np.arange(len(feats))), upto=1)[-1])
    w = np.random.default_rng(1).normal(size=h.shape[-1]).astype(np.float32)
    z = h @ w
    probe = SkimHead(w / z.std(), -float(np.mean(z) / z.std()), layer=1, block=8)
    scores = []  # block scores; tau in the widest gap, so float32 noise cannot move a block
    for r in range(len(feats)):
        p = probe.token_probs(h[r])
        ctx = np.nonzero(feats.offsets[r, :, 0] >= 0)[0]
        scores += [p[ctx[i : i + 8]].max() for i in range(0, len(ctx), 8)]
    s = np.sort(scores)
    mid = s[len(s) // 4 : 3 * len(s) // 4 + 1]
    gap = int(np.argmax(np.diff(mid)))
    head = probe.with_settings(tau=float((mid[gap] + mid[gap + 1]) / 2))
    bundle = write_bundle(
        multi,
        albert_tokenizer,
        tmp_path / "skim",
        seq_len=96,
        precision="float32",
        thresholds={"policy": "never"},
        model_version="tiny-albert-skim",
        doc_stride=WINDOWS["doc_stride"],
        max_query_len=WINDOWS["max_query_len"],
        skim=head,
    )
    edge = EdgeModel.load(bundle)
    ref = EarlyExitRunner(multi, NeverExit(), skim=head).run(examples, feats)
    got = edge.answer_features(examples, feats, policy=NeverExit())
    assert [(a.text, a.char_start) for a in got] == [(a.text, a.char_start) for a in ref]
    assert [a.kept_share for a in got] == pytest.approx([a.kept_share for a in ref])
    assert min(a.kept_share for a in got) < 1.0  # some passages were skimmed
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g.entropies, r.entropies, atol=1e-5)
