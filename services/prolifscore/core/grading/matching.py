"""Mitosis detection evaluation with the TUPAC16 rule.

A detection is a true positive when it lies within 30 px of a ground-truth centroid at
0.25 um/px (7.5 um) that no other detection has claimed; every other detection is a false
positive and every unclaimed centroid a false negative. Who claims whom is a maximum
one-to-one matching (`match_pairs` says why), so the counts are deterministic. Counts are summed
over regions before precision, recall and F1 are computed (the challenge's "overall F1", not a
mean of per-region F1s, which empty regions would make undefined).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

TUPAC_RADIUS_PX = 30.0
TUPAC_MPP = 0.25

Point = Sequence[float]  # (row, col) or (row, col, probability)
Pair = tuple[int, int]  # (detection index, centroid index)


def match_radius_px(mpp: float) -> float:
    """The TUPAC matching radius (7.5 um) in pixels at `mpp` (15 px at 0.5 um/px)."""
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return TUPAC_RADIUS_PX * TUPAC_MPP / mpp


@dataclass(frozen=True)
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        """1.0 when nothing was detected (no false claim was made)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """1.0 when there was nothing to find."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 1.0 for a region with neither mitoses nor detections."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    def summary(self) -> dict[str, float | int]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


def match_pairs(pred: Sequence[Point], truth: Sequence[Point], radius_px: float) -> list[Pair]:
    """The one-to-one (detection, centroid) index pairs that count as true positives.

    A pair qualifies when the detection lies within `radius_px` of the centroid (distance <=
    radius). The challenge states the rule per detection ("within 30 px of a centroid no
    other detection has claimed") without saying in which order detections claim, and a
    greedy order can lose a true positive: a detection equidistant to two centroids may take
    the one another detection needed. So the pairs are a maximum matching: as many as any
    claiming order could reach, then the smallest total distance, over points sorted by
    (row, col), so neither the files' row order nor confidences (which the challenge's
    evaluation ignores) change the count or the pairs.
    """
    d, t = _rows_cols(pred), _rows_cols(truth)
    if not len(d) or not len(t):
        return []
    near = cKDTree(t).query_ball_point(d, radius_px)
    rows = sorted((i for i in range(len(d)) if near[i]), key=lambda i: (d[i, 0], d[i, 1], i))
    if not rows:
        return []
    cols = sorted({j for i in rows for j in near[i]}, key=lambda j: (t[j, 0], t[j, 1], j))
    neighbours = [set(near[i]) for i in rows]
    within = np.array([[j in n for j in cols] for n in neighbours], bool).reshape(len(rows), -1)
    dist = np.hypot(*(d[rows][:, None, :] - t[cols][None, :, :]).transpose(2, 0, 1))
    # Any pair outside the radius costs more than every in-radius pair together, so the
    # cheapest assignment has the most in-radius pairs first, the shortest distances second.
    outside = radius_px * (min(len(rows), len(cols)) + 1) + 1.0
    r_idx, c_idx = linear_sum_assignment(np.where(within, dist, outside))
    return sorted((rows[a], cols[b]) for a, b in zip(r_idx, c_idx, strict=True) if within[a, b])


def evaluate_detections(pred: Sequence[Point], truth: Sequence[Point], radius_px: float) -> Counts:
    """TP/FP/FN of one region under the TUPAC rule (`match_pairs`): every detection matched
    to no centroid is a false positive, every centroid matched to no detection a false
    negative."""
    tp = len(match_pairs(pred, truth, radius_px))
    return Counts(tp, len(pred) - tp, len(truth) - tp)


def _rows_cols(points: Sequence[Point]) -> np.ndarray:
    return np.asarray([p[:2] for p in points], np.float64).reshape(-1, 2)


def aggregate(counts: Iterable[Counts]) -> Counts:
    """Sum of per-region counts (the basis of the overall precision, recall and F1)."""
    total = Counts()
    for c in counts:
        total = total + c
    return total


def evaluate_regions(
    preds: Sequence[Sequence[Point]], truths: Sequence[Sequence[Point]], radius_px: float
) -> Counts:
    """Overall counts over regions (`preds[i]` and `truths[i]` belong to region i)."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} prediction lists for {len(truths)} regions")
    return aggregate(
        evaluate_detections(p, t, radius_px) for p, t in zip(preds, truths, strict=True)
    )
