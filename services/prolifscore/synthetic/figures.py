"""Planted figures with known positions on real H&E tissue (0.5 um/px):

- a mitosis figure is a dark, compact, irregular chromatin clump (prophase/metaphase clump,
  metaphase plate, anaphase pair of plates, telophase pair of clumps), 14-24 px = 7-12 um
  across, near-black blue-purple with granular texture, rough edges, slight blur and often a
  pale cytoplasm halo;
- "mimics" are planted too and never labelled: smooth, round, smaller and less dark nuclei
  (lymphocyte / pyknotic look), the classic false positives, so that a detector has to learn
  shape and size as well as darkness (the tissue's own dark nuclei are further confounders).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from prolifscore.core.wsi.tissue import od_tissue_mask

MIMICS_PER_MM2 = 40.0  # unlabelled mitosis look-alikes (dark round nuclei)
# What every synthetic data set says about itself in its metadata.
SYNTHETIC_NOTE = "planted mitosis-like figures on real tissue: a machinery check, not TUPAC16 data"


def area_mm2(shape: tuple[int, ...], mpp: float) -> float:
    """The area of an image of `shape` at `mpp`: what a density per mm^2 is multiplied by."""
    return shape[0] * shape[1] * (mpp / 1000.0) ** 2


def _ellipse_field(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float
) -> np.ndarray:
    """1 at the ellipse centre, 0 on its rim, negative outside."""
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return 1.0 - np.sqrt((u / rx) ** 2 + (v / ry) ** 2)


def _figure_blobs(rng: np.random.Generator, size: float) -> list[tuple[float, ...]]:
    """Ellipses (cy, cx, ry, rx, angle) around (0, 0) making one mitotic figure of ~`size` px."""
    half = size / 2
    kind = rng.choice(["clump", "plate", "anaphase", "telophase"], p=[0.4, 0.3, 0.15, 0.15])
    blobs: list[tuple[float, ...]] = []

    def clump(cy: float, cx: float, radius: float, n: int) -> None:
        for _ in range(n):
            r = radius * math.sqrt(rng.uniform(0, 0.5))
            t = rng.uniform(0, 2 * math.pi)
            blobs.append(
                (
                    cy + r * math.sin(t),
                    cx + r * math.cos(t),
                    radius * rng.uniform(0.35, 0.6),
                    radius * rng.uniform(0.35, 0.6),
                    rng.uniform(0, math.pi),
                )
            )

    def plate(cy: float, cx: float, length: float, width: float) -> None:
        blobs.append((cy, cx, width, length, 0.0))
        for _ in range(int(rng.integers(2, 5))):  # chromosome arms sticking out
            t = rng.uniform(-0.8, 0.8) * length
            blobs.append(
                (
                    cy + rng.normal(0, width * 0.5),
                    cx + t,
                    width * rng.uniform(0.6, 1.0),
                    width * rng.uniform(0.8, 1.6),
                    rng.uniform(0, math.pi),
                )
            )

    if kind == "clump":
        clump(0.0, 0.0, half, int(rng.integers(4, 8)))
    elif kind == "plate":
        plate(0.0, 0.0, half, rng.uniform(2.2, 3.5))
    elif kind == "anaphase":
        gap = rng.uniform(0.25, 0.4) * size
        for sign in (-1, 1):
            plate(sign * gap / 2, 0.0, half * rng.uniform(0.7, 0.9), rng.uniform(2.2, 3.2))
    else:
        gap = rng.uniform(0.3, 0.45) * size
        for sign in (-1, 1):
            clump(sign * gap / 2, 0.0, half * 0.55, int(rng.integers(3, 5)))
    angle = rng.uniform(0, math.pi)  # rotate the whole figure
    c, s = math.cos(angle), math.sin(angle)
    return [(cx * s + cy * c, cx * c - cy * s, ry, rx, a + angle) for cy, cx, ry, rx, a in blobs]


def _mitosis_alpha(rng: np.random.Generator, window: int) -> np.ndarray:
    """Soft mask [window, window] of one irregular figure centred in the window."""
    size = rng.uniform(14.0, 24.0)
    yy, xx = np.mgrid[0:window, 0:window].astype(np.float32) - (window - 1) / 2
    field = np.full((window, window), -np.inf, np.float32)
    for cy, cx, ry, rx, a in _figure_blobs(rng, size):
        field = np.maximum(field, _ellipse_field(yy, xx, cy, cx, ry, rx, a))
    noise = ndi.gaussian_filter(rng.normal(size=(window, window)).astype(np.float32), 1.0)
    noise /= noise.std() + 1e-6
    mask = (field + 0.22 * noise > 0).astype(np.float32)  # rough, hairy rim
    return ndi.gaussian_filter(mask, rng.uniform(0.5, 0.8))


def _mimic_alpha(rng: np.random.Generator, window: int) -> np.ndarray:
    """Soft mask of a smooth round nucleus, 7-11 px across."""
    d = rng.uniform(7.0, 11.0)
    yy, xx = np.mgrid[0:window, 0:window].astype(np.float32) - (window - 1) / 2
    field = _ellipse_field(
        yy, xx, 0.0, 0.0, d / 2, d / 2 * rng.uniform(0.8, 1.2), rng.uniform(0, 3)
    )
    return ndi.gaussian_filter((field > 0).astype(np.float32), 0.8)


def _composite(
    image: np.ndarray, top: int, left: int, alpha: np.ndarray, colour: np.ndarray
) -> None:
    """Alpha-blend a (textured) colour into uint8 `image` at (top, left), in place."""
    h, w = alpha.shape
    window = image[top : top + h, left : left + w]
    a = alpha[..., None]
    blended = window.astype(np.float32) * (1.0 - a) + a * colour
    window[...] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _textured(rng: np.random.Generator, base: np.ndarray, window: int, grain: float) -> np.ndarray:
    """Per-pixel colour: `base` with granular (chromatin-like) brightness variation."""
    g = ndi.gaussian_filter(rng.normal(size=(window, window)).astype(np.float32), 0.7)
    g /= g.std() + 1e-6
    return np.clip(base[None, None, :] * (1.0 + grain * g[..., None]), 0, 255)


_CELL = 4  # planting masks are computed on 4 x 4 px cells: whole slides in milliseconds


# Figures go where they can be seen: tissue whose local brightness (mean RGB over ~24 px) is
# at least this. Figures are ~20-40; the darkest cmu stroma and keratin (~70-100, 28% of its
# tissue, 4% of the TCGA slide's) would hide them, and an annotator would not mark them there.
MIN_BACKGROUND = 110.0


def _planting_cells(tile: np.ndarray, min_background: float = 0.0) -> np.ndarray:
    """Cells where a figure may sit: mostly tissue (OD mask), small gaps closed, about 8 px
    inside the tissue (not on a fibre's edge), and locally at least `min_background` bright."""
    h, w = (tile.shape[0] // _CELL) * _CELL, (tile.shape[1] // _CELL) * _CELL
    share = od_tissue_mask(tile[:h, :w]).reshape(h // _CELL, _CELL, w // _CELL, _CELL)
    cells = share.mean(axis=(1, 3)) >= 0.5
    cells = ndi.binary_closing(cells, iterations=1)
    cells = ndi.binary_erosion(cells, iterations=2, border_value=0)
    if min_background > 0:
        gray = tile[:h, :w].astype(np.float32).mean(axis=2)
        local = gray.reshape(h // _CELL, _CELL, w // _CELL, _CELL).mean(axis=(1, 3))
        cells &= ndi.uniform_filter(local, size=24 // _CELL) >= min_background
    return cells


def _positions(
    cells: np.ndarray,
    count: int,
    rng: np.random.Generator,
    *,
    shape: tuple[int, ...],
    margin: int,
    min_distance: float,
    avoid: Sequence[tuple[float, float]] = (),
    avoid_distance: float = 0.0,
) -> list[tuple[int, int]]:
    """Up to `count` pixels in planting `cells`, `margin` from the border of an image of
    `shape`, `min_distance` apart and `avoid_distance` from `avoid` (fewer when the tissue
    cannot hold more)."""
    flat = np.flatnonzero(cells)
    if len(flat) == 0 or count <= 0:
        return []
    chosen: list[tuple[int, int]] = []
    tries = max(50 * count, 200)
    picks = flat[rng.integers(len(flat), size=tries)]
    offsets = rng.integers(_CELL, size=(tries, 2))
    for idx, (dr, dc) in zip(picks, offsets, strict=True):
        i, j = divmod(int(idx), cells.shape[1])
        r, c = i * _CELL + int(dr), j * _CELL + int(dc)
        if not (margin <= r < shape[0] - margin and margin <= c < shape[1] - margin):
            continue
        if any((r - a) ** 2 + (c - b) ** 2 < min_distance**2 for a, b in chosen):
            continue
        if any((r - a) ** 2 + (c - b) ** 2 < avoid_distance**2 for a, b in avoid):
            continue
        chosen.append((r, c))
        if len(chosen) == count:
            break
    return chosen


def plant_mitoses(
    tile: np.ndarray,
    count: int,
    rng: np.random.Generator,
    *,
    min_distance: float = 40.0,
    margin: int = 16,
    halo_probability: float = 0.6,
    avoid: Sequence[tuple[float, float]] = (),
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Plant up to `count` mitosis-like figures on the tissue of a uint8 RGB `tile` (0.5 um/px).

    Returns the new tile and each figure's (row, col) centroid (alpha-weighted: the centre of
    its chromatin, as annotators click it). Figures lie on tissue, `min_distance` px apart and
    from `avoid`; fewer than `count` are planted when the tissue cannot hold them.
    """
    window = 40
    spots = _positions(
        _planting_cells(tile, MIN_BACKGROUND),
        count,
        rng,
        shape=tile.shape,
        margin=max(margin, window // 2),
        min_distance=min_distance,
        avoid=avoid,
        avoid_distance=min_distance,
    )
    out = np.array(tile, dtype=np.uint8, copy=True)
    centroids: list[tuple[float, float]] = []
    yy, xx = np.mgrid[0:window, 0:window]
    for r, c in spots:
        top, left = r - window // 2, c - window // 2
        alpha = _mitosis_alpha(rng, window) * rng.uniform(0.88, 1.0)
        if rng.random() < halo_probability:  # pale cytoplasm around the chromatin
            ring = np.clip(ndi.gaussian_filter(alpha, 4.0) * 2.2, 0, 1) * rng.uniform(0.25, 0.5)
            halo = np.array([rng.uniform(215, 240), rng.uniform(190, 215), 230.0], np.float32)
            _composite(out, top, left, ring, halo)
        base = np.array([rng.uniform(10, 40), rng.uniform(4, 22), rng.uniform(25, 60)], np.float32)
        _composite(out, top, left, alpha, _textured(rng, base, window, 0.18))
        weight = alpha.sum()
        centroids.append(
            (top + float((alpha * yy).sum() / weight), left + float((alpha * xx).sum() / weight))
        )
    return out, centroids


def plant_mimics(
    tile: np.ndarray,
    count: int,
    rng: np.random.Generator,
    *,
    avoid: Sequence[tuple[float, float]] = (),
    avoid_distance: float = 24.0,
) -> np.ndarray:
    """Plant unlabelled look-alikes: smooth round dark nuclei, 7-11 px, less dark than
    mitoses, at least `avoid_distance` px from every centroid in `avoid`."""
    window = 24
    spots = _positions(
        _planting_cells(tile),
        count,
        rng,
        shape=tile.shape,
        margin=window // 2,
        min_distance=16.0,
        avoid=avoid,
        avoid_distance=avoid_distance,
    )
    out = np.array(tile, dtype=np.uint8, copy=True)
    for r, c in spots:
        base = np.array(
            [rng.uniform(60, 100), rng.uniform(40, 75), rng.uniform(95, 140)], np.float32
        )
        alpha = _mimic_alpha(rng, window) * rng.uniform(0.8, 0.95)
        _composite(out, r - window // 2, c - window // 2, alpha, _textured(rng, base, window, 0.06))
    return out
