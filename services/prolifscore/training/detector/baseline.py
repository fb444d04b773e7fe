"""The darkness baseline: what a "dark blob = mitosis" rule achieves (local maxima of smoothed
darkness above a threshold tuned on the training cases), reported beside the detector's F1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from prolifscore.core.grading.matching import Counts, evaluate_regions
from prolifscore.core.grading.mitoses import non_max_suppression
from prolifscore.training.detector.config import MitosisTrainConfig
from prolifscore.training.detector.regions import Region


def darkness_candidates(image: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """[n, 3] (row, col, darkness): local maxima (9 px) of smoothed darkness, 255 - mean RGB."""
    dark = 255.0 - ndi.gaussian_filter(image.astype(np.float32).mean(axis=2), sigma)
    rc = np.argwhere(dark == ndi.maximum_filter(dark, size=9))
    return np.column_stack([rc, dark[rc[:, 0], rc[:, 1]]]) if len(rc) else np.zeros((0, 3))


def _threshold_candidates(
    cands: np.ndarray, threshold: float, nms_radius_px: float
) -> list[tuple[float, float, float]]:
    dets = [(float(c), float(r), float(d) / 255.0) for r, c, d in cands[cands[:, 2] >= threshold]]
    return [(y, x, p) for x, y, p in non_max_suppression(dets, nms_radius_px)]


def darkness_detections(
    image: np.ndarray, threshold: float, nms_radius_px: float, sigma: float = 3.0
) -> list[tuple[float, float, float]]:
    """Baseline detector: local maxima of smoothed darkness above `threshold` (0-255), then
    the same NMS. What a "dark blob = mitosis" rule achieves."""
    return _threshold_candidates(darkness_candidates(image, sigma), threshold, nms_radius_px)


def darkness_baseline(
    train: Sequence[Region], held_out: Sequence[Region], config: MitosisTrainConfig
) -> dict[str, float | int]:
    """The darkness baseline with its threshold chosen on `train`, scored on `held_out`."""
    radius, nms = config.match_radius_px, config.nms_radius_px

    def counts(regions: Sequence[Region], cands: list[np.ndarray], t: float) -> Counts:
        return evaluate_regions(
            [_threshold_candidates(c, t, nms) for c in cands],
            [r.centroids for r in regions],
            radius,
        )

    train_cands = [darkness_candidates(r.image) for r in train]
    best_t, best_f1 = 0.0, -1.0
    for t in range(120, 241, 10):
        f1 = counts(train, train_cands, t).f1
        if f1 >= best_f1:
            best_t, best_f1 = float(t), f1
    held_cands = [darkness_candidates(r.image) for r in held_out]
    return {"threshold": best_t, **counts(held_out, held_cands, best_t).summary()}
