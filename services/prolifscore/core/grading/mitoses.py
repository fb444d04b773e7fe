"""From mitosis probability maps to a mitotic score.

Detections are local maxima above a threshold, merged across tile borders by non-maximum
suppression; the count in the densest 10-high-power-field region maps to the mitotic score by
the grading thresholds (Elston-Ellis, for a 0.196 mm^2 field: <= 7 -> 1, 8-14 -> 2, >= 15 -> 3).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb


@dataclass(frozen=True)
class MitosisGrading:
    threshold: float = 0.5
    nms_radius_um: float = 8.0  # a mitotic figure is ~10 um across
    hpf_area_mm2: float = 0.196
    score_thresholds: tuple[int, int] = (7, 14)  # counts per 10 HPF: <= a -> 1, <= b -> 2, else 3

    def mitotic_score(self, count_per_10hpf: float) -> int:
        low, high = self.score_thresholds
        return 1 if count_per_10hpf <= low else 2 if count_per_10hpf <= high else 3

    def region_side_um(self) -> float:
        """Side of the square covering 10 high-power fields."""
        return math.sqrt(10 * self.hpf_area_mm2) * 1000.0


def map_peaks(prob_map: np.ndarray, threshold: float) -> list[tuple[float, float, float]]:
    """(row, col, probability) of the map's local maxima (3 x 3) at or above `threshold`, one
    per plateau: cells tied at a maximum that touch (8-connected) are one peak at their centre.
    A bf16 model rounds values near 1 to a few steps, so a figure's top becomes a plateau of
    several cells, further apart than non-maximum suppression's radius; counted cell by cell,
    bf16 served 46 -> 66 mitoses on one trained-model slide (bench/validate.json served_bf16)."""
    if prob_map.size == 0:
        return []
    peaks = (prob_map == ndi.maximum_filter(prob_map, size=3, mode="constant")) & (
        prob_map >= threshold
    )
    labels, count = ndi.label(peaks, structure=np.ones((3, 3), bool))
    if not count:
        return []
    index = np.arange(1, count + 1)
    centres = ndi.center_of_mass(peaks, labels, index)
    values = ndi.maximum(prob_map, labels, index)  # a plateau's cells share one value
    return [(float(i), float(j), float(p)) for (i, j), p in zip(centres, values, strict=True)]


def tile_detections(
    prob_map: np.ndarray, tile: pb.Tile, spec: pb.ResolvedSpec, threshold: float
) -> list[tuple[float, float, float]]:
    """`map_peaks` of one tile's map as (x0, y0, probability) in level-0 pixels."""
    if prob_map.size == 0:
        return []
    step = spec.tile_size / prob_map.shape[0] * spec.footprint0 / spec.tile_size
    return [
        (tile.x + (j + 0.5) * step, tile.y + (i + 0.5) * step, p)
        for i, j, p in map_peaks(prob_map, threshold)
    ]


def non_max_suppression(
    dets: list[tuple[float, float, float]], radius0: float
) -> list[tuple[float, float, float]]:
    """Greedy: keep the most probable, drop others within `radius0` (grid-bucketed)."""
    kept: list[tuple[float, float, float]] = []
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
    cell = max(radius0, 1.0)
    r2 = radius0 * radius0
    for x, y, p in sorted(dets, key=lambda d: -d[2]):
        cx, cy = int(x // cell), int(y // cell)
        near = (
            q for dx in (-1, 0, 1) for dy in (-1, 0, 1) for q in grid.get((cx + dx, cy + dy), ())
        )
        if any((x - qx) ** 2 + (y - qy) ** 2 <= r2 for qx, qy in near):
            continue
        kept.append((x, y, p))
        grid.setdefault((cx, cy), []).append((x, y))
    return kept


EXACT_LIMIT = 1500


@dataclass(frozen=True)
class DenseSquare:
    """The densest axis-aligned square: its mitosis count and where it lies (level-0 pixels,
    top-left corner and side), so that a viewer can show the region that set the score."""

    count: int
    x: float
    y: float
    side: float

    def as_region(self) -> spb.Region:
        """The square as `SlideScore.densest_region` (level-0 pixels, rounded)."""
        side = round(self.side)
        return spb.Region(x=round(self.x), y=round(self.y), width=side, height=side)


def densest_region(points: list[tuple[float, float]], side0: float) -> DenseSquare | None:
    """The square of side `side0` holding the most points (None without points).

    Exact (O(n^2 log n)) up to EXACT_LIMIT points; beyond, windows snap to a grid of side/4
    cells (can undercount by the points in one border strip), which keeps an untrained or
    noisy detector on a large slide from stalling the service.
    """
    if not points:
        return None
    if len(points) > EXACT_LIMIT:
        return _grid_square(np.asarray(points, np.float64), side0)
    pts = sorted(points)
    xs = [p[0] for p in pts]
    best = DenseSquare(0, 0.0, 0.0, side0)
    for i, (x_left, _) in enumerate(pts):
        j = bisect.bisect_right(xs, x_left + side0)
        ys = sorted(p[1] for p in pts[i:j])
        lo = 0
        for hi, y in enumerate(ys):
            while y - ys[lo] > side0:
                lo += 1
            if hi - lo + 1 > best.count:
                best = DenseSquare(hi - lo + 1, x_left, ys[lo], side0)
    return best


def densest_region_count(points: list[tuple[float, float]], side0: float) -> int:
    """Most points inside any axis-aligned square of side `side0` (see `densest_region`)."""
    square = densest_region(points, side0)
    return square.count if square else 0


def _grid_square(pts: np.ndarray, side0: float, cells: int = 4) -> DenseSquare:
    cell = side0 / cells
    origin = pts.min(axis=0)
    ij = np.floor((pts - origin) / cell).astype(np.int64)
    grid = np.zeros(ij.max(axis=0) + cells + 1, np.int64)
    np.add.at(grid, (ij[:, 0], ij[:, 1]), 1)
    integral = np.pad(grid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = (
        integral[cells:, cells:]
        - integral[:-cells, cells:]
        - integral[cells:, :-cells]
        + integral[:-cells, :-cells]
    )
    i, j = np.unravel_index(int(win.argmax()), win.shape)
    return DenseSquare(
        int(win[i, j]), float(origin[0] + i * cell), float(origin[1] + j * cell), side0
    )


def _grid_count(pts: np.ndarray, side0: float, cells: int = 4) -> int:
    return _grid_square(pts, side0, cells).count
