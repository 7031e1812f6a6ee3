"""The layer-by-layer runtime: same answers as the full model, and really stops early."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from elma_utils.early_exit.policies import EntropyPolicy, NeverExit
from elma_utils.early_exit.runtime import EarlyExitRunner
from elma_utils.model.backbones import TINY_BERT, build_bert_backbone
from elma_utils.model.evaluation import predict_logits
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.squad.features import build_features
from elma_utils.squad.postprocess import predict_answers


@pytest.fixture(scope="module")
def setup(dev_v11, minilm_tokenizer):
    keras.utils.set_random_seed(0)
    span = SpanQAModel(build_bert_backbone(dropout=0.0, **{**TINY_BERT, "num_layers": 3}))
    span.build_for()
    multi = MultiExitQAModel.from_span_model(span)
    examples = dev_v11.examples[:12]
    feats = build_features(
        examples, minilm_tokenizer, max_seq_len=128, doc_stride=64, max_query_len=24, progress=False
    )
    return span, multi, examples, feats


def test_never_exit_gives_the_full_models_answers(setup):
    span, multi, examples, feats = setup
    answers = EarlyExitRunner(multi, NeverExit()).run(examples, feats)
    start, end = predict_logits(span, feats, progress=False)
    reference = predict_answers(examples, feats, start, end)
    assert [a.text for a in answers] == [p.text for p in reference]
    assert all(a.exit_layer == 3 and not a.solved and len(a.entropies) == 3 for a in answers)


def test_confident_questions_stop_and_later_layers_are_not_computed(setup):
    _, multi, examples, feats = setup
    runner = EarlyExitRunner(multi, EntropyPolicy(threshold=1.0))  # normalised entropy is always ≤ 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("layer 2 ran although every question exited at layer 1")

    runner._layers[1] = must_not_run
    answers = runner.run(examples, feats)
    assert all(a.exit_layer == 1 and a.solved for a in answers)
    for a, ex in zip(answers, examples, strict=True):
        assert ex.context[a.char_start : a.char_end] == a.text


def test_batched_exit_matches_batch_of_one(setup):
    _, multi, examples, feats = setup
    entropies = EarlyExitRunner(multi, NeverExit()).run(examples, feats)
    # a threshold between the layer-1 entropies splits the batch: some leave, some go on
    h1 = sorted(a.entropies[0] for a in entropies)
    thr = (h1[len(h1) // 2 - 1] + h1[len(h1) // 2]) / 2
    runner = EarlyExitRunner(multi, EntropyPolicy(threshold=thr))
    batched = runner.run(examples, feats)
    assert {a.exit_layer for a in batched} >= {1} and any(a.exit_layer > 1 for a in batched)
    for i, ex in enumerate(examples):
        rows = np.nonzero(feats.example_index == i)[0]
        one = feats.subset(rows)
        one.example_index[:] = 0
        [single] = runner.run([ex], one)
        assert (single.text, single.exit_layer, single.solved) == (
            batched[i].text,
            batched[i].exit_layer,
            batched[i].solved,
        )
