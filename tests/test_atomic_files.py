"""Atomic writes: the old file or the new one, never a part, and no temporary files left."""

from __future__ import annotations

import json

import pytest

from elma_utils.atomic_files import write_bytes_atomic, write_json_atomic


def test_replaces_whole_files_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "LATEST.json"
    write_json_atomic(target, {"version": 1})
    write_json_atomic(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "pointer"
    write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # fails inside the write, after the temp file exists
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pointer"]
