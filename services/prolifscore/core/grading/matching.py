"""Mitosis detection evaluation with the TUPAC16 rule.

A detection is a true positive when it lies within 30 px of a ground-truth centroid at
0.25 um/px (7.5 um) that no other detection has claimed; every other detection is a false
positive and every unclaimed centroid a false negative. Counts are summed over regions before
precision, recall and F1 are computed (the challenge's "overall F1", not a mean of per-region
F1s, which empty regions would make undefined).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

TUPAC_RADIUS_PX = 30.0
TUPAC_MPP = 0.25

Point = Sequence[float]  # (row, col) or (row, col, probability)


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


def evaluate_detections(pred: Sequence[Point], truth: Sequence[Point], radius_px: float) -> Counts:
    """TP/FP/FN of one region. Each ground-truth centroid is matched at most once.

    With probabilities (third element of every `pred`), detections claim centroids in order
    of decreasing confidence, each taking its nearest unclaimed centroid within the radius
    (as the challenge's evaluation does). Without, all detection-centroid pairs within the
    radius are taken greedily by increasing distance.
    """
    if not len(pred) or not len(truth):
        return Counts(0, len(pred), len(truth))
    d = np.asarray([p[:2] for p in pred], np.float64)
    t = np.asarray([p[:2] for p in truth], np.float64)
    tree = cKDTree(t)
    claimed = np.zeros(len(t), bool)
    tp = 0
    if all(len(p) > 2 for p in pred):
        order = np.argsort([-float(p[2]) for p in pred], kind="stable")
        for i in order:
            for j in sorted(tree.query_ball_point(d[i], radius_px), key=lambda j: _d2(d[i], t[j])):
                if not claimed[j]:
                    claimed[j] = True
                    tp += 1
                    break
    else:
        pairs = cKDTree(d).sparse_distance_matrix(tree, radius_px, output_type="ndarray")
        used = np.zeros(len(d), bool)
        for k in np.argsort(pairs["v"], kind="stable"):
            i, j = int(pairs["i"][k]), int(pairs["j"][k])
            if not used[i] and not claimed[j]:
                used[i] = claimed[j] = True
                tp += 1
    return Counts(tp, len(d) - tp, len(t) - tp)


def _d2(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum())


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
