"""Audio input: formats, resampling, mono, silence trimming and every rejection, on espeak speech."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import soundfile as sf
from speech_helpers import spoken

from elma_utils.speech.audio import (
    MAX_SECONDS,
    AudioError,
    array_to_audio_data,
    audio_data_to_array,
    capture_microphone,
    load_audio,
    prepare_audio,
    trim_silence,
)

TEXT = "What is the capital of France?"


@pytest.fixture(scope="module")
def speech16() -> np.ndarray:
    return spoken(TEXT)


@pytest.fixture(scope="module")
def speech22() -> tuple[np.ndarray, int]:
    return spoken(TEXT, sample_rate=22050), 22050  # espeak-ng's native rate


# ---------------------------------------------------------------- formats and shape


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext", "tolerance_s"),
    [
        ("WAV", "PCM_16", "wav", 0.02),
        ("FLAC", "PCM_16", "flac", 0.02),
        ("OGG", "VORBIS", "ogg", 0.05),
        ("MP3", None, "mp3", 0.08),  # decodes through libsndfile >= 1.1 (1.2.2 here)
    ],
)
def test_formats_load_as_16k_mono_float32(tmp_path, speech22, speech16, fmt, subtype, ext, tolerance_s):
    y22, sr = speech22
    path = tmp_path / f"q.{ext}"
    sf.write(path, y22, sr, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    expected = trim_silence(speech16).size / 16000
    assert abs(audio.size / 16000 - expected) <= tolerance_s
    rms = float(np.sqrt(np.mean(audio**2)))
    rms_ref = float(np.sqrt(np.mean(trim_silence(speech16) ** 2)))
    assert rms == pytest.approx(rms_ref, rel=0.15)


def test_lossless_file_matches_the_signal_sample_for_sample(tmp_path, speech16):
    path = tmp_path / "q.flac"
    sf.write(path, speech16, 16000, subtype="PCM_24")
    audio = load_audio(path, trim=False)
    assert audio.size == speech16.size
    assert np.max(np.abs(audio - speech16)) < 1e-5


def test_resampling_keeps_pitch_and_length(tmp_path):
    sr = 44100
    t = np.arange(int(1.5 * sr)) / sr
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    path = tmp_path / "tone.wav"
    sf.write(path, tone, sr)
    audio = load_audio(path, trim=False)
    assert audio.size == 24000
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(audio.size, 1 / 16000)[np.argmax(spectrum)] == pytest.approx(440.0, abs=1.0)


def test_stereo_becomes_the_channel_average(tmp_path, speech16):
    stereo = np.stack([speech16, 0.5 * speech16], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    audio = load_audio(path, trim=False)
    np.testing.assert_allclose(audio, 0.75 * speech16, atol=1e-6)


def test_integer_pcm_arrays_are_scaled_to_unit_range():
    pcm = np.array([0, 16384, -32768, 32767] * 4000, dtype=np.int16)
    audio = prepare_audio(pcm, 16000, trim=False)
    np.testing.assert_allclose(audio[:4], [0.0, 0.5, -1.0, 32767 / 32768], atol=1e-7)


def test_bytes_and_file_objects_load_like_paths(tmp_path, speech16):
    path = tmp_path / "q.wav"
    sf.write(path, speech16, 16000)
    from_path = load_audio(path)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), from_path)
    with open(path, "rb") as handle:
        np.testing.assert_array_equal(load_audio(handle), from_path)


# ---------------------------------------------------------------- silence trimming


def test_leading_and_trailing_silence_is_trimmed(tmp_path, speech16):
    core = trim_silence(speech16, pad=0.0)
    padded = np.concatenate([np.zeros(16000, np.float32), speech16, np.zeros(24000, np.float32)])
    path = tmp_path / "padded.wav"
    sf.write(path, padded, 16000, subtype="FLOAT")
    assert load_audio(path, trim=False).size == padded.size
    trimmed = load_audio(path)
    assert abs(trimmed.size - (core.size + 3200)) <= 256  # the speech, 0.1 s on each side, +- two 8 ms hops
    assert trimmed.size / 16000 < padded.size / 16000 - 2.4  # the 2.5 s of added silence is gone
    assert 0.8 < core.size / 16000 < speech16.size / 16000  # espeak's own pauses are cut too


def test_quiet_background_is_trimmed_but_the_pad_is_kept(speech16):
    rng = np.random.default_rng(0)
    hiss = (rng.standard_normal(16000) * 10 ** (-70 / 20)).astype(np.float32)  # -70 dBFS
    y = np.concatenate([hiss, trim_silence(speech16, pad=0.0), hiss])
    out = prepare_audio(y, 16000)
    extra = out.size - trim_silence(speech16, pad=0.0).size
    assert 0.1 * 16000 <= extra <= 0.25 * 16000  # 0.1 s kept on each side, give or take a hop


# ---------------------------------------------------------------- rejections


def _message(source, **kwargs) -> str:
    with pytest.raises(AudioError) as info:
        load_audio(source, **kwargs)
    return str(info.value)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    message = _message(path)
    assert "empty (0 bytes)" in message and "Record the question again" in message


def test_header_without_samples_is_rejected(tmp_path):
    path = tmp_path / "no_frames.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    assert "contains no audio samples" in _message(path)


def test_all_zero_audio_is_rejected_as_silent(tmp_path):
    path = tmp_path / "zeros.wav"
    sf.write(path, np.zeros(32000, np.float32), 16000)
    message = _message(path)
    assert "is silent" in message and "microphone" in message


def test_random_bytes_named_wav_are_rejected(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    message = _message(path)
    assert "not a readable audio file" in message and "ffmpeg -i noise.wav" in message


def test_text_file_is_rejected(tmp_path):
    path = tmp_path / "question.txt"
    path.write_text("What is the capital of France?\n")
    message = _message(path)
    assert "not a readable audio file" in message and "WAV, FLAC, OGG or MP3" in message


def test_missing_file_and_directory_are_rejected(tmp_path):
    assert "does not exist" in _message(tmp_path / "nope.wav")
    assert "is not a file" in _message(tmp_path)


def test_audio_over_the_limit_is_rejected_and_the_limit_is_configurable(tmp_path, speech16):
    core = trim_silence(speech16, pad=0.0)
    y = np.tile(core, int(np.ceil(31 * 16000 / core.size)))[: 31 * 16000]
    path = tmp_path / "long.wav"
    sf.write(path, y, 16000)
    message = _message(path)
    assert f"more than the {MAX_SECONDS:g} s limit" in message and "31.0 s" in message
    assert load_audio(path, max_seconds=40).size / 16000 == pytest.approx(31.0, abs=0.05)


def test_very_long_file_is_refused_from_its_header(tmp_path):
    path = tmp_path / "hour.wav"
    sf.write(path, np.full(200 * 16000, 0.1, np.float32), 16000, subtype="PCM_16")
    assert "200 s long, far more than the 30 s limit" in _message(path)


def test_too_short_nan_and_bad_rate_are_rejected():
    click = np.zeros(16000, np.float32)
    click[8000:8400] = 0.5  # 25 ms of sound
    with pytest.raises(AudioError, match="only"):
        prepare_audio(click, 16000)
    with pytest.raises(AudioError, match="NaN"):
        prepare_audio(np.full(16000, np.nan, np.float32), 16000)
    with pytest.raises(AudioError, match="invalid sample rate"):
        prepare_audio(np.ones(16000, np.float32), 0)


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


# ---------------------------------------------------------------- SpeechRecognition interop, microphone


def test_audio_data_round_trip_is_16_bit_exact(speech16):
    back = audio_data_to_array(array_to_audio_data(speech16))
    assert back.dtype == np.float32 and back.size == speech16.size
    assert np.max(np.abs(back - speech16)) <= 0.5 / 32768 + 1e-7


def test_microphone_without_pyaudio_or_device_fails_with_a_clear_message():
    with pytest.raises(AudioError) as info:
        capture_microphone(device_index=10**6, timeout=0.5)
    message = str(info.value)
    if importlib.util.find_spec("pyaudio") is None:
        assert "microphone capture needs PyAudio" in message and "pip install PyAudio" in message
    else:
        assert "no usable microphone" in message
    assert "--audio FILE" in message


def test_wav_written_to_memory_loads(speech16):
    buffer = io.BytesIO()
    sf.write(buffer, speech16, 16000, format="WAV")
    assert load_audio(buffer.getvalue()).size == trim_silence(speech16).size
