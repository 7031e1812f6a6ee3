"""Tokenizers with character offsets: ids and offsets agree with an independent tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from elma_utils.model.tokenizers import QATokenizer, minilm_vocab_path, pre_tokenize
from elma_utils.squad.metrics import normalize_answer

UNICODE_TEXTS = [
    "Café naïve résumé — Zürich, 1990s!",
    "Beyoncé's 2003 album “Dangerously in Love” sold 11 million copies.",
    "東京 is Tokyo; 北京 is Beijing.",
    "Tabs\tand\nnewlines  and\u00a0nbsp, emoji 🎉 and soft\u00adhyphen.",
    "ﬁnal ligature and Ångström and İstanbul",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_vocab_path().parent))


def test_wordpiece_ids_and_offsets_match_huggingface_on_dev(dev_v11, minilm_tokenizer, hf_tokenizer):
    contexts = list(dict.fromkeys(e.context for e in dev_v11.examples))[:150]
    questions = [e.question for e in dev_v11.examples[:300]]
    texts = contexts + questions + UNICODE_TEXTS
    mismatches = []
    for text, (ids, offs) in zip(texts, minilm_tokenizer.encode_with_offsets(texts), strict=True):
        ref = hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if ids.tolist() != ref["input_ids"] or [tuple(o) for o in offs.tolist()] != [
            tuple(o) for o in ref["offset_mapping"]
        ]:
            mismatches.append(text[:60])
    assert mismatches == []


def test_offsets_slice_the_original_text(minilm_tokenizer):
    for text in UNICODE_TEXTS:
        ids, offs = minilm_tokenizer.encode_with_offsets([text])[0]
        assert len(ids) == len(offs) > 0
        assert (offs[:, 0] <= offs[:, 1]).all() and (offs[:, 1] <= len(text)).all()
        assert (np.diff(offs[:, 0]) >= 0).all()  # monotone
        for tid, (s, e) in zip(ids, offs, strict=True):
            piece = minilm_tokenizer.id_to_token(tid).removeprefix("##")
            if piece != "[UNK]" and text[s:e].isascii():
                assert text[s:e].lower() == piece


def test_pre_tokenize_maps_accented_characters_back():
    words = pre_tokenize("Ça va, Zoë?")
    assert [w.text for w in words] == ["ca", "va", ",", "zoe", "?"]
    assert [(w.char_map[0], w.char_map[-1] + 1) for w in words] == [(0, 2), (3, 5), (5, 6), (7, 10), (10, 11)]


def test_sentencepiece_offsets_cover_words(albert_tokenizer):
    text = "Super Bowl 50 was an American football game in Zürich."
    ids, offs = albert_tokenizer.encode_with_offsets([text])[0]
    pieces = [albert_tokenizer.id_to_token(i) for i in ids]
    assert pieces[:3] == ["▁super", "▁bowl", "▁50"]
    spans = [text[s:e] for s, e in offs]
    assert spans[:3] == ["Super", "Bowl", "50"]
    assert normalize_answer("".join(spans)) == normalize_answer(text.replace(" ", ""))
    assert albert_tokenizer.cls_id == 2 and albert_tokenizer.sep_id == 3 and albert_tokenizer.pad_id == 0


def test_assets_round_trip(tmp_path, minilm_tokenizer):
    minilm_tokenizer.save_assets(tmp_path / "tok")
    again = QATokenizer.from_assets(tmp_path / "tok")
    assert again.encode("Hello world").tolist() == minilm_tokenizer.encode("Hello world").tolist()


def test_bad_tokenizer_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary not found"):
        QATokenizer("wordpiece", tmp_path / "missing.txt")
    (tmp_path / "v.txt").write_text("[PAD]\n")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        QATokenizer("bpe", tmp_path / "v.txt")
    with pytest.raises(FileNotFoundError, match="not a saved ELMA tokenizer"):
        QATokenizer.from_assets(tmp_path)


def _all_dev_texts(dataset) -> list[str]:
    return list(dict.fromkeys(e.context for e in dataset.examples)) + [e.question for e in dataset.examples]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_python_backend_equals_keras_hub_on_every_dev_text(kind, dev_v11, minilm_tokenizer, albert_tokenizer):
    """The edge's keras-free tokenizer gives the training tokenizer's ids and offsets."""
    reference = minilm_tokenizer if kind == "wordpiece" else albert_tokenizer
    edge = QATokenizer(kind, reference.vocab_path, backend="python")
    assert (edge.cls_id, edge.sep_id, edge.pad_id, edge.vocab_size) == (
        reference.cls_id,
        reference.sep_id,
        reference.pad_id,
        reference.vocab_size,
    )
    texts = _all_dev_texts(dev_v11) + UNICODE_TEXTS + ["x" * 150, "supercalifragilisticexpialidocious"]
    if kind == "sentencepiece":
        texts = texts[::4]  # keras-hub's SentencePiece is the slow side; a quarter is > 3,000 texts
    mismatches = [
        text[:60]
        for text, (a_ids, a_offs), (b_ids, b_offs) in zip(
            texts, reference.encode_with_offsets(texts), edge.encode_with_offsets(texts), strict=True
        )
        if a_ids.tolist() != b_ids.tolist() or a_offs.tolist() != b_offs.tolist()
    ]
    assert len(texts) > 3000
    assert mismatches == []


def test_python_wordpiece_rules():
    """Longest match first, ## continuations, an uncoverable or over-long word is one [UNK]."""
    from elma_utils.edge.tokenizer import PythonWordPiece

    wp = PythonWordPiece(minilm_vocab_path())
    ids = wp.pieces(["unaffable", "x" * 101, "\u2603\u2603"])
    assert [wp.id_to_token(i) for i in ids[0]] == ["una", "##ffa", "##ble"]
    assert [wp.id_to_token(i) for i in ids[1]] == ["[UNK]"]
    assert len(ids[2]) == 1 and wp.id_to_token(ids[2][0]) == "[UNK]"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="piece backend"):
        QATokenizer("wordpiece", minilm_vocab_path(), backend="rust")
