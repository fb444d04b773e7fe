"""`prolifscore evaluate` and the slide decision: the three TUPAC16 metrics on hand-computed
cases (ties, missing slides, empty regions, format errors) and the command's exit codes."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prolifscore.core.grading.evaluation import (
    proliferation_index,
    quadratic_weighted_kappa,
    slide_decision,
    spearman,
)
from prolifscore.core.grading.matching import Counts, evaluate_detections, match_pairs
from prolifscore.core.grading.submission import (
    EvaluationError,
    evaluate_detection_files,
    evaluate_predictions,
)
from prolifscore.v1 import scoring_pb2 as spb

UNSPECIFIED = spb.SCORE_RULE_UNSPECIFIED
ARGMAX = spb.SCORE_RULE_ARGMAX
CUTPOINTS = spb.SCORE_RULE_CUTPOINTS
ROUNDED = spb.SCORE_RULE_ROUNDED_MEAN

# --------------------------------------------------------------------------------------------
# The slide decision the scoring service applies.


def test_slide_decision_for_each_rule() -> None:
    probs = [0.125, 0.5, 0.375]  # index = 0.125 * 1 + 0.5 * 2 + 0.375 * 3 = 2.25 (exact)
    tiles = [1, 3, 3, 2]  # mean 2.25
    assert slide_decision(probs, tiles, ARGMAX) == (2, ARGMAX, 2.25)
    assert slide_decision(probs, tiles, CUTPOINTS, [1.5, 2.5]) == (2, CUTPOINTS, 2.25)
    assert slide_decision(probs, tiles, CUTPOINTS, [1.5, 2.25])[0] == 3  # index >= c: inclusive
    assert slide_decision(probs, tiles, CUTPOINTS, [2.3, 2.5])[0] == 1
    assert slide_decision(probs, tiles, ROUNDED) == (2, ROUNDED, 2.25)
    # The case cut points exist for: most tiles of the slide look "empty" (class 1), yet the
    # index sits above both cut points fitted on the training slides.
    low = [0.45, 0.35, 0.20]  # index 0.45 + 0.70 + 0.60 = 1.75
    assert slide_decision(low, [1, 1, 2], ARGMAX)[0] == 1
    assert slide_decision(low, [1, 1, 2], CUTPOINTS, [1.35, 1.675])[0] == 3


def test_slide_decision_defaults_fallbacks_and_rounding() -> None:
    probs = [0.45, 0.35, 0.20]
    # Unspecified: the model's own rule, cut points when it has them, else argmax.
    assert slide_decision(probs, [1], UNSPECIFIED, [1.35, 1.675])[:2] == (3, CUTPOINTS)
    assert slide_decision(probs, [1], UNSPECIFIED)[:2] == (1, ARGMAX)
    # Cut points asked for, none exported: argmax, and the rule says so.
    assert slide_decision(probs, [1], CUTPOINTS)[:2] == (1, ARGMAX)
    # Rounded mean rounds half to even, like numpy and the scorer before it.
    assert slide_decision(probs, [1, 2], ROUNDED)[0] == 2  # 1.5
    assert slide_decision(probs, [2, 3], ROUNDED)[0] == 2  # 2.5
    assert slide_decision(probs, [3, 3, 2], ROUNDED)[0] == 3  # 2.67
    # Unnormalised means give the same index; argmax ties go to the lower class.
    assert proliferation_index([1, 4, 3]) == 2.25
    assert slide_decision([0.4, 0.4, 0.2], [1], ARGMAX)[0] == 1


@pytest.mark.parametrize(
    ("probs", "tiles", "rule", "cuts", "match"),
    [
        ([0.5, 0.5, 0.0], [1], CUTPOINTS, [2.0, 1.5], "ascending"),
        ([0.5, 0.5, 0.0], [1], CUTPOINTS, [1.5], "need 2"),
        ([0.5, 0.5, 0.0], [], ROUNDED, None, "non-empty"),
        ([0.5, 0.5, 0.0], [0, 1], ROUNDED, None, "within 1..3"),
        ([0.5, 0.5, 0.0], [1], 7, None, "not a ScoreRule"),
        ([0.0, 0.0, 0.0], [1], ARGMAX, None, "not all 0"),
        ([], [1], ARGMAX, None, "not all 0"),
    ],
)
def test_slide_decision_rejects_bad_inputs(
    probs: list[float], tiles: list[int], rule: int, cuts: list[float] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        slide_decision(probs, tiles, rule, cuts)


# --------------------------------------------------------------------------------------------
# Tasks 1 and 2.


def test_kappa_by_hand() -> None:
    # Observed (rows true 1..3, columns predicted): [[1,1,0],[0,1,0],[0,1,0]], N = 4.
    # Expected = row sums (2,1,1) x column sums (1,3,0) / 4; weights (i - j)^2.
    # sum W*O = 1 + 1 = 2; sum W*E = 1.5 + 0.25 + (0.25 * 4 + 0.75) = 3.5; kappa = 1 - 2/3.5.
    assert quadratic_weighted_kappa([1, 1, 2, 3], [1, 2, 2, 2]) == pytest.approx(3 / 7)
    # Over classes 1..3 even when a class is absent: the same as the two-class kappa
    # (O = [[2,0],[1,1]], E = [[1.5,0.5],[1.5,0.5]]: 1 - 1/2).
    assert quadratic_weighted_kappa([1, 2, 2, 1], [1, 2, 1, 1]) == pytest.approx(0.5)


def test_spearman_uses_average_ranks_for_ties() -> None:
    # Ranks with ties averaged: x -> (1, 2.5, 2.5, 4), y -> (1, 2, 3.5, 3.5). Pearson of the
    # ranks: sum dx*dy = 3.75, sum dx^2 = sum dy^2 = 4.5 -> 5/6. (The no-ties shortcut
    # 1 - 6 sum d^2 / (n (n^2 - 1)) would give 0.85.)
    assert spearman([1, 2, 2, 3], [10, 20, 30, 30]) == pytest.approx(5 / 6)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def gt(tmp_path: Path) -> Path:
    """Five slides, TUPAC row style: row i is slide i."""
    return _write(tmp_path / "gt.csv", "1,10\n1,20\n2,30\n3,30\n2,25\n")


def test_tasks_one_and_two_by_hand(tmp_path: Path, gt: Path) -> None:
    pred = _write(tmp_path / "p.csv", "1,1\n2,2\n2,2\n2,3\n2,2.5\n")
    r = evaluate_predictions(pred, gt)
    assert r["task1_slides"] == 5 and r["errors"] == [] and r["missing"] == []
    assert r["kappa"] == pytest.approx(quadratic_weighted_kappa([1, 1, 2, 3, 2], [1, 2, 2, 2, 2]))
    # Spearman of (1, 2, 2, 3, 2.5) against (10, 20, 30, 30, 25): ranks (1, 2.5, 2.5, 5, 4)
    # and (1, 2, 4.5, 4.5, 3), both of mean 3; sum dx*dy = 4 + 0.5 - 0.75 + 3 + 0 = 6.75,
    # sum dx^2 = sum dy^2 = 9.5.
    assert r["spearman"] == pytest.approx(6.75 / 9.5) and r["spearman_slides"] == 5


def test_missing_predictions_are_listed_and_left_out_or_fail(tmp_path: Path, gt: Path) -> None:
    # Slide 3 has no tumor score (-1), slide 5 no row at all; ids map onto rows by number.
    pred = _write(
        tmp_path / "p.csv",
        "slide_id,tumor_score,molecular_score\n"
        "TUPAC-TE-001,1,1\nTUPAC-TE-002,2,2\nTUPAC-TE-003,-1,2\nTUPAC-TE-004,3,3\n",
    )
    r = evaluate_predictions(pred, gt)
    assert r["missing"] == ["5"] and r["task1_missing"] == ["3", "5"]
    assert r["task2_missing"] == ["5"] and r["task1_slides"] == 3 and r["spearman_slides"] == 4
    assert r["kappa"] == pytest.approx(quadratic_weighted_kappa([1, 1, 3], [1, 2, 3]))
    assert r["errors"] == [
        "task 1: 2 of 5 ground-truth slides have no prediction (3, 5)",
        "task 2: 1 of 5 ground-truth slides have no prediction (5)",
    ]
    with pytest.raises(EvaluationError, match=r"task 1: 2 of 5 .*\(3, 5\)"):
        evaluate_predictions(pred, gt, missing="fail")


def test_an_unanswered_task_is_not_missing(tmp_path: Path, gt: Path) -> None:
    # The challenge's convention: a column of -1 means the task was not submitted.
    pred = _write(tmp_path / "p.csv", "1,-1\n1,-1\n2,-1\n3,-1\n2,-1\n")
    r = evaluate_predictions(pred, gt, missing="fail")
    assert r["kappa"] == 1.0 and r["spearman"] is None and r["task2_missing"] == []
    pred = _write(tmp_path / "q.csv", "-1,1\n-1,2\n-1,3\n-1,4\n-1,5\n")
    r = evaluate_predictions(pred, gt, missing="fail")
    assert r["kappa"] is None and r["spearman"] is not None and r["task1_missing"] == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1,1\n\n2,2\n", r"p\.csv:2: blank line in a row-numbered file"),
        ("1,1,7\n", r"p\.csv:1: expected tumor_score\[,molecular_score\]"),
        ("4,1\n", r"p\.csv:1: tumor score '4' is not one of \(1, 2, 3\)"),
        ("1,x\n", r"p\.csv:1: molecular score 'x' is not a number"),
        ("slide,score\nA,1\n", "a header must name slide_id"),
        ("slide_id,tumor_score\nA,1,2\n", r"p\.csv:2: 3 cells for 2 header columns"),
        ("slide_id,tumor_score\nA,1\nA,2\n", r"p\.csv:3: slide 'A' appears twice"),
        ("\n\n", "is empty"),
    ],
)
def test_prediction_format_errors_name_the_line(
    tmp_path: Path, gt: Path, text: str, match: str
) -> None:
    with pytest.raises(EvaluationError, match=match):
        evaluate_predictions(_write(tmp_path / "p.csv", text), gt)


def test_trailing_blank_lines_are_fine(tmp_path: Path, gt: Path) -> None:
    pred = _write(tmp_path / "p.csv", "1,1\n1,2\n2,3\n3,4\n2,5\n\n\n")
    assert evaluate_predictions(pred, gt)["task1_slides"] == 5


# --------------------------------------------------------------------------------------------
# Task 3: matching.


def test_detection_equidistant_to_two_truths() -> None:
    r = 30.0
    # Alone between two centroids (15 px from each): one true positive, one missed centroid.
    assert evaluate_detections([(0, 15)], [(0, 0), (0, 30)], r) == Counts(1, 0, 1)
    # A is 12.5 px from X and from Y; B is 20 px from X and 45 px from Y. A greedy claim of X
    # by A (the nearer pair) would leave B unmatched; the one-to-one maximum takes A-Y, B-X,
    # whatever the order of the rows.
    a, b, x, y = (0, 12.5), (0, -20), (0, 0), (0, 25)
    for pred in itertools.permutations([a, b]):
        for truth in itertools.permutations([x, y]):
            assert evaluate_detections(pred, truth, r) == Counts(2, 0, 0)
    assert match_pairs([a, b], [x, y], r) == [(0, 1), (1, 0)]


def test_matching_is_one_to_one_and_order_free() -> None:
    r = 30.0
    # Two detections equidistant to one centroid: one true positive, one false positive.
    assert evaluate_detections([(0, -10), (0, 10)], [(0, 0)], r) == Counts(1, 1, 0)
    # The radius is inclusive: 30 px (18, 24) is a match, 30.5 px is not.
    assert evaluate_detections([(18, 24)], [(0, 0)], r) == Counts(1, 0, 0)
    assert evaluate_detections([(0, 30.5)], [(0, 0)], r) == Counts(0, 1, 1)
    assert evaluate_detections([(5, 5)], [(5, 5)], r) == Counts(1, 0, 0)  # same pixel
    # Confidences do not change the count (the challenge's evaluation ignores them).
    assert evaluate_detections([(0, 1, 0.1), (0, 2, 0.9)], [(0, 0)], r) == Counts(1, 1, 0)
    # Equal-cost choices are made on sorted points: the same centroid whatever the row order.
    truth = [(0.0, 0.0), (0.0, 30.0)]
    for order in (truth, truth[::-1]):
        ((_, j),) = match_pairs([(0, 15)], order, r)
        assert tuple(order[j]) == (0.0, 0.0)


def test_matching_on_random_points_equals_the_best_assignment() -> None:
    """Against brute force: the most pairs within the radius any one-to-one choice reaches."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        pred = rng.integers(0, 60, (rng.integers(0, 5), 2)).astype(float)
        truth = rng.integers(0, 60, (rng.integers(0, 5), 2)).astype(float)
        small, large = (pred, truth) if len(pred) <= len(truth) else (truth, pred)
        best = max(
            sum(np.hypot(*(small[i] - large[j])) <= 20 for i, j in enumerate(perm))
            for perm in itertools.permutations(range(len(large)), len(small))
        )
        assert evaluate_detections(pred, truth, 20.0).tp == best


# --------------------------------------------------------------------------------------------
# Task 3: files.


@pytest.fixture
def mitosis_gt(tmp_path: Path) -> Path:
    """Four regions: 01/01 two mitoses, 01/02 an empty file, 02/01 an image without a CSV
    (no mitoses), 02/02 one mitosis."""
    root = tmp_path / "mitoses_ground_truth"
    _write(root / "01" / "01.csv", "10,10\n100,100\n")
    _write(root / "01" / "02.csv", "")
    (root / "02").mkdir()
    (root / "02" / "01.tif").write_bytes(b"II*\0")  # only its name is read
    _write(root / "02" / "02.csv", "50,50\n")
    return root


DETECTIONS = (
    "case,region,row,col,confidence\n"
    "01,01,12,14,0.9\n"  # 4.5 px from (10, 10): true positive
    "01,01,200,200,0.8\n"  # false positive
    "01,02,5,5,0.7\n"  # false positive in a region without mitoses
    "02,01,7,7,0.2\n"  # false positive in the image-only region, below a 0.5 threshold
)  # 02/02: no rows, so its mitosis is missed


def test_detection_csv_by_hand(tmp_path: Path, mitosis_gt: Path) -> None:
    det = _write(tmp_path / "det.csv", DETECTIONS)
    r = evaluate_detection_files(det, mitosis_gt)
    assert (r["tp"], r["fp"], r["fn"], r["regions"]) == (1, 3, 2, 4)
    assert r["f1"] == pytest.approx(2 / 7, abs=1e-4)  # 2TP / (2TP + FP + FN)
    assert r["precision"] == 0.25 and r["recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert r["per_region"]["01/02"] == {"tp": 0, "fp": 1, "fn": 0}
    assert r["per_region"]["02/02"] == {"tp": 0, "fp": 0, "fn": 1}
    # The challenge's threshold rule: confidence above it.
    r = evaluate_detection_files(det, mitosis_gt, threshold=0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 2) and r["f1"] == pytest.approx(1 / 3, abs=1e-4)
    assert evaluate_detection_files(det, mitosis_gt, threshold=0.9)["tp"] == 0  # not above


def test_unknown_and_missing_regions(tmp_path: Path, mitosis_gt: Path) -> None:
    det = _write(tmp_path / "det.csv", DETECTIONS + "03,01,1,1,0.9\n")
    r = evaluate_detection_files(det, mitosis_gt)
    assert r["unknown_regions"] == ["03/01"] and r["fp"] == 3  # left out, listed
    assert "1 detection regions are not in the ground truth (03/01" in r["errors"][0]
    with pytest.raises(EvaluationError, match="not in the ground truth"):
        evaluate_detection_files(det, mitosis_gt, missing="fail")
    # The challenge's folder layout: a region without a file is missing (left out, listed).
    folder = tmp_path / "submission"
    _write(folder / "01" / "01.csv", "12,14,0.9\n200,200,0.8\n")
    _write(folder / "01" / "02.csv", "")  # looked at, nothing found
    _write(folder / "02" / "02.csv", "50,60\n")  # 10 px: true positive
    r = evaluate_detection_files(folder, mitosis_gt)
    assert r["layout"] == "folder" and r["missing_regions"] == ["02/01"]
    assert (r["tp"], r["fp"], r["fn"], r["regions"]) == (2, 1, 1, 3)
    with pytest.raises(EvaluationError, match=r"1 ground-truth regions have no detections file"):
        evaluate_detection_files(folder, mitosis_gt, missing="fail")
    with pytest.raises(EvaluationError, match="a threshold needs a confidence"):
        evaluate_detection_files(folder, mitosis_gt, threshold=0.5)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("det.csv", "case,row,col\n01,1,1\n", r"must name case, region, row, col"),
        ("det.csv", "case,region,row,col\n01,01,x,1\n", r"det\.csv:2: row, col and confidence"),
        ("det.csv", "case,region,row,col\n01,,1,1\n", r"det\.csv:2: empty case or region"),
        ("det.csv", "case,region,row,col\n01,01,1\n", r"det\.csv:2: 3 cells for 4 header"),
    ],
)
def test_detection_format_errors(
    tmp_path: Path, mitosis_gt: Path, name: str, text: str, match: str
) -> None:
    with pytest.raises(EvaluationError, match=match):
        evaluate_detection_files(_write(tmp_path / name, text), mitosis_gt)


def test_ground_truth_format_errors(tmp_path: Path) -> None:
    det = _write(tmp_path / "det.csv", "case,region,row,col\n01,01,1,1\n")
    _write(tmp_path / "gt" / "01" / "01.csv", "10,10\nten,10\n")
    with pytest.raises(EvaluationError, match=r"01\.csv:2: expected two numbers 'row,col'"):
        evaluate_detection_files(det, tmp_path / "gt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match=r"holds no <case>/<region>\.csv"):
        evaluate_detection_files(det, tmp_path / "empty")
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_detection_files(det, tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# The command.


def _evaluate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prolifscore.cli.main", "evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_scores_all_three_tasks(tmp_path: Path, gt: Path, mitosis_gt: Path) -> None:
    pred = _write(tmp_path / "p.csv", "1,1\n2,2\n2,2\n2,3\n")  # slide 5 missing
    det = _write(tmp_path / "det.csv", DETECTIONS)
    done = _evaluate(
        "--predictions", pred, "--ground-truth", gt,
        "--detections", det, "--mitosis-ground-truth", mitosis_gt,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kappa"] == pytest.approx(quadratic_weighted_kappa([1, 1, 2, 3], [1, 2, 2, 2]))
    assert out["spearman"] == pytest.approx(5 / 6)  # the tied case above
    assert out["task1_missing"] == ["5"] and out["missing_policy"] == "skip"
    assert out["mitosis"]["f1"] == pytest.approx(2 / 7, abs=1e-4)
    assert "warning: left out, task 1: 1 of 5 ground-truth slides" in done.stderr
    # At 0.5 um/px the radius is 15 px: a detection 20 px away no longer matches.
    far = _write(tmp_path / "far.csv", "case,region,row,col\n02,02,50,70\n")
    args = ("--detections", far, "--mitosis-ground-truth", mitosis_gt)
    assert json.loads(_evaluate(*args).stdout)["mitosis"]["tp"] == 1
    assert json.loads(_evaluate(*args, "--mpp", "0.5").stdout)["mitosis"]["tp"] == 0


def test_cli_exit_codes(tmp_path: Path, gt: Path) -> None:
    pred = _write(tmp_path / "p.csv", "1,1\n2,2\n")
    failed = _evaluate("--predictions", pred, "--ground-truth", gt, "--missing", "fail")
    assert failed.returncode == 1 and failed.stdout == ""
    assert "error: task 1: 3 of 5 ground-truth slides have no prediction (3, 4, 5)" in (
        failed.stderr
    )
    bad = _write(tmp_path / "bad.csv", "1,1\n\n2,2\n")
    done = _evaluate("--predictions", bad, "--ground-truth", gt)
    assert done.returncode == 1 and "bad.csv:2: blank line" in done.stderr
    usage = _evaluate("--predictions", pred)
    assert usage.returncode == 2 and "--ground-truth" in usage.stderr
    assert _evaluate().returncode == 2
    # Both raters on one class: kappa is undefined, printed as JSON null (never NaN).
    one = _write(tmp_path / "one.csv", "1,1\n1,2\n1,3\n")
    same = _write(tmp_path / "same.csv", "1,1\n1,2\n1,3\n")
    out = json.loads(_evaluate("--predictions", one, "--ground-truth", same).stdout)
    assert out["kappa"] is None and out["spearman"] == pytest.approx(1.0)
