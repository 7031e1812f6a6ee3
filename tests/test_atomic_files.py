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


def test_new_files_are_readable_and_replaced_files_keep_their_mode(tmp_path):
    fresh = tmp_path / "predictions.json"
    write_json_atomic(fresh, {"q": "a"})
    assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600

    private = tmp_path / "private.json"
    write_json_atomic(private, {"v": 1}, mode=0o600)
    write_json_atomic(private, {"v": 2})
    assert private.stat().st_mode & 0o777 == 0o600
    assert json.loads(private.read_text()) == {"v": 2}
