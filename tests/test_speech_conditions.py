"""Benchmark conditions on real audio: the asked SNR is the measured one, reverb changes the
signal, and the tuning and held-out parts share no voice, noise kind, room or question."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from speech_helpers import QUESTIONS, spoken

from elma_utils.speech import conditions as cd
from elma_utils.speech.noise import babble, coloured_noise, measured_snr_db, mix_at_snr, reverberate

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.mark.parametrize("kind", ["white", "pink", "brown"])
@pytest.mark.parametrize("snr", [20.0, 10.0, 5.0])
def test_mixing_gives_the_asked_snr(kind, snr):
    clean = spoken(QUESTIONS[0])
    noise = coloured_noise(kind, clean.size, np.random.default_rng(1))
    mixed = mix_at_snr(clean, noise, snr)
    assert measured_snr_db(clean, mixed) == pytest.approx(snr, abs=0.05)
    assert np.max(np.abs(mixed)) <= 0.99  # scaled against clipping, SNR kept


def test_babble_is_other_speech_at_the_asked_snr():
    clean = spoken(QUESTIONS[1])
    talkers = [spoken(q, v) for q, v in zip(QUESTIONS[2:], ("en-gb", "en-us+f3", "en-029"), strict=True)]
    noise = babble(talkers, clean.size, np.random.default_rng(0))
    assert noise.size == clean.size and np.mean(noise**2) == pytest.approx(1.0)
    assert measured_snr_db(clean, mix_at_snr(clean, noise, 10.0)) == pytest.approx(10.0, abs=0.05)
    with pytest.raises(ValueError, match="at least one"):
        babble([], 100, np.random.default_rng(0))


def test_pink_and_brown_noise_have_their_slopes():
    """Power spectral density from one octave to the next: flat for white, -3 dB for pink (1/f),
    -6 dB for brown (1/f²)."""
    n = 2**16
    for kind, slope in (("white", 0.0), ("pink", -3.0), ("brown", -6.0)):
        y = coloured_noise(kind, n, np.random.default_rng(3))
        spectrum = np.abs(np.fft.rfft(y)) ** 2
        f = np.fft.rfftfreq(n, 1 / 16000)
        low = spectrum[(f > 250) & (f < 500)].mean()
        high = spectrum[(f > 500) & (f < 1000)].mean()
        assert 10 * np.log10(high / low) == pytest.approx(slope, abs=1.0), kind


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")
def test_reverb_changes_the_signal_and_adds_a_tail():
    dry = spoken(QUESTIONS[0])
    wet = reverberate(dry, **cd.ROOMS["hall"])
    assert wet.size == dry.size + 8000  # the 0.5 s tail sox is given
    corr = np.dot(wet[: dry.size], dry) / np.linalg.norm(wet[: dry.size]) / np.linalg.norm(dry)
    assert corr < 0.95
    last = np.flatnonzero(np.abs(dry) > 1e-3)[-1]
    tail = wet[last + 1600 : last + 4800]  # 0.1-0.3 s after the last sound: only the room
    assert np.sqrt(np.mean(tail**2)) > 1e-3


def test_clips_are_cached_and_have_their_condition(tmp_path):
    text = QUESTIONS[2]
    cond = cd.Condition("en-029", 200, "babble", 5.0, "small-room")
    others = list(QUESTIONS[:2]) + list(QUESTIONS[3:])
    path = cd.make_clip(text, cond, tmp_path, babble_texts=others, babble_voices=["en-gb", "en-us"])
    again = cd.make_clip(text, cond, tmp_path, babble_texts=others, babble_voices=["en-gb", "en-us"])
    assert path == again and path.stat().st_mtime == again.stat().st_mtime
    white = cd.make_clip(text, cd.Condition("en-us", 160, "white", 10.0), tmp_path)
    clean = cd.spoken_clean(text, "en-us", 160, tmp_path)
    assert measured_snr_db(clean, cd._read(white)) == pytest.approx(10.0, abs=0.1)  # after 16-bit rounding
    assert cd.clip_path(tmp_path, text, cd.Condition("en-us", 130)) != cd.clip_path(
        tmp_path, text, cd.Condition("en-us", 160)
    )
    with pytest.raises(ValueError, match="babble needs"):
        cd.make_clip(text, cd.Condition("en-us", 160, "babble", 10.0), tmp_path)


def test_condition_checks_its_fields():
    with pytest.raises(ValueError, match="clean has no SNR"):
        cd.Condition("en-us", 160, "white", None)
    with pytest.raises(ValueError, match="unknown room"):
        cd.Condition("en-us", room="cathedral")


def test_tuning_and_heldout_share_no_voice_noise_room_or_question():
    assert set(cd.TUNING.voices).isdisjoint(cd.HELDOUT.voices)
    assert set(cd.TUNING.noises).isdisjoint(cd.HELDOUT.noises)
    assert cd.TUNING.room != cd.HELDOUT.room
    assert len(set(cd.TUNING.voices) | set(cd.HELDOUT.voices)) >= 8
    articles = [
        {"title": f"article {a}", "paragraphs": [{"context": "c", "qas": [
            {"id": f"{a}-{q}", "question": f"question {q} of {a}?"} for q in range(5)]}]}
        for a in range(40)
    ]  # fmt: skip
    parts = cd.split_questions({"data": articles})
    tuning, heldout = ({q for q, _ in parts[p]} for p in ("tuning", "heldout"))
    assert tuning and heldout and tuning.isdisjoint(heldout) and len(tuning | heldout) == 200
    assert {q.split("-")[0] for q in tuning}.isdisjoint({q.split("-")[0] for q in heldout})  # whole articles
    for part, cset in (("tuning", cd.TUNING), ("heldout", cd.HELDOUT)):
        assigned = cd.assign_conditions(parts[part], cset, seed=0)
        assert [q for q, _, _ in assigned] == [q for q, _ in parts[part]]
        for _, _, cond in assigned:
            assert cond.voice in cset.voices and cond.rate in cset.rates
            assert cond.noise == "clean" or cond.noise in cset.noises
            assert cond.room in (None, cset.room)
        cells = {}
        for _, _, cond in assigned:
            cells[(cond.voice, cond.snr_level)] = cells.get((cond.voice, cond.snr_level), 0) + 1
        assert max(cells.values()) - min(cells.values()) <= 1  # balanced voice × SNR cells
