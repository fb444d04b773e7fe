"""Mitosis grading: peaks, non-maximum suppression across tiles, densest 10-HPF region."""

import numpy as np

from prolifscore.core.grading.mitoses import (
    MitosisGrading,
    densest_region,
    densest_region_count,
    non_max_suppression,
    tile_detections,
)
from prolifscore.v1 import pipeline_pb2 as pb


def test_peaks_map_to_level0_coordinates():
    spec = pb.ResolvedSpec(tile_size=256, footprint0=512)  # a 40x slide read at 20x
    m = np.zeros((64, 64), np.float32)  # stride 4 px
    m[10, 20] = 0.9
    m[10, 21] = 0.6  # shoulder of the same peak: not a maximum
    m[50, 5] = 0.4  # below threshold
    dets = tile_detections(m, pb.Tile(x=1000, y=2000), spec, threshold=0.5)
    assert dets == [(1000 + 20.5 * 4 * 2, 2000 + 10.5 * 4 * 2, np.float32(0.9))]


def test_a_plateau_of_tied_maxima_is_one_peak_at_its_centre():
    """bf16 rounds a figure's top to one value over several cells: one detection, not one per
    cell (cells 8 px apart would escape a 16 px suppression radius)."""
    spec = pb.ResolvedSpec(tile_size=256, footprint0=256)
    m = np.zeros((32, 32), np.float32)  # stride 8 px
    m[4, 4:7] = m[5, 5] = 0.9921875  # one 8-connected plateau (a bf16 step below 1)
    m[5, 4] = 0.98  # its shoulder
    m[20, 20] = m[22, 22] = 0.75  # tied but apart: two peaks
    dets = tile_detections(m, pb.Tile(x=0, y=0), spec, threshold=0.5)
    centre = (5 + 0.5) * 8, (4.25 + 0.5) * 8  # mean of (4,4), (4,5), (4,6), (5,5)
    assert dets == [(*centre, 0.9921875), (20.5 * 8, 20.5 * 8, 0.75), (22.5 * 8, 22.5 * 8, 0.75)]
    assert len(non_max_suppression(dets, radius0=16)) == 3


def test_nms_merges_duplicates_across_tile_borders():
    dets = [(100.0, 100.0, 0.9), (105.0, 98.0, 0.8), (300.0, 100.0, 0.7), (302.0, 101.0, 0.95)]
    kept = non_max_suppression(dets, radius0=16)
    assert sorted(kept) == [(100.0, 100.0, 0.9), (302.0, 101.0, 0.95)]


def test_densest_region_counts_the_best_window():
    rng = np.random.default_rng(1)
    spread = [tuple(p) for p in rng.uniform(0, 100_000, size=(30, 2))]
    cluster = [(50_000 + dx, 60_000 + dy) for dx, dy in rng.uniform(0, 2000, size=(12, 2))]
    assert densest_region_count(spread + cluster, side0=2000) >= 12
    assert densest_region_count([], 10) == 0
    # brute force agrees on a small case
    pts = [tuple(p) for p in rng.uniform(0, 50, size=(25, 2))]
    brute = max(
        sum(1 for x, y in pts if ax <= x <= ax + 10 and ay <= y <= ay + 10)
        for ax, _ in pts
        for _, ay in pts
    )
    assert densest_region_count(pts, 10) == brute


def test_grading_thresholds_and_region_size():
    g = MitosisGrading()
    assert [g.mitotic_score(c) for c in (0, 7, 8, 14, 15, 40)] == [1, 1, 2, 2, 3, 3]
    assert abs(g.region_side_um() - 1400.0) < 1.0  # 10 x 0.196 mm^2 ~ (1.4 mm)^2


def test_large_point_sets_use_the_grid_and_stay_close():
    from prolifscore.core.grading import mitoses as mitosis

    rng = np.random.default_rng(2)
    pts = [tuple(p) for p in rng.uniform(0, 20_000, size=(1400, 2))]
    exact = densest_region_count(pts, 2000)
    approx = mitosis._grid_count(np.asarray(pts), 2000)
    assert 0.75 * exact <= approx <= exact


def _inside(pts, sq):
    return sum(1 for x, y in pts if sq.x <= x <= sq.x + sq.side and sq.y <= y <= sq.y + sq.side)


def test_densest_region_says_where_the_square_is():
    rng = np.random.default_rng(3)
    spread = [tuple(p) for p in rng.uniform(0, 100_000, size=(30, 2))]
    cluster = [(50_000 + dx, 60_000 + dy) for dx, dy in rng.uniform(0, 2000, size=(12, 2))]
    square = densest_region(spread + cluster, side0=2000)
    assert square is not None and square.side == 2000
    assert square.count == densest_region_count(spread + cluster, 2000)
    assert _inside(spread + cluster, square) == square.count
    assert 48_000 <= square.x <= 52_000 and 58_000 <= square.y <= 62_000  # on the cluster
    region = square.as_region()  # as SlideScore.densest_region carries it
    assert (region.x, region.y, region.width, region.height) == (
        round(square.x),
        round(square.y),
        2000,
        2000,
    )
    assert densest_region([], 10) is None
    # the grid approximation places its square too, holding at least the points it counts
    many = [tuple(p) for p in rng.uniform(0, 20_000, size=(1600, 2))]
    approx = densest_region(many, 2000)
    assert approx is not None and _inside(many, approx) >= approx.count > 0
