"""`make bench-training`'s figures from the scoring service's answers (`bench/served.py`)."""

from __future__ import annotations

import pytest

from bench.served import served_figures
from prolifscore.core.grading.evaluation import quadratic_weighted_kappa, spearman
from prolifscore.v1 import scoring_pb2 as spb


def _answer(tumor: int, mitotic: int, index: float, molecular: float | None) -> spb.SlideScore:
    score = spb.SlideScore(
        tumor_score=tumor,
        mitotic_score=mitotic,
        proliferation_index=index,
        score_rule=spb.SCORE_RULE_CUTPOINTS,
        mitosis_threshold=0.9,
        tiles_scored=16,
    )
    if molecular is not None:
        score.molecular_score = molecular
    return score


def test_figures_are_computed_from_the_answers() -> None:
    truth = {"A": (1, -0.5), "B": (2, -0.1), "C": (3, 0.4), "D": (2, 0.0)}
    answers = [
        ("A", _answer(1, 1, 1.6, -0.3)),
        ("B", _answer(1, 2, 1.8, -0.2)),  # the tumor model calls a 2 a 1
        ("C", _answer(3, 3, 2.5, 0.1)),
        ("D", _answer(2, 2, 2.0, -0.25)),  # molecular ranked below B's
    ]
    got = served_figures(truth, answers)
    y = [1, 2, 3, 2]
    assert got["tumor_model_kappa"] == pytest.approx(quadratic_weighted_kappa(y, [1, 1, 3, 2]))
    assert got["mitosis_route_kappa"] == pytest.approx(1.0)
    assert got["molecular_spearman"] == pytest.approx(
        spearman([-0.5, -0.1, 0.4, 0.0], [-0.3, -0.2, 0.1, -0.25])
    )
    assert got["served_slides"] == 4 and got["served_score_rules"] == [spb.SCORE_RULE_CUTPOINTS]
    assert got["served_mitosis_threshold"] == pytest.approx(0.9)
    assert [r["slide_id"] for r in got["served_rows"]] == ["A", "B", "C", "D"]


def test_no_molecular_spearman_unless_every_slide_has_a_molecular_score() -> None:
    """A tumor model without a trained molecular head answers without one: no figure, rather
    than a Spearman over whichever slides happened to have it."""
    truth = {"A": (1, -0.5), "B": (3, 0.4), "C": (2, 0.0)}
    answers = [
        ("A", _answer(1, 1, 1.5, -0.3)),
        ("B", _answer(3, 3, 2.5, None)),
        ("C", _answer(2, 2, 2.0, 0.0)),
    ]
    got = served_figures(truth, answers)
    assert got["molecular_spearman"] is None
    assert got["served_rows"][1]["molecular_score"] is None
