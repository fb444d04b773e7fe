"""bench-training's bf16 check on trained models: the fp32-vs-bf16 comparison of the scoring
service's answers (`bench/served.py`) and the `--served-only` merge (`bench/validate.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.served import precision_agreement, served_precision
from bench.validate import merge_served
from prolifscore.v1 import scoring_pb2 as spb


def _answer(
    tumor: int,
    mitotic: int,
    index: float,
    molecular: float | None,
    count: int,
    probabilities: tuple[float, float, float] = (0.2, 0.3, 0.5),
) -> spb.SlideScore:
    score = spb.SlideScore(
        tumor_score=tumor,
        mitotic_score=mitotic,
        proliferation_index=index,
        mitosis_count=count,
        probabilities=probabilities,
    )
    if molecular is not None:
        score.molecular_score = molecular
    return score


def test_identical_answers_agree_fully() -> None:
    answers = [("A", _answer(1, 1, 1.5, -0.3, 2)), ("B", _answer(3, 3, 2.6, 0.4, 30))]
    got = precision_agreement(answers, answers)
    assert got["same_scores_share"] == 1.0 and got["slides_with_other_scores"] == []
    assert got["max_proliferation_index_diff"] == 0.0
    assert got["max_molecular_score_diff"] == 0.0 and got["max_probability_diff"] == 0.0
    assert got["max_mitosis_count_diff"] == 0
    assert got["mitosis_counts_fp32_bf16"] == [["A", 2, 2], ["B", 30, 30]]


def test_a_slide_whose_mitotic_score_alone_moves_counts_as_disagreement() -> None:
    fp32 = [
        ("A", _answer(1, 1, 1.50, -0.30, 2)),
        ("B", _answer(2, 2, 2.00, 0.00, 12, (0.1, 0.8, 0.1))),
        ("C", _answer(3, 3, 2.60, 0.40, 30)),
        ("D", _answer(2, 2, 2.10, None, 11)),
    ]
    bf16 = [
        ("A", _answer(1, 1, 1.51, -0.28, 2)),
        ("B", _answer(2, 3, 2.04, 0.01, 19, (0.1, 0.75, 0.15))),  # more figures over threshold
        ("C", _answer(3, 3, 2.60, 0.40, 29)),
        ("D", _answer(2, 2, 2.10, 0.05, 11)),
    ]
    got = precision_agreement(fp32, bf16)
    assert got["same_scores_share"] == 0.75
    assert got["slides_with_other_scores"] == [{"slide_id": "B", "fp32": [2, 2], "bf16": [2, 3]}]
    assert got["max_proliferation_index_diff"] == pytest.approx(0.04)
    assert got["max_molecular_score_diff"] == pytest.approx(0.02)  # D has one side only
    assert got["slides_with_molecular_on_one_side_only"] == ["D"]
    assert got["max_probability_diff"] == pytest.approx(0.05, abs=1e-6)  # float32 fields
    assert got["max_mitosis_count_diff"] == 7
    assert got["mitosis_counts_fp32_bf16"][1] == ["B", 12, 19]


def test_answers_for_other_slides_are_refused() -> None:
    with pytest.raises(ValueError, match="same slides"):
        precision_agreement(
            [("A", _answer(1, 1, 1.5, None, 0))], [("B", _answer(1, 1, 1.5, None, 0))]
        )


def test_precision_in_effect_is_read_from_the_model_server_log(tmp_path: Path) -> None:
    log = tmp_path / "modelserver.log"
    ready = {"msg": "model server ready", "precision": "bf16", "batching": False}
    log.write_text("TensorFlow noise\n" + json.dumps(ready) + "\n")
    assert served_precision(log) == "bf16"
    log.write_text("nothing ready\n")
    assert served_precision(log) is None


def test_served_only_merge_keeps_training_figures_and_says_what_changed() -> None:
    rows = [{"slide_id": "A", "tumor_score": 1}, {"slide_id": "B", "tumor_score": 3}]
    existing = {
        "mitosis_f1": 0.91,
        "tumor_detail": {"tumor_model_kappa": 0.86},
        "tumor_model_kappa": 0.957,
        "served_rows": rows,
        "stages": {"tumor_model": {"wall_s": 1264.0}},
        "seconds": 1520.4,
    }
    served = {
        "tumor_model_kappa": 0.9,
        "served_rows": [rows[0], {"slide_id": "B", "tumor_score": 2}],
        "served_bf16": {"tumor_model_kappa": 0.9},
    }
    merged = merge_served(existing, served, {"command": "python -m bench.validate --served-only"})
    for key in ("mitosis_f1", "tumor_detail", "stages", "seconds"):
        assert merged[key] == existing[key]
    assert merged["tumor_model_kappa"] == 0.9 and merged["served_bf16"] == served["served_bf16"]
    rerun = merged["served_rerun"]
    assert rerun["command"] == "python -m bench.validate --served-only"
    assert rerun["fp32_rows_as_before"] is False and rerun["fp32_rows_changed"] == ["B"]
    same = merge_served(existing, {**served, "served_rows": rows}, {})
    assert same["served_rerun"]["fp32_rows_as_before"] is True
