"""The training batch plan: seeded, full batches, and never an endless loop."""

from __future__ import annotations

import numpy as np
import pytest

from elma_utils.model.batching import training_plan


def test_fewer_rows_than_a_batch_still_make_a_plan():
    """A growth run on 6 stored questions with batch_size 16 used to loop for ever."""
    plan = training_plan(np.array([50] * 6), batch_size=16, max_len=96, steps=3, seed=0)
    assert [sorted(b.rows.tolist()) for b in plan] == [list(range(6))] * 3


def test_full_batches_when_there_are_enough_rows():
    plan = training_plan(np.array([50] * 40), batch_size=16, max_len=96, steps=5, seed=0)
    assert [len(b.rows) for b in plan] == [16] * 5
    assert training_plan(np.array([50] * 40), 16, 96, 5, 0)[0].rows.tolist() == plan[0].rows.tolist()


def test_no_rows_is_an_error():
    with pytest.raises(ValueError, match="no training rows"):
        training_plan(np.array([], dtype=int), 16, 96, 1, 0)
