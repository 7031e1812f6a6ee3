"""An exits artifact names its full model relative to itself: the two move together, an old
absolute entry still loads, and a missing full model is reported before Keras is asked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from elma_utils.early_exit import exits_artifact
from elma_utils.early_exit.experiment import load_exits
from elma_utils.model.tokenizers import QATokenizer
from tests.qa_fixtures import save_tiny_exits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_exits(tmp_path_factory.mktemp("exits"), QATokenizer.minilm())


def _exit_weights(exits_dir: Path) -> list[np.ndarray]:
    multi, _, _, _ = load_exits(exits_dir)
    return [w for head in multi.exit_heads for w in head.get_weights()]


def test_the_entry_is_relative_and_resolves_back(tmp_path: Path) -> None:
    full, exits = tmp_path / "models" / "full", tmp_path / "models" / "full-exits"
    entry = exits_artifact.full_model_entry(full, exits)
    assert entry == {"full_model": "../full", "full_model_at_write": str(full.resolve())}
    full.mkdir(parents=True)
    assert exits_artifact.full_model_path(exits, entry) == full.resolve()
    assert exits_artifact.full_model_path(exits, {"full_model": "/srv/elma/full"}) == Path("/srv/elma/full")
    copy = tmp_path / "server" / "exits" / "v1"  # the exits alone, copied away: the full model where it was
    assert exits_artifact.full_model_path(copy, entry) == full.resolve()


def test_an_artifact_moved_with_its_full_model_loads_the_same(tiny: Path, tmp_path: Path) -> None:
    entry = json.loads((tiny / exits_artifact.EXITS_CONFIG).read_text())["full_model"]
    assert not Path(entry).is_absolute()
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny.parent, moved)
    cfg = json.loads((moved / tiny.name / exits_artifact.EXITS_CONFIG).read_text())
    assert exits_artifact.full_model_path(moved / tiny.name, cfg) == (moved / Path(entry).name).resolve()
    before, after = _exit_weights(tiny), _exit_weights(moved / tiny.name)
    assert len(before) == len(after) > 0
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_absolute_entry_from_an_older_artifact_still_loads(tiny: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-exits"
    shutil.copytree(tiny, old)
    cfg = json.loads((old / exits_artifact.EXITS_CONFIG).read_text())
    cfg = {k: v for k, v in cfg.items() if k != "full_model_at_write"}
    cfg["full_model"] = str(exits_artifact.full_model_path(tiny, cfg))
    (old / exits_artifact.EXITS_CONFIG).write_text(json.dumps(cfg))
    assert len(_exit_weights(old)) == len(_exit_weights(tiny))


def test_a_missing_full_model_says_what_to_do(tiny: Path, tmp_path: Path) -> None:
    alone = tmp_path / "alone" / tiny.name
    shutil.copytree(tiny, alone)  # the exits without the full model beside them, and none where it was
    cfg = json.loads((alone / exits_artifact.EXITS_CONFIG).read_text())
    cfg["full_model_at_write"] = str(tmp_path / "deleted-full-model")
    (alone / exits_artifact.EXITS_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(
        FileNotFoundError, match=r"full model .* is missing: move or copy it beside the exits"
    ):
        load_exits(alone)
