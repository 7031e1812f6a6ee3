"""Spoken test data: espeak-ng synthesis, noise at a given SNR, idempotent generation, manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from speech_helpers import spoken

from elma_utils.speech.audio import trim_silence
from elma_utils.speech.spoken_data import (
    SpokenItem,
    add_noise,
    generate_spoken_questions,
    item_path,
    pick_questions,
    read_manifest,
    speak,
)

PAIRS = [("q1", "What is the capital of France?"), ("q2", "Who wrote the play Hamlet?")]


def test_speak_gives_16k_float32_speech_and_speed_changes_length():
    normal = spoken(PAIRS[0][1], speed=160)
    fast = spoken(PAIRS[0][1], speed=240)
    assert normal.dtype == np.float32 and normal.ndim == 1
    assert 1.0 < normal.size / 16000 < 4.0
    assert np.max(np.abs(normal)) > 0.1
    assert fast.size < 0.85 * normal.size


def test_voices_differ():
    us, female = spoken(PAIRS[0][1], "en-us"), spoken(PAIRS[0][1], "en-us+f3")
    n = min(us.size, female.size)
    assert not np.allclose(us[:n], female[:n], atol=1e-3)


def test_unknown_voice_and_empty_text_fail_clearly():
    with pytest.raises(RuntimeError, match=r"espeak-ng -v xx-nope.*--voices=en"):
        speak("hello", "xx-nope")
    with pytest.raises(ValueError, match="empty"):
        speak("   ")


def test_text_starting_with_a_dash_is_spoken_not_parsed_as_an_option():
    assert speak("-v is a flag? No, a question.").size > 16000


def test_noise_is_mixed_at_the_requested_snr_and_is_seeded():
    clean = spoken(PAIRS[0][1])
    for snr in (20.0, 5.0):
        noisy = add_noise(clean, snr, np.random.default_rng(3))
        noise = noisy - clean  # no clipping at these levels (peak < 0.99)
        speech = trim_silence(clean, pad=0.0)
        measured = 10 * np.log10(
            np.mean(speech.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2)
        )
        assert measured == pytest.approx(snr, abs=0.3)
    again = add_noise(clean, 5.0, np.random.default_rng(3))
    np.testing.assert_array_equal(again, add_noise(clean, 5.0, np.random.default_rng(3)))


def test_loud_noise_is_scaled_to_avoid_clipping():
    noisy = add_noise(spoken(PAIRS[0][1]), -10.0, np.random.default_rng(0))
    assert np.max(np.abs(noisy)) <= 0.99 + 1e-6


def test_generation_writes_wavs_and_manifest_and_is_idempotent(tmp_path):
    manifest = generate_spoken_questions(
        PAIRS, tmp_path, voices=("en-us", "en-gb"), snrs_db=(None, 10.0), progress=False
    )
    items = read_manifest(manifest)
    assert len(items) == 2 * 2 * 2
    assert {(i.qas_id, i.voice, i.snr_db) for i in items} == {
        (q, v, s) for q, _ in PAIRS for v in ("en-us", "en-gb") for s in (None, 10.0)
    }
    for item in items:
        info = sf.info(str(item.path))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert item.duration == pytest.approx(info.duration)
        assert item.speed == 160 and item.text == dict(PAIRS)[item.qas_id]
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert set(records[0]) == {"qas_id", "text", "voice", "speed", "snr_db", "path", "duration"}
    assert not records[0]["path"].startswith("/")  # relative to the manifest

    stamps = {i.path: i.path.stat().st_mtime_ns for i in items}
    removed = items[3].path
    removed.unlink()
    again = read_manifest(
        generate_spoken_questions(
            PAIRS, tmp_path, voices=("en-us", "en-gb"), snrs_db=(None, 10.0), progress=False
        )
    )
    assert again == items
    assert removed.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != removed)


def test_regenerated_noisy_file_is_identical(tmp_path):
    generate_spoken_questions(PAIRS[:1], tmp_path, voices=("en-us",), snrs_db=(0.0,), progress=False)
    path = item_path(tmp_path, "q1", "en-us", 160, 0.0)
    first = path.read_bytes()
    path.unlink()
    generate_spoken_questions(PAIRS[:1], tmp_path, voices=("en-us",), snrs_db=(0.0,), progress=False)
    assert path.read_bytes() == first


def test_manifest_survives_moving_its_directory(tmp_path):
    manifest = generate_spoken_questions(PAIRS[:1], tmp_path / "a", voices=("en-us",), progress=False)
    shutil.move(tmp_path / "a", tmp_path / "b")
    (item,) = read_manifest(tmp_path / "b" / manifest.name)
    assert item.path == (tmp_path / "b" / "en-us" / "q1_s160_clean.wav").resolve()
    assert item.path.is_file()


def test_bad_manifest_line_names_its_place(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"qas_id": "x"}\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: not a manifest record"):
        read_manifest(path)


def test_item_paths_are_safe_file_names(tmp_path):
    path = item_path(tmp_path, "a/b c", "en-us+f3", 175, 7.5)
    assert path == tmp_path / "en-us_f3" / "a_b_c_s175_snr7.5db.wav"


def test_pick_questions_from_squad_dev():
    from elma_utils.squad.data import load_squad

    examples = load_squad("1.1", "dev", download=False, limit=60).examples
    first = pick_questions(examples, 5)
    assert first == [(e.qas_id, e.question) for e in examples[:5]]
    sample = pick_questions(examples, 10, seed=7)
    assert sample == pick_questions(examples, 10, seed=7) and len(set(sample)) == 10
    order = [e.qas_id for e in examples]
    assert [order.index(q) for q, _ in sample] == sorted(order.index(q) for q, _ in sample)
    assert pick_questions([("a", "x"), ("a", "y"), ("b", "z")]) == [("a", "x"), ("b", "z")]


def test_spoken_item_json_round_trip(tmp_path):
    item = SpokenItem("id1", "Who?", "en-gb", 150, 5.0, tmp_path / "en-gb" / "x.wav", 1.25)
    assert SpokenItem.from_json(item.to_json(tmp_path), tmp_path) == item
