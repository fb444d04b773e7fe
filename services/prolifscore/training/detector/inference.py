"""Detection on whole regions, as scoring does it on a tile: the fully convolutional
detector's probability map (`padded_detector`, the exported model), local maxima above a
threshold, non-maximum suppression; the TUPAC counts of those detections and the threshold
with the best F1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from prolifscore.core.grading.matching import Counts, evaluate_regions
from prolifscore.core.grading.mitoses import map_peaks, non_max_suppression
from prolifscore.core.models.contract import MITOSIS_OFFSET, MITOSIS_STRIDE

if TYPE_CHECKING:
    import keras


BORDER_PAD = 32  # > half the receptive field, and a multiple of the stride


def padded_detector(detector: keras.Model, pad: int = BORDER_PAD) -> keras.Model:
    """The detector with its input mirrored by `pad` px on every side and the map cropped
    back: same contract (map [ceil(H/8), ceil(W/8)], cell (i, j) at pixel (8i + 3.5,
    8j + 3.5)), no border artefacts.

    Trained on 64 px patches read at their centre, the plain detector never sees the zero
    padding of its convolutions near a map cell it is asked about, and fires along every
    image border (measured: 0.8-0.95 on the outer two cells of each tile, ~0.01 inside).
    Mirroring keeps the zero padding outside the receptive field of every kept cell. This is
    the model to export and to evaluate. Inputs must be larger than `pad` px.
    """
    import keras
    from keras import ops

    if pad % MITOSIS_STRIDE:
        raise ValueError(f"pad must be a multiple of {MITOSIS_STRIDE}, got {pad}")
    cells = pad // MITOSIS_STRIDE
    inputs = keras.Input((None, None, 3), name="image")
    x = ops.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="reflect")
    outputs = keras.layers.Cropping2D(((cells, cells), (cells, cells)), name="crop")(detector(x))
    return keras.Model(inputs, outputs, name="mitosis_fcn_padded")


def detection_maps(
    detector: keras.Model, images: Sequence[np.ndarray], batch: int = 8
) -> list[np.ndarray]:
    """The detector's probability map [ceil(H/8), ceil(W/8)] per image (same-size images are
    batched). Pass a `padded_detector` to see what scoring will see."""
    from prolifscore.core.models.contract import preprocess_mitosis

    maps: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    for idx in by_shape.values():
        for k in range(0, len(idx), batch):
            chunk = idx[k : k + batch]
            x = preprocess_mitosis(np.stack([images[i] for i in chunk]))
            out = np.asarray(detector.predict_on_batch(x))[..., 0]  # compiled: ~1.5x eager
            for i, m in zip(chunk, out, strict=True):
                maps[i] = m
    return [m for m in maps if m is not None]


def detections_from_map(
    prob_map: np.ndarray, threshold: float, nms_radius_px: float
) -> list[tuple[float, float, float]]:
    """(row, col, probability) detections: the scoring rule (`map_peaks`, then
    `non_max_suppression`), map cell (i, j) at pixel (8i + 3.5, 8j + 3.5)."""
    dets = [
        (MITOSIS_STRIDE * j + MITOSIS_OFFSET, MITOSIS_STRIDE * i + MITOSIS_OFFSET, p)
        for i, j, p in map_peaks(prob_map, threshold)
    ]
    return [(y, x, p) for x, y, p in non_max_suppression(dets, nms_radius_px)]


def detect(
    detector: keras.Model, image: np.ndarray, threshold: float, nms_radius_px: float
) -> list[tuple[float, float, float]]:
    """Mitoses in one uint8 RGB region (any size) as (row, col, probability)."""
    return detections_from_map(detection_maps(detector, [image])[0], threshold, nms_radius_px)


def map_counts(
    maps: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    threshold: float,
    radius_px: float,
    nms_radius_px: float,
) -> Counts:
    """TUPAC counts of the detections in `maps` at `threshold` against `truths` (region i's
    centroids for map i)."""
    return evaluate_regions(
        [detections_from_map(m, threshold, nms_radius_px) for m in maps], list(truths), radius_px
    )


# Probabilities saturate near 1 for the best candidates: finer steps at the top.
THRESHOLDS = (
    *(round(t, 2) for t in np.arange(0.05, 0.951, 0.05)),
    *(0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999),
)


def best_threshold(
    maps: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    radius_px: float,
    nms_radius_px: float,
    candidates: Sequence[float] = THRESHOLDS,
) -> tuple[float, Counts]:
    """The threshold with the best overall F1 (ties: the higher threshold) and its counts."""
    best: tuple[float, float, Counts] | None = None
    for t in candidates:
        counts = map_counts(maps, truths, t, radius_px, nms_radius_px)
        if best is None or counts.f1 >= best[1]:
            best = (t, counts.f1, counts)
    assert best is not None
    return best[0], best[2]
