"""The scoring-on-users'-CPUs benchmark's own arithmetic (bench/scoring_perf.py): the large
slide's ROI, and how bf16 and fp32 results are compared."""

from __future__ import annotations

from bench.scoring_perf import PerfConfig, _compare, large_rois
from prolifscore.v1 import scoring_pb2 as spb


def test_large_roi_is_the_configured_square_and_zero_means_the_whole_slide() -> None:
    (roi,) = large_rois(PerfConfig(roi_tiles=10, roi_centre=(0.5, 0.25)), 10_000)
    xs, ys = roi.rings[0].xy[0::2], roi.rings[0].xy[1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (3720, 6280, 1220, 3780)
    assert large_rois(PerfConfig(roi_tiles=0), 10_000) == []


def _result(tumor: int, grade: int, probs: list[list[float]], maxima: list[float]):
    pairs = zip(probs, maxima, strict=True)
    tiles = [spb.TilePrediction(probabilities=p, mitosis_max=m) for p, m in pairs]
    return spb.SlideScore(tumor_score=tumor, mitotic_score=grade, tiles=tiles)


def test_compare_takes_the_largest_difference_of_class_probabilities_and_mitosis_maxima() -> None:
    a = _result(2, 1, [[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], [0.4, 0.6])
    b = _result(2, 1, [[0.21, 0.5, 0.29], [0.1, 0.1, 0.8]], [0.4, 0.575])
    same, diff = _compare(a, b)
    assert same and abs(diff - 0.025) < 1e-6
    assert _compare(a, _result(2, 2, [[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], [0.4, 0.6]))[0] is False
    assert _compare(a, _result(2, 1, [[0.2, 0.5, 0.3]], [0.4])) == (False, float("inf"))
