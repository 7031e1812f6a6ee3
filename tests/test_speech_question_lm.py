"""The question language model and Whisper n-best rescoring, on real data and real audio."""

from __future__ import annotations

import math

import numpy as np
import pytest
from speech_helpers import spoken

from elma_utils.config import data_dir as squad_dir
from elma_utils.speech.nbest import Hypothesis, decode_nbest, rescore
from elma_utils.speech.question_lm import QuestionLM, context_counts, question_lm_for, squad_questions
from elma_utils.speech.recognizers import RecognitionError, get_recognizer, resolve_question_lm
from elma_utils.speech.wer import word_error_rate

CORPUS = ["what type of car is it", "what type of tree is it", "what kind of car is it", "who is it"]


def vocabulary_mass(lm: QuestionLM, context: tuple[str, ...]) -> float:
    return sum(lm._prob(context, w) for w in lm.counts[0][()])


def test_kneser_ney_hand_worked_bigram():
    lm = QuestionLM(order=2, discount=0.5).fit(["a b", "a c", "b c"])
    # continuation counts: a follows {<s>}, b follows {<s>, a}, c follows {a, b}, </s> follows {b, c}
    assert lm.counts[0][()] == {"a": 1, "b": 2, "c": 2, "</s>": 2}
    unigram_c = (2 - 0.5) / 7 + (0.5 * 4 / 7) / 5  # 7 bigram types, 4 words, V + 1 = 5
    assert lm._prob((), "c") == pytest.approx(unigram_c)
    # P(c | a) = (1 − 0.5) / 2 + 0.5 · 2 / 2 · P_kn(c)
    assert lm._prob(("a",), "c") == pytest.approx(0.25 + 0.5 * unigram_c)


@pytest.mark.parametrize("context", [(), ("what", "type"), ("kind", "of"), ("never", "seen")])
def test_probabilities_sum_to_one_with_the_unknown_word_share(context):
    lm = QuestionLM(order=3).fit(CORPUS)
    mass = vocabulary_mass(lm, context)
    unknown = lm._prob(context, "zebra")
    assert mass < 1.0 and mass + unknown * 1 == pytest.approx(1.0, abs=unknown * 1.01)
    assert unknown > 0


def test_the_lm_prefers_how_questions_are_worded():
    lm = QuestionLM(order=3).fit(CORPUS * 3)
    assert lm.logprob("What type of car is it?") > lm.logprob("What type on car is it?") + 2
    assert lm.logprob("what type of car is it") == lm.logprob("What  type of car, is it?")  # normalised
    assert math.isfinite(lm.logprob("completely unseen words here"))


def test_the_paragraph_lifts_its_own_words():
    lm = QuestionLM(order=3).fit(CORPUS)
    paragraph = context_counts("The Huguenots fled France. Huguenots settled in London.")
    assert paragraph["huguenots"] == 2
    plain = lm.logprob("who were the huguenots")
    mixed = lm.logprob("who were the huguenots", paragraph, context_weight=0.1)
    assert mixed > plain + 0.1  # a word the LM never saw, twice in the paragraph
    # words the paragraph lacks pay the (1 − w) share instead
    assert lm.logprob("what type of car", paragraph, 0.1) < lm.logprob("what type of car")
    assert lm.logprob("who were the huguenots", paragraph, 0.0) == plain
    assert lm.logprob("who were the huguenots", None, 0.1) == plain  # no paragraph, nothing mixed
    with pytest.raises(ValueError, match="context_weight"):
        lm.logprob("who", paragraph, 1.0)


def test_squad_lm_on_real_questions_and_its_cache(tmp_path):
    train = squad_dir() / "dev-v1.1.json"  # a small SQuAD file stands in for the training file
    questions = squad_questions(train)
    assert len(questions) == 10570
    lm = question_lm_for(train, cache_dir=tmp_path)
    cached = list(tmp_path.glob("question_lm-o3-*.json.gz"))
    assert len(cached) == 1
    again = question_lm_for(train, cache_dir=tmp_path)  # loaded, not refitted
    probe = ["What type of building is it?", "Who founded the university?", "zzz qqq"]
    assert [again.logprob(q) for q in probe] == pytest.approx([lm.logprob(q) for q in probe])
    seen, shuffled = questions[:500], [" ".join(reversed(q.split())) for q in questions[:500]]
    assert lm.perplexity(seen) < lm.perplexity(shuffled) / 5
    cached[0].write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable question language model"):
        QuestionLM.load(cached[0])


def test_resolving_the_lm_option(tmp_path):
    assert resolve_question_lm(None) == (None, None)
    assert resolve_question_lm("none") == (None, None)
    lm = QuestionLM(2).fit(CORPUS)
    assert resolve_question_lm(lm) == (lm, "given")
    saved = lm.save(tmp_path / "lm.json.gz")
    loaded, source = resolve_question_lm(saved)
    assert source == str(saved) and loaded.logprob("what type of tree") == lm.logprob("what type of tree")
    with pytest.raises(RecognitionError, match="no such question language model"):
        resolve_question_lm(tmp_path / "missing.json.gz")


def test_rescore_picks_by_the_combined_score():
    lm = QuestionLM(order=3).fit(CORPUS * 3)
    hyps = [Hypothesis("what type on car is it", -3.0, 8), Hypothesis("what type of car is it", -3.5, 8)]
    assert rescore(hyps, lm, lm_weight=0.0, length_bonus=0.0) == 0  # Whisper alone: the beam's best
    assert rescore(hyps, lm, lm_weight=0.5, length_bonus=0.0) == 1  # the LM overturns a small margin
    short = [Hypothesis("who is", -1.0, 3), Hypothesis("who is it", -1.5, 4)]
    assert rescore(short, lm, lm_weight=0.0, length_bonus=1.0) == 1  # the length bonus offsets -0.5
    with pytest.raises(ValueError, match="no hypotheses"):
        rescore([], lm)


def test_nbest_beam_best_is_what_faster_whisper_transcribes():
    """The n-best decoder is faster-whisper's own beam: its first entry is transcribe()'s text."""
    plain = get_recognizer("whisper", lm=None)
    prompt = "Paris and London are capitals. Question:"
    for question in ("What is the capital of France?", "Which river flows through the city of London?"):
        y = spoken(question)
        hyps = decode_nbest(plain.model, y, prompt, beam_size=5)
        assert len(hyps) == 5 and len({h.text for h in hyps}) == 5
        assert all(h.logprob < 0 and h.tokens > 0 for h in hyps)
        assert hyps[0].logprob / hyps[0].tokens == max(h.logprob / h.tokens for h in hyps)
        segments, _ = plain.model.transcribe(
            y,
            language="en",
            beam_size=5,
            without_timestamps=True,
            condition_on_previous_text=False,
            initial_prompt=prompt,
        )
        assert hyps[0].text == " ".join(s.text.strip() for s in segments).strip()
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    assert decode_nbest(plain.model, tone, None) == []  # no speech: nothing, as faster-whisper
    with pytest.raises(ValueError, match="one 30 s window"):
        decode_nbest(plain.model, np.zeros(16000 * 31, dtype=np.float32), None)


def test_recognizer_with_and_without_the_lm():
    lm = QuestionLM(order=3).fit(CORPUS + ["what is the capital of france"] * 3)
    with_lm = get_recognizer("whisper", lm=lm)
    without = get_recognizer("whisper", lm=None)
    y = spoken("What is the capital of France?")
    a, b = with_lm.transcribe(y), without.transcribe(y)
    assert a.details["rescored"] is True and a.details["lm"] == "given"
    assert b.details["rescored"] is False and b.details["lm"] is None
    assert word_error_rate("What is the capital of France?", a.text) <= 0.2
    assert a.details["beam_best"] == b.text  # the same beam; only the choice may differ
    with pytest.raises(RecognitionError, match="English"):
        get_recognizer("whisper", lm=lm, language="de")
