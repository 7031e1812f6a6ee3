"""SQuAD scoring, identical to the official evaluation scripts.

The v1.1 part follows ``evaluate-v1.1.py`` and the v2.0 part ``evaluate-v2.0.py``
(both from rajpurkar.github.io/SQuAD-explorer) function for function, so the
numbers in reports are comparable with published ones. The two scripts have
separate ``normalize_answer`` functions; they do the same thing and are kept
separate here too. Differences, all for bad input only: missing predictions are
logged instead of printed, and where the v2.0 script would crash (a has-answer /
no-answer breakdown or an na_probs file missing questions, no prediction at all)
these functions either score what is there (breakdown) or raise a clear ValueError.
"""

from __future__ import annotations

import collections
import logging
import re
import string
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

_PUNCTUATION = set(string.punctuation)


def _articles(dataset: Any) -> list:
    """The list of articles from a raw json dict, a SquadDataset (its .raw) or the list itself."""
    dataset = getattr(dataset, "raw", dataset)
    if isinstance(dataset, Mapping):
        dataset = dataset.get("data")
    if not isinstance(dataset, list):
        raise ValueError(
            "dataset must be SQuAD json (a dict with a 'data' list), its 'data' list or a SquadDataset"
        )
    return dataset


def _log_missing(missing: list[str], what: str) -> None:
    if missing:
        log.warning("%d question(s) without %s, e.g. %s", len(missing), what, missing[:3])


# ---------------------------------------------------------------- SQuAD v1.1 (evaluate-v1.1.py)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        return "".join(ch for ch in text if ch not in _PUNCTUATION)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: list[str]
) -> float:
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def squad_v1_scores(dataset: Any, predictions: Mapping[str, str]) -> dict:
    """{"exact_match", "f1"} in percent over every question; unanswered ones score 0."""
    f1 = exact_match = total = 0
    missing = []
    for article in _articles(dataset):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    missing.append(qa["id"])  # the script: "Unanswered question ... will receive score 0."
                    continue
                ground_truths = _v1_gold(qa)
                prediction = predictions[qa["id"]]
                exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
                f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    _log_missing(missing, "a prediction (scored 0)")
    if total == 0:
        raise ValueError("the dataset holds no questions")
    exact_match = 100.0 * exact_match / total
    f1 = 100.0 * f1 / total
    return {"exact_match": exact_match, "f1": f1}


# ---------------------------------------------------------------- SQuAD v2.0 (evaluate-v2.0.py)


def make_qid_to_has_ans(dataset: list) -> dict[str, bool]:
    qid_to_has_ans = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
    return qid_to_has_ans


def normalize_answer_v2(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (v2.0 script's copy)."""

    def remove_articles(text: str) -> str:
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = _PUNCTUATION
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def get_tokens(s: str) -> list[str]:
    if not s:
        return []
    return normalize_answer_v2(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer_v2(a_gold) == normalize_answer_v2(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def get_raw_scores(dataset: list, preds: Mapping[str, str]) -> tuple[dict[str, int], dict[str, float]]:
    exact_scores = {}
    f1_scores = {}
    missing = []
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [a["text"] for a in qa["answers"] if normalize_answer_v2(a["text"])]
                if not gold_answers:
                    # For unanswerable questions, only correct answer is empty string
                    gold_answers = [""]
                if qid not in preds:
                    missing.append(qid)  # the script: "Missing prediction for ..."
                    continue
                a_pred = preds[qid]
                # Take max over all gold answers
                exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
                f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    _log_missing(missing, "a prediction (left out of the scores, as the official v2.0 script does)")
    return exact_scores, f1_scores


def apply_no_ans_threshold(
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
    na_prob_thresh: float,
) -> dict[str, float]:
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        if pred_na:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = s
    return new_scores


def make_eval_dict(
    exact_scores: Mapping[str, float], f1_scores: Mapping[str, float], qid_list: list[str] | None = None
) -> collections.OrderedDict:
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict(
            [
                ("exact", 100.0 * sum(exact_scores.values()) / total),
                ("f1", 100.0 * sum(f1_scores.values()) / total),
                ("total", total),
            ]
        )
    else:
        total = len(qid_list)
        return collections.OrderedDict(
            [
                ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
                ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
                ("total", total),
            ]
        )


def merge_eval(main_eval: dict, new_eval: Mapping[str, Any], prefix: str) -> None:
    for k in new_eval:
        main_eval[f"{prefix}_{k}"] = new_eval[k]


def find_best_thresh(
    preds: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> tuple[float, float]:
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:  # noqa: SIM108 - kept as in the official script
            diff = scores[qid]
        else:
            if preds[qid]:  # noqa: SIM108
                diff = -1
            else:
                diff = 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def find_all_best_thresh(
    main_eval: dict,
    preds: Mapping[str, str],
    exact_raw: Mapping[str, float],
    f1_raw: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> None:
    best_exact, exact_thresh = find_best_thresh(preds, exact_raw, na_probs, qid_to_has_ans)
    best_f1, f1_thresh = find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
    main_eval["best_exact"] = best_exact
    main_eval["best_exact_thresh"] = exact_thresh
    main_eval["best_f1"] = best_f1
    main_eval["best_f1_thresh"] = f1_thresh


def squad_v2_scores(
    dataset: Any,
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> collections.OrderedDict:
    """The official v2.0 script's out_eval: exact, f1, total, HasAns_*, NoAns_*, best_* (with na_probs)."""
    articles = _articles(dataset)
    preds = predictions
    given_na_probs = na_probs is not None
    na_probs = dict(na_probs) if given_na_probs else {k: 0.0 for k in preds}
    qid_to_has_ans = make_qid_to_has_ans(articles)  # maps qid to True/False
    exact_raw, f1_raw = get_raw_scores(articles, preds)
    if not exact_raw:
        raise ValueError("no prediction matches a question of the dataset")
    lacking = [qid for qid in exact_raw if qid not in na_probs]
    if lacking:
        raise ValueError(f"na_probs lacks {len(lacking)} predicted question(s), e.g. {lacking[:3]}")
    # Only scored questions enter the breakdown (the script raises KeyError on missing predictions).
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v and k in exact_raw]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v and k in exact_raw]
    exact_thresh = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        has_ans_eval = make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids)
        merge_eval(out_eval, has_ans_eval, "HasAns")
    if no_ans_qids:
        no_ans_eval = make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids)
        merge_eval(out_eval, no_ans_eval, "NoAns")
    if given_na_probs:
        find_all_best_thresh(out_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans)
    return out_eval


# ---------------------------------------------------------------- entry points


def _normalize_version(version: str) -> str:
    text = str(version).strip().lower().removeprefix("v")
    if text not in ("1.1", "2.0"):
        raise ValueError(f"unknown SQuAD version {version!r}; choose '1.1' or '2.0'")
    return text


def score_predictions(
    dataset: Any,
    predictions: Mapping[str, str],
    version: str,
    na_probs: Mapping[str, float] | None = None,
) -> dict:
    """Official scores for `version` ('1.1' or '2.0'); na_probs only matter for 2.0."""
    if _normalize_version(version) == "1.1":
        if na_probs is not None:
            raise ValueError("na_probs are only used by SQuAD 2.0 scoring")
        return squad_v1_scores(dataset, predictions)
    return squad_v2_scores(dataset, predictions, na_probs)


def per_question_scores(
    dataset: Any, predictions: Mapping[str, str], version: str
) -> dict[str, tuple[float, float]]:
    """qid -> (exact, f1) in 0..1 with the official per-question rules; a missing prediction gives (0, 0)."""
    out: dict[str, tuple[float, float]] = {}
    v1 = _normalize_version(version) == "1.1"
    for article in _articles(dataset):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = qa["id"]
                if qid not in predictions:
                    out[qid] = (0.0, 0.0)
                elif v1:
                    out[qid] = _v1_question(qa, predictions[qid])
                else:
                    out[qid] = _v2_question(qa, predictions[qid])
    return out


def _v1_gold(qa: Mapping[str, Any]) -> list[str]:
    """Gold texts; an empty list would crash the script's max(), so say what is wrong instead."""
    golds = [x["text"] for x in qa["answers"]]
    if not golds:
        raise ValueError(f"qid {qa['id']} has no gold answer; SQuAD 2.0 data needs version '2.0' scoring")
    return golds


def _v1_question(qa: Mapping[str, Any], prediction: str) -> tuple[float, float]:
    golds = _v1_gold(qa)
    return (
        float(metric_max_over_ground_truths(exact_match_score, prediction, golds)),
        float(metric_max_over_ground_truths(f1_score, prediction, golds)),
    )


def _v2_question(qa: Mapping[str, Any], prediction: str) -> tuple[float, float]:
    golds = [a["text"] for a in qa["answers"] if normalize_answer_v2(a["text"])] or [""]
    return (
        float(max(compute_exact(a, prediction) for a in golds)),
        float(max(compute_f1(a, prediction) for a in golds)),
    )
