"""Windows, labels and offsets of QA features; span recovery on real SQuAD."""

from __future__ import annotations

import random

import numpy as np

from elma_utils.squad.data import Answer, SquadExample
from elma_utils.squad.features import QAFeatures, build_features, cached_features, span_recovery_rate


def _example(context: str, question: str, answer: str | None, qid: str = "q") -> SquadExample:
    answers = () if answer is None else (Answer(answer, context.index(answer)),)
    return SquadExample(qid, question, context, answers, answer is None, "t", "t#0")


def test_span_recovery_on_a_train_sample_wordpiece(train_v11, minilm_tokenizer):
    sample = random.Random(0).sample(train_v11.examples, 3000)
    feats = build_features(sample, minilm_tokenizer, progress=False)
    rate = span_recovery_rate(sample, feats)
    assert rate["answerable"] == 3000
    assert rate["rate"] >= 0.99, rate


def test_span_recovery_on_a_train_sample_sentencepiece(train_v11, albert_tokenizer):
    sample = random.Random(1).sample(train_v11.examples, 1000)
    feats = build_features(sample, albert_tokenizer, progress=False)
    assert span_recovery_rate(sample, feats)["rate"] >= 0.99


def test_long_context_is_cut_into_overlapping_windows(minilm_tokenizer):
    context = " ".join(f"word{i}" for i in range(300)) + " The answer is Denver Broncos here."
    ex = _example(context, "Who won?", "Denver Broncos")
    feats = build_features(
        [ex], minilm_tokenizer, max_seq_len=128, doc_stride=64, max_query_len=16, progress=False
    )
    assert len(feats) > 3
    assert (feats.example_index == 0).all()
    labelled = np.nonzero(feats.start_positions)[0]
    assert len(labelled) >= 1
    for f in range(len(feats)):
        row = feats.token_ids[f, : feats.lengths[f]]
        assert row[0] == minilm_tokenizer.cls_id and row[-1] == minilm_tokenizer.sep_id
        assert row[feats.context_start[f] - 1] == minilm_tokenizer.sep_id
        assert (feats.offsets[f, : feats.context_start[f]] == -1).all()
    for f in labelled:
        s, e = feats.start_positions[f], feats.end_positions[f]
        assert context[feats.offsets[f, s, 0] : feats.offsets[f, e, 1]] == "Denver Broncos"
    # windows without the whole answer point at [CLS]
    unlabelled = np.setdiff1d(np.arange(len(feats)), labelled)
    assert (feats.start_positions[unlabelled] == 0).all() and (feats.end_positions[unlabelled] == 0).all()


def test_unanswerable_and_truncated_question(minilm_tokenizer):
    ex = _example("Paris is in France.", "Where is Berlin? " * 20, None)
    feats = build_features(
        [ex], minilm_tokenizer, max_seq_len=64, doc_stride=32, max_query_len=10, progress=False
    )
    assert len(feats) == 1
    assert feats.context_start[0] == 12  # [CLS] + 10 question tokens + [SEP]
    assert feats.start_positions[0] == 0 and feats.end_positions[0] == 0
    seg = feats.segment_ids()[0]
    assert seg[: feats.context_start[0]].sum() == 0 and seg[feats.context_start[0] : feats.lengths[0]].all()


def test_unicode_context_offsets(minilm_tokenizer):
    context = "Le café de Zoë à Zürich ouvre en 1990. 東京 est loin."
    ex = _example(context, "Où est le café?", "Zürich")
    feats = build_features([ex], minilm_tokenizer, progress=False)
    s, e = feats.start_positions[0], feats.end_positions[0]
    assert context[feats.offsets[0, s, 0] : feats.offsets[0, e, 1]] == "Zürich"


def test_features_save_load_and_cache(tmp_path, dev_v11, minilm_tokenizer):
    sample = dev_v11.examples[:40]
    params = dict(max_seq_len=128, doc_stride=64, max_query_len=32)
    first = cached_features(sample, minilm_tokenizer, tmp_path, **params)
    files = list(tmp_path.glob("features-*.npz"))
    assert len(files) == 1
    again = QAFeatures.load(files[0])
    for name in ("token_ids", "offsets", "start_positions", "example_index"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    other = cached_features(sample, minilm_tokenizer, tmp_path, **{**params, "doc_stride": 32})
    assert len(list(tmp_path.glob("features-*.npz"))) == 2 and len(other) >= len(first)
