"""The held-out benchmark's bookkeeping on hand-made rows: decisions, LM choice, guard and
fallback, per-condition numbers."""

from __future__ import annotations

import pytest

from elma_utils.speech import robust_benchmark as rb
from elma_utils.speech.question_lm import QuestionLM


def test_a_feature_is_kept_only_when_it_pays_on_tuning_and_holds_on_heldout():
    assert rb.decide("vad", (0.20, 0.18), (0.30, 0.29), 0.01)["kept"]
    dropped = rb.decide("vad", (0.20, 0.18), (0.30, 0.31), 0.01)
    assert not dropped["kept"] and "did not hold on held-out" in dropped["why"]
    assert rb.decide("denoise", (0.20, 0.20), (0.30, 0.10), 0.05)["why"] == "dropped: no gain on tuning"
    prompt = rb.decide("noprompt", (0.15, 0.25), (0.30, 0.35), -0.02)  # plain has the prompt
    assert prompt["kept"] and prompt["tuning_wer"] == {"without": 0.25, "with": 0.15}
    assert prompt["rtf_cost"] == 0.02


def test_the_front_end_follows_the_decisions():
    keep_vad = {
        "vad": rb.decide("vad", (0.2, 0.1), (0.3, 0.2), 0),
        "noprompt": rb.decide("noprompt", (0.2, 0.3), (0.3, 0.4), 0),
    }
    assert rb.front_end_choice(keep_vad) == "vad"
    both = {
        "vad": rb.decide("vad", (0.2, 0.15), (0.3, 0.2), 0),
        "denoise": rb.decide("denoise", (0.2, 0.1), (0.3, 0.2), 0),
    }
    assert rb.front_end_choice(both) == "denoise" and "not combined with denoise" in both["vad"]["why"]
    no_prompt = {"noprompt": rb.decide("noprompt", (0.3, 0.2), (0.3, 0.2), 0)}
    assert rb.front_end_choice(no_prompt) == "noprompt"
    assert rb.front_end_choice({}) == "plain"


CONTEXT = "Paris is the capital of France. The Seine flows through it."


def _row(hyps, no_speech=0.05, avg=-0.2, speech=2.0):
    return {"hyps": hyps, "no_speech_prob": no_speech, "avg_logprob": avg, "speech_seconds": speech,
            "audio_seconds": 2.5, "front_seconds": 0.05, "decode_seconds": 0.45, "load": [1.0, 1.0, 1.0]}  # fmt: skip


def test_the_chooser_rescores_within_the_acoustic_gap_only():
    lm = QuestionLM().fit(["What is the capital of France?"] * 20)
    chooser = rb.Chooser(lm, {"q": CONTEXT})
    row = _row([["What is the capital of Franz?", -5.0, 8], ["What is the capital of France?", -5.5, 8]])
    assert chooser.text(row, "q", 0.0, 0.0, None) == "What is the capital of Franz?"  # the beam alone
    assert chooser.text(row, "q", 0.5, 1.0, 4.0) == "What is the capital of France?"
    far = _row([["Uh.", -2.0, 2], ["What is the capital of France?", -12.0, 8]])
    assert chooser.text(far, "q", 0.5, 1.25, 4.0) == "Uh."
    assert chooser.text(far, "q", 0.5, 1.25, None) == "What is the capital of France?"
    assert chooser.text({**far, "no_speech_prob": 0.9}, "q", 0.5, 1.25, None) == "Uh."  # no speech: no LM
    assert chooser.text(_row([]), "q", 0.5, 1.0, 4.0) == ""


def _clip(cid, text, voice="en-029", snr=None, noise="clean"):
    return {"part": "heldout", "qas_id": cid, "text": text, "path": f"/x/{cid}.wav",
            "condition": {"voice": voice, "rate": 160, "noise": noise, "snr_db": snr, "room": None}}  # fmt: skip


def test_final_rows_apply_the_guard_and_its_fallback():
    chooser = rb.Chooser(None, {"a": CONTEXT, "b": CONTEXT, "c": CONTEXT})
    clips = [
        _clip("a", "What is the capital of France?"),
        _clip("b", "Which river flows through Paris?", snr=5.0, noise="pink"),
        _clip("c", "Who lives in Paris?", snr=10.0, noise="babble"),
    ]
    rows = {
        "a": _row([["What is the capital of France?", -2.0, 8]]),
        "b": _row([["please please please", -3.0, 4]]),  # repeats itself; the fallback is fine
        "c": _row([["la la la la", -3.0, 4]]),  # repeats itself; so does the fallback
    }
    fallbacks = {
        "b": {
            "text": "Which river flows through Paris?",
            "no_speech_prob": 0.1,
            "avg_logprob": -0.3,
            "seconds": 1.0,
        },
        "c": {"text": "la la la", "no_speech_prob": 0.1, "avg_logprob": -0.3, "seconds": 1.0},
    }
    settings = {"lm_weight": 0.0, "length_bonus": 0.0, "max_acoustic_gap": None}
    final = rb.final_rows(
        clips, rows, fallbacks, chooser, settings, {"a": CONTEXT, "b": CONTEXT, "c": CONTEXT}
    )
    a, b, c = final
    assert a["wer"] == 0 and not a["ask_repeat"] and a["seconds"] == pytest.approx(0.5)
    assert b["fallback_used"] and b["transcript"] == "Which river flows through Paris?" and b["wer"] == 0
    assert b["seconds"] == pytest.approx(1.5)  # the fallback's time counts
    assert c["ask_repeat"] and "repeats itself" in c["unreliable"] and c["wer"] == 1.0
    s = rb.stats(final)
    assert s["clips"] == 3 and s["ask_repeat_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["wer"] == pytest.approx(4 / 15, abs=1e-4)  # c asked to repeat: its 4 words not heard
    assert s["wer_decoded"] == pytest.approx(4 / 15, abs=1e-4)  # "la la la la": 4 substitutions
    assert s["wer_answered"] == 0.0 and s["bad_answered_share"] == 0.0
    assert s["rtf"] == pytest.approx((0.5 + 1.5 + 1.5) / 7.5, abs=1e-4)
    table = rb.conditions_table(final)
    assert [(r["voice"], r["snr"], r["clips"]) for r in table] == [
        ("en-029", "10", 1),
        ("en-029", "5", 1),
        ("en-029", "clean", 1),
    ]
    summary = rb.part_summary(final)
    assert summary["clips"] == 2 and summary["at_5db"]["clips"] == 1  # the target's scope: clean to 10 dB
    assert summary["worst_condition_to_10db"] == {"condition": "en-029 × 10", "wer": 1.0}


def test_the_fallback_is_chosen_on_tuning_by_wer_then_fewest_repeats():
    def rows(part, wer, repeat):
        return [{"part": part, "wer": wer, "errors": int(wer * 10), "reference_words": 10, "exact": wer == 0,
                 "seconds": 1.0, "audio_seconds": 2.0, "ask_repeat": repeat, "empty": False, "fallback_used": False}]  # fmt: skip

    finals = {
        "none": rows("tuning", 0.3, True) + rows("heldout", 0.1, True),
        "noprompt": rows("tuning", 0.2, False) + rows("heldout", 0.9, False),
        "prompt": rows("tuning", 0.2, True) + rows("heldout", 0.0, False),
    }
    mode, record = rb.choose_fallback(finals)
    assert mode == "noprompt"  # held-out numbers are recorded, never used to choose
    assert record["prompt"]["heldout"]["wer"] == 0.0 and record["chosen"] == "noprompt"


def test_a_fallback_tie_on_tuning_falls_back_to_the_designed_mode():
    same = [{"part": "tuning", "wer": 0.1, "errors": 1, "reference_words": 10, "exact": False, "seconds": 1.0,
             "audio_seconds": 2.0, "ask_repeat": False, "empty": False, "fallback_used": False}]  # fmt: skip
    mode, record = rb.choose_fallback({"none": same, "noprompt": same, "prompt": same})
    assert mode == "noprompt" and record["chosen_on"].startswith("tuning could not decide")
