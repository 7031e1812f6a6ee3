"""The device benchmark with an adaptive (skim) bundle: the full-compute copy, and the
comparison run through real ``elma serve`` / ``elma device`` processes on a tiny bundle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from qa_fixtures import TINY_WINDOWS, tiny_span_model

from elma_utils.early_exit.predictor import EntropyExitPredictor
from elma_utils.early_exit.skim import SkimHead
from elma_utils.export.bundle import full_compute_copy, read_thresholds, verify_bundle, write_bundle


@pytest.fixture(scope="module")
def skim_bundle(minilm_tokenizer, tmp_path_factory):
    from elma_utils.model.multi_exit import MultiExitQAModel

    multi = MultiExitQAModel.from_span_model(tiny_span_model(seed=1, num_layers=3))
    head = SkimHead(
        np.random.default_rng(0).normal(size=64).astype(np.float32), 0.0, layer=1, block=8, tau=0.5
    )
    stats = {"entropy": np.tile(np.linspace(0, 1, 20), (3, 1)), "kept_share": np.full(20, 0.5)}
    table = EntropyExitPredictor.from_layerwise(stats, np.full(20, 4), skim=head, bins=2)
    return write_bundle(multi, minilm_tokenizer, tmp_path_factory.mktemp("dev") / "int8", seq_len=TINY_WINDOWS["max_seq_len"],
                        precision="float32", thresholds={"policy": "entropy", "E_T": 0.5, "predictor": table.to_dict()},
                        model_version="tiny-skim-device", doc_stride=TINY_WINDOWS["doc_stride"],
                        max_query_len=TINY_WINDOWS["max_query_len"], skim=head)  # fmt: skip


def test_full_compute_copy_has_no_skim_and_never_exits(skim_bundle, tmp_path):
    from elma_utils.edge.runtime import EdgeModel

    full = full_compute_copy(skim_bundle, tmp_path / "full")
    manifest = verify_bundle(full)
    assert "skim" not in manifest and "skim.npz" not in manifest["files"] and not (full / "skim.npz").exists()
    assert manifest["model_version"] == "tiny-skim-device-full"
    th = read_thresholds(full)
    assert th["policy"] == "never" and "predictor" not in th and "E_T" not in th
    edge, adaptive = EdgeModel.load(full), EdgeModel.load(skim_bundle)
    a = edge.answer(
        "Where does the Seine rise?", "The Seine rises at Source-Seine, northwest of Dijon, in France."
    )
    assert edge.skim is None and a.exit_layer == 3 and a.kept_share == 1.0 and adaptive.skim.layer == 1
    with pytest.raises(FileExistsError):
        full_compute_copy(skim_bundle, full)


def test_device_benchmark_compares_the_adaptive_bundle_with_full_compute(skim_bundle, tmp_path):
    from elma_utils.bench import device_bench

    model_dir = device_bench._tiny_server_model(tmp_path / "server-model")
    server, port = device_bench._start_server(tmp_path, model_dir)
    try:
        out = device_bench.adaptive_vs_full(tmp_path, port, skim_bundle, device_bench.QUESTIONS[:3])
    finally:
        server.terminate()
        server.wait(60)
    json.dumps(out)
    assert out["questions"] == 3
    for name in ("adaptive", "full"):
        r = out[name]
        assert (
            r["answered"] == 3 and r["edge_ms"]["n"] == 3 and r["end_to_end_ms"]["p50"] >= r["edge_ms"]["p50"]
        )
        assert math.isfinite(r["cpu_ms_per_question"]) and r["cpu_ms_per_question"] >= 0
    assert out["full"]["avg_exit_layer"] == 3 and out["full"]["share_offloaded"] == 1.0  # never exits
    assert out["speedup_edge_p50"] > 0 and out["cpu_ratio"] > 0

    # several passages, each with its own questions, pooled
    passages = [(device_bench.CONTEXT, device_bench.QUESTIONS[:2]),
                ("The Loire is the longest river in France. It rises in the Massif Central.",
                 ["What is the longest river in France?", "Where does the Loire rise?", "Which river is long?"])]  # fmt: skip
    (tmp_path / "again").mkdir()
    server, port = device_bench._start_server(tmp_path / "again", model_dir)
    try:
        pooled = device_bench.adaptive_vs_full(tmp_path / "again", port, skim_bundle, [], passages)
    finally:
        server.terminate()
        server.wait(60)
    assert pooled["questions"] == 5 and pooled["passages"] == 2 and pooled["context_words"][1] == 14
    for name in ("adaptive", "full"):
        assert pooled[name]["answered"] == 5 and pooled[name]["edge_ms"]["n"] == 5


def test_squad_passages_span_the_lengths_and_bring_their_questions(dev_v11):
    from elma_utils.bench.device_bench import squad_passages

    picked = squad_passages(4)
    words = [len(c.split()) for c, _ in picked]
    assert len(picked) == 4 and words == sorted(words) and words[0] < words[-1]
    for context, questions in picked:
        asked = {e.question for e in dev_v11.examples if e.context == context}
        assert len(questions) >= 4 and set(questions) == asked
    with pytest.raises(ValueError):
        squad_passages(0)
