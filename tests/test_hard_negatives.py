"""Hard made-up unanswerable questions: the answer sentence is cut from the paragraph."""

from __future__ import annotations

import pytest

from elma_utils.squad.data import Answer, SquadExample
from elma_utils.squad.hard_negatives import make_hard_unanswerable, sentence_spans, without_answer_sentences

CONTEXT = (
    "The Normans were a people who in the 10th and 11th centuries gave their name to Normandy. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway. "
    'Their leader, Rollo, agreed to swear fealty to King Charles III of West Francia. "It was '
    'a lasting peace." The distinct cultural identity of the Normans emerged in the first half '
    "of the 10th century."
)


def _example(answer: str, qid: str = "q1") -> SquadExample:
    start = CONTEXT.index(answer)
    return SquadExample(qid, "Who?", CONTEXT, (Answer(answer, start),), False, "Normans", "Normans#0")


def test_sentence_spans_split_after_end_marks_and_quotes():
    spans = sentence_spans(CONTEXT)
    texts = [CONTEXT[s:e] for s, e in spans]
    assert len(texts) == 5
    assert texts[0].endswith("Normandy.") and texts[1].startswith("They were")
    assert texts[3] == '"It was a lasting peace."'
    assert sentence_spans("No end mark here") == [(0, 16)]


def test_the_answer_sentence_goes_and_the_rest_stays():
    rest = without_answer_sentences(_example("Rollo"))
    assert "Rollo" not in rest and "King Charles" not in rest
    assert rest.startswith("The Normans were") and rest.endswith("of the 10th century.")
    assert "Denmark" in rest  # the other sentences survive, in order


def test_refused_when_the_answer_text_appears_elsewhere_or_too_little_is_left():
    assert without_answer_sentences(_example("Normans")) is None  # also in other sentences
    short = SquadExample("q", "Who?", "Rollo led them. Then peace.", (Answer("Rollo", 0),), False, "t", "t#0")
    assert without_answer_sentences(short) is None


def test_make_hard_unanswerable_counts_ids_and_flags(dev_v11):
    examples = dev_v11.examples[:400]
    made = make_hard_unanswerable(examples, ratio=0.5, seed=3)
    assert 150 <= len(made) <= 200
    assert all(m.is_impossible and m.synthetic and not m.answers for m in made)
    by_id = {e.qas_id: e for e in examples}
    for m in made:
        original = by_id[m.qas_id.removesuffix("_cut")]
        assert m.question == original.question and m.title == original.title
        assert len(m.context) < len(original.context)
        assert not any(a.text.lower() in m.context.lower() for a in original.answers)
        assert m.context_id.startswith(original.context_id + "-cut")
    assert len({m.context_id for m in made}) == len(made)
    assert made == make_hard_unanswerable(examples, ratio=0.5, seed=3)  # deterministic
    with pytest.raises(ValueError):
        make_hard_unanswerable(examples, ratio=-1)
