"""What the detector trains on: each epoch's 64 px patches (positives at the mitoses, negatives
mostly at dark blobs, hard negatives mined from the detector's own false positives), with
flip/rotation, stain and JPEG augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prolifscore.core.models.contract import MITOSIS_PATCH
from prolifscore.training.detector.config import MitosisTrainConfig
from prolifscore.training.detector.inference import detections_from_map
from prolifscore.training.detector.regions import REGION_PAD, Region


def _cut(region: Region, row: float, col: float) -> np.ndarray:
    """The 64 px patch whose centre (pixel 31.5) is nearest (row, col)."""
    pad, size = REGION_PAD, MITOSIS_PATCH
    top = int(np.clip(round(row - (size - 1) / 2), -pad, region.image.shape[0]))
    left = int(np.clip(round(col - (size - 1) / 2), -pad, region.image.shape[1]))
    return region.padded[top + pad : top + pad + size, left + pad : left + pad + size]


def _augment(patch: np.ndarray, rng: np.random.Generator, config: MitosisTrainConfig) -> np.ndarray:
    """Random flip/rot90 (the 8 symmetries: centre stays the centre), per-channel gain, and
    sometimes a JPEG round trip (slides are scanned at various qualities)."""
    k = int(rng.integers(8))
    out = np.rot90(patch[:, ::-1] if k >= 4 else patch, k % 4)
    if config.colour_jitter > 0:
        j = config.colour_jitter
        gain = rng.uniform(1 - j, 1 + j, 3).astype(np.float32)
        out = np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    if rng.random() < config.jpeg_probability:
        import imagecodecs

        lo, hi = config.jpeg_quality_range
        data = imagecodecs.jpeg_encode(
            np.ascontiguousarray(out),
            level=int(rng.integers(lo, hi + 1)),
            subsampling=(2, 2),
            colorspace="RGB",
            outcolorspace="YCBCR",
        )
        out = imagecodecs.jpeg_decode(data)
    return out


@dataclass(frozen=True)
class HardNegative:
    region: int  # index into the training regions
    row: float
    col: float
    probability: float


def sample_patches(
    regions: Sequence[Region],
    config: MitosisTrainConfig,
    rng: np.random.Generator,
    hard: Sequence[HardNegative] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's patches: (uint8 [N,64,64,3], labels [N], loss weights [N]), shuffled.

    Loss weights give positives `positive_share` of the total weight (they are rare).
    """
    exclude = config.match_radius_px
    patches: list[np.ndarray] = []
    labels: list[float] = []
    s = config.max_shift_px
    for region in regions:
        for r, c in region.centroids:
            for _ in range(config.positive_copies):
                dr, dc = rng.uniform(-s, s, 2)
                patches.append(_augment(_cut(region, r + dr, c + dc), rng, config))
                labels.append(1.0)
        tissue, dark = region.negative_candidates(exclude)
        n_dark = min(len(dark), round(config.negatives_per_region * config.dark_negative_share))
        picks = [dark[rng.integers(len(dark), size=n_dark)]] if n_dark else []
        if len(tissue):
            picks.append(
                tissue[rng.integers(len(tissue), size=config.negatives_per_region - n_dark)]
            )
        for r, c in np.concatenate(picks) if picks else ():
            patches.append(_augment(_cut(region, r, c), rng, config))
            labels.append(0.0)
    for h in hard:
        for _ in range(config.hard_negative_copies):
            dr, dc = rng.uniform(-2, 2, 2)
            region = regions[h.region]
            patches.append(_augment(_cut(region, h.row + dr, h.col + dc), rng, config))
            labels.append(0.0)
    x = np.stack(patches)
    y = np.asarray(labels, np.float32)
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    w = np.ones_like(y)
    if n_pos and n_neg:
        share = config.positive_share
        w[y == 1] = share * len(y) / n_pos
        w[y == 0] = (1 - share) * len(y) / n_neg
    order = rng.permutation(len(y))
    return x[order], y[order], w[order]


def mine_hard_negatives(
    maps: Sequence[np.ndarray], regions: Sequence[Region], config: MitosisTrainConfig
) -> list[HardNegative]:
    """Detections matching no mitosis (farther than the TUPAC radius): the most confident
    `hard_negatives_per_region` per region."""
    out: list[HardNegative] = []
    r2 = config.match_radius_px**2
    for k, (m, region) in enumerate(zip(maps, regions, strict=True)):
        dets = detections_from_map(m, config.hard_negative_threshold, config.nms_radius_px)
        fps = [
            d
            for d in dets
            if not any((d[0] - a) ** 2 + (d[1] - b) ** 2 <= r2 for a, b in region.centroids)
        ]
        fps.sort(key=lambda d: -d[2])
        out.extend(HardNegative(k, r, c, p) for r, c, p in fps[: config.hard_negatives_per_region])
    return out
