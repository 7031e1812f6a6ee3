"""Official SQuAD scoring: hand-worked cases and the known numbers on the real dev files."""

from __future__ import annotations

import pytest

from elma_utils.squad.data import SquadDataset, load_squad
from elma_utils.squad.metrics import (
    compute_exact,
    compute_f1,
    exact_match_score,
    f1_score,
    normalize_answer,
    normalize_answer_v2,
    per_question_scores,
    score_predictions,
    squad_v1_scores,
    squad_v2_scores,
)


def _dataset(*qas: tuple[str, list[str]], impossible: set[str] = frozenset()) -> dict:
    """A one-paragraph SQuAD json; answers as plain texts (offsets do not matter to scoring)."""
    context = "irrelevant for scoring"
    return {
        "version": "v2.0",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [
                            {
                                "id": qid,
                                "question": "?",
                                "answers": [{"text": t, "answer_start": 0} for t in texts],
                                "is_impossible": qid in impossible,
                            }
                            for qid, texts in qas
                        ],
                    }
                ],
            }
        ],
    }


def _real(version: str) -> SquadDataset:
    try:
        return load_squad(version, "dev", download=False)
    except FileNotFoundError as exc:
        pytest.skip(f"SQuAD dev-v{version} not available: {exc}")


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  a  b\tc\n", "b c"),
        ("an apple, the pear and A banana", "apple pear and banana"),
        ("theatre anthem", "theatre anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("Hello,   World...", "hello world"),
        ("the-cat", "thecat"),  # punctuation goes first, so no article is left
        ("rock 'n' roll", "rock n roll"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected
    assert normalize_answer_v2(text) == expected


# ---------------------------------------------------------------- v1.1 per answer


def test_f1_partial_overlap_by_hand() -> None:
    # pred tokens {cat, sat}, gold {cat, sat, down}: P = 2/2, R = 2/3 -> F1 = 2PR/(P+R) = 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert compute_f1("a cat sat down", "the cat sat") == pytest.approx(0.8)
    assert not exact_match_score("the cat sat", "a cat sat down")
    assert exact_match_score("The  Cat, sat.", "cat sat")


def test_f1_counts_repeated_tokens_once_each() -> None:
    # pred "cat cat cat" vs gold "cat dog": common = min(3,1) = 1 -> P 1/3, R 1/2 -> F1 = 0.4
    assert f1_score("cat cat cat", "cat dog") == pytest.approx(0.4)
    assert f1_score("dog", "cat") == 0


def test_max_over_gold_answers() -> None:
    data = _dataset(("q1", ["Broncos", "Denver Broncos team"]))
    # vs "Broncos": P 1/2, R 1 -> 2/3;  vs "Denver Broncos team": P 1, R 2/3 -> 0.8
    scores = squad_v1_scores(data, {"q1": "Denver Broncos"})
    assert scores == {"exact_match": 0.0, "f1": pytest.approx(80.0)}
    assert squad_v1_scores(data, {"q1": "the broncos"})["exact_match"] == 100.0


def test_v1_totals_and_missing_prediction_scores_zero() -> None:
    data = _dataset(("q1", ["cat sat"]), ("q2", ["a cat sat down"]), ("q3", ["x"]))
    scores = squad_v1_scores(data, {"q1": "Cat sat.", "q2": "the cat sat"})
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8) / 3)


def test_v1_rejects_questions_without_gold() -> None:
    data = _dataset(("q1", []), impossible={"q1"})
    with pytest.raises(ValueError, match="q1"):
        squad_v1_scores(data, {"q1": ""})


# ---------------------------------------------------------------- v2.0


def test_v2_empty_answers() -> None:
    assert compute_f1("", "") == 1
    assert compute_exact("", "") == 1
    assert compute_f1("", "Paris") == 0
    assert compute_f1("Paris", "") == 0
    assert compute_exact("Paris", "") == 0


def test_v2_gold_that_normalises_to_empty_means_no_answer() -> None:
    data = _dataset(("q1", ["The", "..."]))
    assert squad_v2_scores(data, {"q1": ""})["exact"] == 100.0
    assert squad_v2_scores(data, {"q1": "the"})["exact"] == 100.0  # normalises to '' too
    assert squad_v2_scores(data, {"q1": "x"})["f1"] == 0.0


V2_DATA = _dataset(("q1", ["cat sat"]), ("q2", ["Paris"]), ("q3", []), ("q4", []), impossible={"q3", "q4"})
# q1 right (1, 1); q2 partial (0, 2/3: P 1/2, R 1); q3 right abstention (1, 1); q4 wrong answer (0, 0)
V2_PREDS = {"q1": "cat sat", "q2": "Paris France", "q3": "", "q4": "something"}


def test_v2_has_ans_no_ans_breakdown() -> None:
    out = squad_v2_scores(V2_DATA, V2_PREDS)
    assert list(out) == [
        "exact",
        "f1",
        "total",
        "HasAns_exact",
        "HasAns_f1",
        "HasAns_total",
        "NoAns_exact",
        "NoAns_f1",
        "NoAns_total",
    ]
    assert out["exact"] == 50.0
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert out["total"] == 4
    assert (out["HasAns_exact"], out["HasAns_f1"], out["HasAns_total"]) == (50.0, pytest.approx(250 / 3), 2)
    assert (out["NoAns_exact"], out["NoAns_f1"], out["NoAns_total"]) == (50.0, 50.0, 2)


def test_v2_best_threshold_by_hand() -> None:
    na_probs = {"q1": 0.1, "q2": 0.6, "q3": 0.3, "q4": 0.8}
    out = squad_v2_scores(V2_DATA, V2_PREDS, na_probs)
    # Start with "abstain everywhere": 2 (the two no-answer questions). Walk by na_prob:
    # q1 (0.1) +1 -> 3 (best, thresh 0.1); q3 (0.3) +0 (pred empty); q2 (0.6) +0 exact / +2/3 f1;
    # q4 (0.8) -1 (a non-empty answer to a no-answer question).
    assert out["best_exact"] == pytest.approx(75.0)
    assert out["best_exact_thresh"] == 0.1
    assert out["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    assert out["best_f1_thresh"] == 0.6
    # the default threshold (1.0) changes nothing
    assert out["exact"] == 50.0


def test_v2_best_threshold_pays_for_wrong_answers_to_no_answer_questions() -> None:
    na_probs = {"q1": 0.1, "q4": 0.2, "q3": 0.3, "q2": 0.6}
    out = squad_v2_scores(V2_DATA, V2_PREDS, na_probs)
    # start 2; q1 +1 -> 3 (best, 0.1); q4 -1 -> 2; q3 +0 -> 2; q2 +0 exact -> 2 / +2/3 f1 -> 2.67 < 3
    assert (out["best_exact"], out["best_exact_thresh"]) == (75.0, 0.1)
    assert (out["best_f1"], out["best_f1_thresh"]) == (75.0, 0.1)


def test_v2_applies_no_answer_threshold() -> None:
    na_probs = {"q1": 0.1, "q2": 0.6, "q3": 0.3, "q4": 0.8}
    out = squad_v2_scores(V2_DATA, V2_PREDS, na_probs, na_prob_thresh=0.5)
    # q2 and q4 (na_prob > 0.5) become abstentions: q2 -> 0, q4 -> 1; q1 1, q3 1
    assert out["exact"] == 75.0
    assert out["f1"] == 75.0
    assert out["NoAns_exact"] == 100.0
    # abstain only when na_prob is strictly above the threshold: q2 (0.6) still answers at 0.6
    at = squad_v2_scores(V2_DATA, V2_PREDS, na_probs, na_prob_thresh=0.6)
    assert (at["exact"], at["f1"]) == (75.0, pytest.approx(100 * (1 + 2 / 3 + 1 + 1) / 4))


def test_v2_missing_prediction_is_left_out_like_the_script() -> None:
    out = squad_v2_scores(V2_DATA, {"q1": "cat sat", "q3": ""})
    assert out["total"] == 2
    assert out["exact"] == 100.0
    with pytest.raises(ValueError, match="no prediction"):
        squad_v2_scores(V2_DATA, {})


def test_v2_na_probs_must_cover_predictions() -> None:
    with pytest.raises(ValueError, match="na_probs"):
        squad_v2_scores(V2_DATA, V2_PREDS, {"q1": 0.5})


# ---------------------------------------------------------------- dispatch and per question


def test_score_predictions_dispatch() -> None:
    assert score_predictions(V2_DATA, V2_PREDS, "2.0") == squad_v2_scores(V2_DATA, V2_PREDS)
    assert score_predictions(V2_DATA, V2_PREDS, "v2.0")["exact"] == 50.0
    v1 = _dataset(("q1", ["cat sat"]))
    assert score_predictions(v1, {"q1": "cat"}, "1.1") == {"exact_match": 0.0, "f1": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match="version"):
        score_predictions(v1, {}, "3.0")
    with pytest.raises(ValueError, match="dataset"):
        score_predictions({"nope": 1}, {}, "1.1")


def test_per_question_scores() -> None:
    v2 = per_question_scores(V2_DATA, {k: v for k, v in V2_PREDS.items() if k != "q4"}, "2.0")
    assert v2["q1"] == (1.0, 1.0)
    assert v2["q2"] == (0.0, pytest.approx(2 / 3))
    assert v2["q3"] == (1.0, 1.0)
    assert v2["q4"] == (0.0, 0.0)  # missing
    v1 = per_question_scores(_dataset(("a", ["the cat sat"])), {"a": "a cat sat down"}, "1.1")
    assert v1 == {"a": (0.0, pytest.approx(0.8))}


# ---------------------------------------------------------------- the real dev files


def test_empty_predictions_on_dev_v2() -> None:
    dev = _real("2.0")
    out = squad_v2_scores(dev.raw, {ex.qas_id: "" for ex in dev.examples})
    assert round(out["exact"], 2) == 50.07
    assert round(out["f1"], 2) == 50.07
    assert out["total"] == 11873
    assert (out["HasAns_exact"], out["NoAns_exact"], out["NoAns_total"]) == (0.0, 100.0, 5945)


def test_gold_predictions_on_dev_v1_score_100() -> None:
    dev = _real("1.1")
    preds = {ex.qas_id: ex.answers[0].text for ex in dev.examples}
    assert squad_v1_scores(dev.raw, preds) == {"exact_match": 100.0, "f1": 100.0}
    assert score_predictions(dev, preds, "1.1") == {"exact_match": 100.0, "f1": 100.0}
    per_q = per_question_scores(dev.raw, preds, "1.1")
    assert len(per_q) == 10570
    assert all(s == (1.0, 1.0) for s in per_q.values())


def test_gold_predictions_on_dev_v2_score_100() -> None:
    dev = _real("2.0")
    preds = {ex.qas_id: ex.answers[0].text if ex.answers else "" for ex in dev.examples}
    out = squad_v2_scores(dev.raw, preds)
    assert (out["exact"], out["f1"]) == (100.0, 100.0)
