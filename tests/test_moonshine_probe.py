"""The Moonshine probe says what it lacks before loading anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from elma_utils.bench import moonshine_probe


def test_missing_weights_are_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "encoder_model.ort").write_bytes(b"")
    assert moonshine_probe.main(["--models-dir", str(tmp_path), "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"moonshine_probe: {tmp_path} lacks decoder_model_merged.ort, tokenizer.json; see the module docstring to get them"
    ]
    assert not (tmp_path / "out.json").exists()
