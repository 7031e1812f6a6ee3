"""The publication gate of `elma publish retrain`: a candidate edge replaces the current one only
when it loses no more F1 than allowed and does not offload more of the held-out questions."""

from __future__ import annotations

import pytest

from elma_utils.server.publish import publish_refusal


def scores(f1: float, share: float, n: int = 500) -> dict:
    """An ``evaluate_bundle`` summary with the fields the gate reads."""
    return {"questions": n, "f1": f1, "exact": f1 - 10, "share_solved": share, "avg_exit_layer": 5.0}


def test_equal_or_better_candidate_passes():
    assert publish_refusal(scores(74.0, 90.0), scores(74.0, 90.0)) is None
    assert publish_refusal(scores(74.0, 90.0), scores(75.5, 95.0)) is None


def test_lower_f1_is_refused_beyond_the_tolerance():
    reason = publish_refusal(scores(74.58, 92.7), scores(74.52, 92.7))
    assert (
        reason
        == "candidate F1 74.52 is below 74.58 (current 74.58 minus tolerance 0) on 500 held-out questions"
    )
    assert publish_refusal(scores(74.58, 92.7), scores(74.52, 92.7), tolerance=0.1) is None
    # a negative tolerance asks the candidate to win by that much
    assert "minus tolerance -0.5" in publish_refusal(scores(74.0, 90.0), scores(74.4, 90.0), tolerance=-0.5)


def test_candidate_that_offloads_more_is_refused_even_with_better_f1():
    # the notebook-07 case: the retrained edge settled 74.3 % of the held-out questions, the current 92.7 %
    reason = publish_refusal(scores(74.0, 92.7), scores(75.0, 74.3))
    assert reason == (
        "candidate settles 74.3 % of 500 held-out questions on the edge, below 90.7 % "
        "(current 92.7 % minus max share drop 2): it would offload more"
    )
    assert publish_refusal(scores(74.0, 92.7), scores(75.0, 74.3), max_share_drop=20.0) is None


@pytest.mark.parametrize(("share", "refused"), [(88.0, False), (87.99, True)])
def test_share_drop_boundary(share, refused):
    assert (publish_refusal(scores(70.0, 90.0), scores(70.0, share)) is not None) is refused
