"""LiteRT export, the edge bundle and the Keras-free edge runtime (tiny random models)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from elma_utils.early_exit.policies import EntropyPolicy, NeverExit
from elma_utils.early_exit.runtime import EarlyExitRunner
from elma_utils.edge.runtime import EdgeModel
from elma_utils.export.bundle import BundleError, verify_bundle, write_bundle
from elma_utils.model.backbones import TINY_BERT, build_bert_backbone
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.squad.features import build_features

SEQ = 64
WINDOWS = dict(max_seq_len=SEQ, doc_stride=32, max_query_len=24)


@pytest.fixture(scope="module")
def setup(dev_v11, minilm_tokenizer):
    keras.utils.set_random_seed(0)
    span = SpanQAModel(build_bert_backbone(dropout=0.0, **{**TINY_BERT, "num_layers": 2}))
    span.build_for()
    multi = MultiExitQAModel.from_span_model(span)
    examples = dev_v11.examples[:8]
    feats = build_features(examples, minilm_tokenizer, progress=False, **WINDOWS)
    return multi, examples, feats


@pytest.fixture(scope="module")
def bundles(setup, minilm_tokenizer, tmp_path_factory):
    multi, _, _ = setup
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for precision in ("float32", "float16", "int8"):
        out[precision] = write_bundle(
            multi,
            minilm_tokenizer,
            root / precision,
            seq_len=SEQ,
            precision=precision,
            thresholds={"policy": "entropy", "E_T": 0.5, "rule": "max"},
            model_version="tiny-test-1",
            doc_stride=WINDOWS["doc_stride"],
            max_query_len=WINDOWS["max_query_len"],
        )
    return out


@pytest.fixture(scope="module")
def edge32(bundles):
    return EdgeModel.load(bundles["float32"])


def _edge_logits(edge: EdgeModel, inputs: dict, row: int) -> list[tuple[np.ndarray, np.ndarray]]:
    one = {k: v[row : row + 1] for k, v in inputs.items()}
    x = edge.embeddings(token_ids=one["token_ids"], segment_ids=one["segment_ids"])["hidden"]
    out = []
    for layer, _ in edge.steps:
        r = layer(hidden=x, padding_mask=one["padding_mask"], segment_ids=one["segment_ids"])
        x = r["hidden"]
        out.append((r["start_logits"][0], r["end_logits"][0]))
    return out


def test_bundle_layout_and_manifest(bundles):
    manifest = verify_bundle(bundles["float32"])
    assert manifest["format"] == "elma-edge-bundle" and manifest["format_version"] == 1
    assert (manifest["seq_len"], manifest["num_layers"], manifest["hidden"]) == (SEQ, 2, 64)
    assert manifest["model_version"] == "tiny-test-1" and manifest["precision"] == "float32"
    names = set(manifest["files"])
    assert {"embeddings.tflite", "layer_1.tflite", "layer_2.tflite", "thresholds.json"} <= names
    assert "tokenizer/tokenizer.json" in names
    assert not list(bundles["float32"].parent.glob(".float32.tmp-*"))  # temp dir renamed away


def test_float32_parts_give_the_keras_logits(setup, edge32):
    multi, _, feats = setup
    inputs = feats.model_inputs(np.arange(len(feats)), SEQ)
    ref = multi(inputs)
    ref_s, ref_e = np.asarray(ref["start_logits"]), np.asarray(ref["end_logits"])
    space = ref_s[:, 0] > -1e3  # answer space (masked logits sit near -1e4 and round coarsely there)
    worst = 0.0
    for row in range(0, len(feats), max(1, len(feats) // 6)):
        for k, (s, e) in enumerate(_edge_logits(edge32, inputs, row)):
            m = space[row]
            worst = max(worst, np.abs(s[m] - ref_s[row, k, m]).max(), np.abs(e[m] - ref_e[row, k, m]).max())
            assert np.all(s[~m] < -1e3) and np.all(e[~m] < -1e3)
    assert worst < 1e-4, worst


def test_float32_answers_match_the_keras_runner(setup, edge32):
    multi, examples, feats = setup
    keras_never = EarlyExitRunner(multi, NeverExit()).run(examples, feats, length=SEQ)
    h1 = sorted(a.entropies[0] for a in keras_never)
    thr = (h1[len(h1) // 2 - 1] + h1[len(h1) // 2]) / 2  # splits the questions at layer 1
    for policy in (NeverExit(), EntropyPolicy(threshold=thr)):
        ref = EarlyExitRunner(multi, policy).run(examples, feats, length=SEQ)
        got = edge32.answer_features(examples, feats, policy=policy)
        assert [a.text for a in got] == [a.text for a in ref]
        assert [(a.char_start, a.char_end) for a in got] == [(a.char_start, a.char_end) for a in ref]
        assert [(a.exit_layer, a.solved) for a in got] == [(a.exit_layer, a.solved) for a in ref]
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g.entropies, r.entropies, atol=1e-5)
            assert len(g.layer_ms) == g.exit_layer and g.embeddings_ms > 0
    exits = [a.exit_layer for a in edge32.answer_features(examples, feats, policy=EntropyPolicy(thr))]
    assert 1 in exits and 2 in exits


def test_answer_from_text_uses_the_bundled_tokenizer(setup, edge32):
    _, examples, feats = setup
    ex = examples[0]
    from_features = edge32.answer_features(
        examples[:1], feats.subset(np.nonzero(feats.example_index == 0)[0])
    )
    got = edge32.answer(ex.question, ex.context)  # policy from thresholds.json
    assert (got.text, got.exit_layer, got.solved) == (
        from_features[0].text,
        from_features[0].exit_layer,
        from_features[0].solved,
    )
    assert got.text == ex.context[got.char_start : got.char_end]
    assert got.tokenise_ms > 0 and got.windows >= 1
    with pytest.raises(ValueError, match="question"):
        edge32.answer("  ", ex.context)


def test_confident_questions_never_invoke_later_layers(setup, edge32):
    _, examples, feats = setup
    edge32.reset_counts()
    answers = edge32.answer_features(examples, feats, policy=EntropyPolicy(threshold=1.0))
    assert all(a.exit_layer == 1 and a.solved and len(a.layer_ms) == 1 for a in answers)
    assert edge32.parts["layer_1.tflite"].calls == len(feats)
    assert edge32.parts["embeddings.tflite"].calls == len(feats)
    assert edge32.parts["layer_2.tflite"].calls == 0


def test_reduced_precisions_agree_and_shrink(setup, bundles, edge32):
    _, examples, feats = setup
    ref = edge32.answer_features(examples, feats, policy=NeverExit())
    sizes = {p: sum(f.stat().st_size for f in b.glob("*.tflite")) for p, b in bundles.items()}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    inputs = feats.model_inputs(np.arange(2), SEQ)
    for precision, tol in (("float16", 0.05), ("int8", 0.5)):
        edge = EdgeModel.load(bundles[precision])
        got = edge.answer_features(examples, feats, policy=NeverExit())
        agree = np.mean([g.text == r.text for g, r in zip(got, ref, strict=True)])
        print(f"{precision}: {sizes[precision]} bytes, answers agree with float32 on {agree:.0%}")
        assert agree >= 0.5
        for (s, e), (s32, e32) in zip(
            _edge_logits(edge, inputs, 1), _edge_logits(edge32, inputs, 1), strict=True
        ):
            m = s32 > -1e3
            assert np.abs(s[m] - s32[m]).max() < tol and np.abs(e[m] - e32[m]).max() < tol


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    return shutil.copytree(bundles["float32"], tmp_path / "copy")


def _rewrite_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda b: (b / "layer_2.tflite").unlink(), r"missing file layer_2\.tflite"),
        (lambda b: (b / "manifest.json").unlink(), r"missing manifest\.json"),
        (
            lambda b: (b / "layer_1.tflite").write_bytes((b / "layer_1.tflite").read_bytes()[:-100]),
            r"layer_1\.tflite: .*truncated",
        ),
        (lambda b: _flip_byte(b / "embeddings.tflite"), r"embeddings\.tflite: sha256 does not match"),
        (lambda b: _flip_byte(b / "thresholds.json", at=2), r"thresholds\.json: sha256"),
        (lambda b: _rewrite_manifest(b, format_version=2), r"manifest\.json: unsupported format_version 2"),
        (lambda b: _rewrite_manifest(b, format="other"), r"manifest\.json: unknown format 'other'"),
        (lambda b: (b / "manifest.json").write_text("{not json"), r"manifest\.json .*not valid JSON"),
        (lambda b: shutil.copy(b / "layer_1.tflite", b / "layer_3.tflite"), r"unexpected .*layer_3\.tflite"),
        (
            lambda b: _rewrite_manifest(b, files={"../x.tflite": {"sha256": "0", "bytes": 1}}),
            r"not a plain relative path",
        ),
    ],
    ids=[
        "deleted",
        "no-manifest",
        "truncated",
        "flipped",
        "thresholds",
        "version",
        "format",
        "json",
        "extra",
        "path",
    ],
)
def test_tampered_bundles_are_refused(bundle_copy, tamper, message):
    tamper(bundle_copy)
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle_copy)
    with pytest.raises(BundleError, match=message):
        EdgeModel.load(bundle_copy)


def _flip_byte(path, at: int | None = None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_write_bundle_refuses_to_clobber_and_bad_thresholds(setup, minilm_tokenizer, bundles, tmp_path):
    multi, _, _ = setup
    kwargs = dict(seq_len=SEQ, precision="float32", model_version="v", max_query_len=24)
    with pytest.raises(FileExistsError):
        write_bundle(multi, minilm_tokenizer, bundles["float32"], thresholds={}, **kwargs)
    with pytest.raises(BundleError, match="E_T"):
        write_bundle(multi, minilm_tokenizer, tmp_path / "b", thresholds={"policy": "entropy"}, **kwargs)
    with pytest.raises(BundleError, match="unknown policy"):
        write_bundle(multi, minilm_tokenizer, tmp_path / "b", thresholds={"policy": "magic"}, **kwargs)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_edge_answers_text_without_importing_keras_or_tensorflow(setup, bundles):
    """Load a bundle and answer a question from raw text in a fresh interpreter: the edge path
    (bundle check, tokenizer, LiteRT parts, policy) must pull in no Keras/TensorFlow."""
    _, examples, _ = setup
    ex = examples[0]
    code = (
        "import sys, json\n"
        "from elma_utils.edge.runtime import EdgeModel\n"
        "edge = EdgeModel.load(sys.argv[1])\n"
        "a = edge.answer(sys.argv[2], sys.argv[3])\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'keras_hub', 'tensorflow_text') if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'text': a.text, 'layer': a.exit_layer}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bundles["float32"]), ex.question, ex.context],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert got["text"] and got["text"] in ex.context and got["layer"] in (1, 2)


def test_albert_exports_one_shared_part_per_group(tmp_path):
    import keras_hub

    from elma_utils.edge.runtime import LitePart
    from elma_utils.export.litert_parts import export_parts, part_specs

    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.AlbertBackbone(
        vocabulary_size=500,
        num_layers=4,
        num_heads=2,
        hidden_dim=64,
        embedding_dim=32,
        intermediate_dim=128,
        num_groups=2,
        num_inner_repetitions=1,
        max_sequence_length=64,
        dropout=0.0,
    )
    span = SpanQAModel(backbone)
    span.build_for()
    multi = MultiExitQAModel.from_span_model(span)
    files = export_parts(multi, tmp_path, 32)
    assert sorted(files) == sorted(
        ["embeddings.tflite", "group_1.tflite", "group_2.tflite"] + [f"exit_{i}.tflite" for i in range(1, 5)]
    )
    assert files["exit_1.tflite"].stat().st_size < files["group_1.tflite"].stat().st_size / 10
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 500, size=(1, 32)).astype("int32")
    seg = np.zeros_like(ids)
    seg[:, 10:28] = 1
    pad = (np.arange(32) < 28).astype("int32")[None]
    ref = multi({"token_ids": ids, "segment_ids": seg, "padding_mask": pad})
    specs = part_specs(multi)
    part = {n: LitePart(p, specs[n]["inputs"], specs[n]["outputs"]) for n, p in files.items()}
    x = part["embeddings.tflite"](token_ids=ids, segment_ids=seg)["hidden"]
    for i in range(4):
        x = part[f"group_{i // 2 + 1}.tflite"](hidden=x, padding_mask=pad)["hidden"]
        out = part[f"exit_{i + 1}.tflite"](hidden=x, padding_mask=pad, segment_ids=seg)
        m = np.asarray(ref["start_logits"])[0, i] > -1e3
        assert np.abs(out["start_logits"][0][m] - np.asarray(ref["start_logits"])[0, i][m]).max() < 1e-4
        assert np.abs(out["end_logits"][0][m] - np.asarray(ref["end_logits"])[0, i][m]).max() < 1e-4
    assert part["group_1.tflite"].calls == 2 and part["exit_1.tflite"].calls == 1


def test_dynamic_length_runs_unpadded_and_matches_a_fixed_length_bundle(
    setup, bundles, minilm_tokenizer, tmp_path
):
    """Dynamic bundles run each question at its longest window; answers equal the padded ones."""
    multi, examples, feats = setup
    fixed_dir = write_bundle(
        multi,
        minilm_tokenizer,
        tmp_path / "fixed",
        seq_len=SEQ,
        precision="float32",
        thresholds={"policy": "entropy", "E_T": 0.5, "rule": "max"},
        model_version="tiny-test-1",
        doc_stride=WINDOWS["doc_stride"],
        max_query_len=WINDOWS["max_query_len"],
        dynamic_length=False,
    )
    fixed, dynamic = EdgeModel.load(fixed_dir), EdgeModel.load(bundles["float32"])
    assert (fixed.dynamic_length, dynamic.dynamic_length) == (False, True)
    got_fixed = fixed.answer_features(examples, feats, policy=NeverExit())
    got_dynamic = dynamic.answer_features(examples, feats, policy=NeverExit())
    assert [(a.text, a.char_start) for a in got_dynamic] == [(a.text, a.char_start) for a in got_fixed]
    for a, b in zip(got_dynamic, got_fixed, strict=True):
        np.testing.assert_allclose(a.entropies, b.entropies, atol=1e-5)
    shortest = int(feats.lengths.min())
    assert shortest < SEQ  # the dev questions have short windows: the test means something
    assert dynamic.embeddings.resizes > 0 and fixed.embeddings.resizes == 0
    assert fixed.embeddings.input_shapes["token_ids"] == (1, SEQ)
