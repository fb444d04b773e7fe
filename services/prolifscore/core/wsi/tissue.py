"""Tissue detection: a low-resolution coverage map per slide and per-tile criteria.

A pixel is tissue by the optical-density rule of `od` (OD >= beta in every channel), the same
rule the stain fits use.

Two per-tile criteria, chosen by the public tissue mode: `FastCriterion` (mode `fast`) and the
reference study's test, `reference_keep` (mode `seed`: the public name means the reference
(seed) study's per-tile test, not a random seed).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from prolifscore.core.wsi.od import BETA, od_tissue_mask
from prolifscore.core.wsi.prefetch import prefetched
from prolifscore.core.wsi.slide import Slide

# A mask pixel (~16 x 16 full-resolution pixels) counts as tissue when this share of its pixels
# is. The reference study's full-resolution test closes and dilates the OD mask, which turns a
# tile of scattered stained pixels into solid tissue; a low share per block mimics that at low
# cost. Chosen on the shared slides: Jaccard 0.86 / 0.96 with the reference study's set before
# borderline checks.
BLOCK_TISSUE_MIN = 0.1
MIN_BLOCK = 4  # source pixels per mask pixel side, at least


@dataclass
class CoverageMap:
    """Tissue fraction per mask pixel, `downsample` level-0 pixels per mask pixel.

    `thumbnail` is an RGB image at the same resolution (strided samples, not averages,
    so stain colours stay unmixed for the per-slide stain fit).
    """

    fraction: np.ndarray  # float32 [H, W] in [0, 1]
    downsample: float
    thumbnail: np.ndarray  # uint8 [H, W, 3]
    block_min: float = BLOCK_TISSUE_MIN
    offset: tuple[int, int] = (0, 0)  # (x, y) of fraction[0, 0] in the whole slide's mask grid

    def __post_init__(self) -> None:
        h, w = self.fraction.shape
        integral = np.zeros((h + 1, w + 1), np.int32)  # int32: 4x less than float64 on 50k slides
        np.cumsum(self.fraction >= self.block_min, axis=0, dtype=np.int32, out=integral[1:, 1:])
        np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
        self._integral = integral

    def coverage(self, x: int, y: int, size0: int) -> float:
        """Share of tissue mask pixels in the level-0 square (x, y, size0), O(1)."""
        h, w = self.fraction.shape
        (ox, oy), ds = self.offset, self.downsample
        x0 = min(w, max(0, round(x / ds) - ox))
        y0 = min(h, max(0, round(y / ds) - oy))
        x1 = min(w, max(x0 + 1, round((x + size0) / ds) - ox))
        y1 = min(h, max(y0 + 1, round((y + size0) / ds) - oy))
        if x0 >= w or y0 >= h:
            return 0.0
        s = self._integral
        total = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return float(total / ((y1 - y0) * (x1 - x0)))

    def coverages(self, xs: np.ndarray, ys: np.ndarray, size0: int) -> np.ndarray:
        """`coverage` for many squares at once (a 50k slide has ~40k grid tiles)."""
        h, w = self.fraction.shape
        (ox, oy), ds = self.offset, self.downsample
        x0 = np.clip(np.round(xs / ds) - ox, 0, w).astype(np.int64)
        y0 = np.clip(np.round(ys / ds) - oy, 0, h).astype(np.int64)
        x1 = np.minimum(w, np.maximum(x0 + 1, np.round((xs + size0) / ds) - ox)).astype(np.int64)
        y1 = np.minimum(h, np.maximum(y0 + 1, np.round((ys + size0) / ds) - oy)).astype(np.int64)
        s = self._integral
        total = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        area = np.maximum(1, (y1 - y0) * (x1 - x0))
        return np.where((x0 >= w) | (y0 >= h), 0.0, total / area)


def compute_coverage_map(
    slide: Slide,
    mask_downsample: float,
    beta: float = BETA,
    strip_bytes: int = 64 << 20,
    threads: int = 2,
    region: tuple[int, int, int, int] | None = None,
) -> CoverageMap:
    """Read the coarsest adequate level in horizontal strips and reduce to mask resolution.

    Each mask pixel is the tissue share of at least MIN_BLOCK x MIN_BLOCK source pixels: read
    at the mask resolution itself, a block would be one averaged colour, and faint or
    scattered tissue would vanish from the mask (seen on a real-size pyramid: 56% of the
    reference study's tiles never became candidates). Streaming in strips keeps memory bounded
    on 50k x 50k slides. When the pyramid has no level near that resolution (single-level
    slides), the scanner's associated thumbnail is used instead: decoding a small JPEG beats
    decoding the whole slide at full resolution. `threads` strips are decoded at once
    (OpenSlide releases the GIL; decoding is most of the time on a large slide), so at most
    `threads` + 1 strips are in memory.

    `region` (level-0 x0, y0, x1, y1) limits the map to the mask pixels that squares inside it
    touch (`offset` places them in the whole slide's mask grid, so coverages are the same as
    the whole map's): scoring a small region of a 50k slide need not scan all of its tissue.
    """
    source_ds = mask_downsample / MIN_BLOCK
    level = 0
    for i, ds in enumerate(slide.level_downsamples):
        if ds <= source_ds * 1.01 and ds >= slide.level_downsamples[level]:
            level = i
    ds = slide.level_downsamples[level]
    if ds * 2 <= source_ds:
        thumb_map = _coverage_from_thumbnail(slide, mask_downsample, ds, beta)
        if thumb_map is not None:
            h, w = thumb_map.fraction.shape
            x0, y0, x1, y1 = _mask_window(w, h, thumb_map.downsample, region)
            return replace(
                thumb_map,
                fraction=thumb_map.fraction[y0:y1, x0:x1],
                thumbnail=thumb_map.thumbnail[y0:y1, x0:x1],
                offset=(x0, y0),
            )
    k = max(1, round(mask_downsample / ds))
    lw, lh = slide.level_dimensions[level]
    mx0, my0, mx1, my1 = _mask_window(max(1, lw // k), max(1, lh // k), ds * k, region)
    out_w, out_h = mx1 - mx0, my1 - my0
    fraction = np.zeros((out_h, out_w), np.float32)
    thumb = np.full((out_h, out_w, 3), 255, np.uint8)
    rows_per_strip = max(1, strip_bytes // max(1, out_w * k * 4 * k)) * k
    tops = range(0, out_h * k, rows_per_strip)

    def read(top: int) -> np.ndarray:
        height = min(rows_per_strip, out_h * k - top)
        return slide.read(
            round(mx0 * k * ds), round((my0 * k + top) * ds), level, out_w * k, height
        )

    # Reader threads decode the next strips while this thread reduces the current one.
    threads = max(1, threads)
    with ThreadPoolExecutor(threads, thread_name_prefix="coverage-reader") as pool:
        for top, rgb in prefetched(tops, read, pool, threads):
            r0, r1 = top // k, (top + rgb.shape[0]) // k
            fraction[r0:r1], thumb[r0:r1] = _reduce(rgb, k, beta)
            del rgb
    return CoverageMap(fraction=fraction, downsample=ds * k, thumbnail=thumb, offset=(mx0, my0))


def _mask_window(
    width: int, height: int, ds: float, region: tuple[int, int, int, int] | None
) -> tuple[int, int, int, int]:
    """Mask pixels [x0, x1) x [y0, y1) of a width x height mask (`ds` level-0 px each) that
    `CoverageMap.coverages` reads for squares inside `region`: the whole mask without one."""
    if region is None:
        return 0, 0, width, height
    x0, y0, x1, y1 = region
    mx0 = min(width - 1, max(0, math.floor(x0 / ds)))
    my0 = min(height - 1, max(0, math.floor(y0 / ds)))
    return (
        mx0,
        my0,
        max(mx0 + 1, min(width, math.ceil(x1 / ds) + 1)),
        max(my0 + 1, min(height, math.ceil(y1 / ds) + 1)),
    )


def _reduce(rgb: np.ndarray, k: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """k x k blocks of an RGB strip -> (tissue fraction per block, one sampled pixel per block)."""
    h, w = rgb.shape[0] // k, rgb.shape[1] // k
    tissue = od_tissue_mask(rgb[: h * k, : w * k], beta).view(np.uint8)
    # Counts per k x k block as sums of strided views (a reduction over axes (1, 3) of the
    # 4-d view is several times slower); counts / k^2 equal the float32 mean exactly.
    dtype = np.uint8 if k * k < 256 else np.int32
    cols = np.zeros((h * k, w), dtype)
    for dx in range(k):
        cols += tissue[:, dx : w * k : k]
    counts = np.zeros((h, w), dtype)
    for dy in range(k):
        counts += cols[dy : h * k : k]
    fraction = counts.astype(np.float32) / np.float32(k * k)
    return fraction, rgb[k // 2 : h * k : k, k // 2 : w * k : k]


def _coverage_from_thumbnail(
    slide: Slide, mask_downsample: float, finest_ds: float, beta: float
) -> CoverageMap | None:
    thumb = slide.associated_rgb("thumbnail")
    if thumb is None:
        return None
    ds = slide.dimensions[0] / thumb.shape[1]
    if not finest_ds < ds <= mask_downsample / MIN_BLOCK * 1.05:
        return None
    k = max(1, round(mask_downsample / ds))
    fraction, sampled = _reduce(thumb, k, beta)
    return CoverageMap(fraction=fraction, downsample=ds * k, thumbnail=sampled)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


@functools.cache
def _disk_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """(dy, dx) of the disk's pixels in a (2r+1)^2 window, the centre left out."""
    r = radius
    return tuple(
        (int(dy), int(dx))
        for dy, dx in zip(*np.nonzero(_disk(r)), strict=True)
        if dy != r or dx != r
    )


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Same result as ndi.binary_fill_holes, via one labelling pass instead of iterated
    dilations (several times faster on mostly-background tiles)."""
    background, count = ndi.label(~mask)
    border = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    filled = np.ones(count + 1, bool)  # per label: filled? (0 = the mask itself: yes)
    filled[border[border > 0]] = False  # background reaching the border stays background
    return filled[background]  # a table lookup instead of np.isin's sort


def _morph(mask: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    """Binary dilation / erosion by a disk as OR / AND of shifted views, with scikit-image's
    borders: dilation sees outside the tile as background, erosion as foreground (skimage's
    binary_erosion uses border_value=True), so a tissue edge at the tile border is not eaten
    away. Same result as skimage.morphology.binary_dilation / binary_erosion with disk(r),
    which the reference study called, ~20x faster on a 256 px tile."""
    r = radius
    h, w = mask.shape
    padded = np.full((h + 2 * r, w + 2 * r), not dilate)
    padded[r : r + h, r : r + w] = mask
    out = padded[r : r + h, r : r + w].copy()
    combine = np.logical_or if dilate else np.logical_and
    for dy, dx in _disk_offsets(r):
        combine(out, padded[dy : dy + h, dx : dx + w], out=out)
    return out


def _close_dilate_fill(mask: np.ndarray, radius: int) -> np.ndarray:
    closed = _morph(_morph(mask, radius, dilate=True), radius, dilate=False)
    return _fill_holes(_morph(closed, radius, dilate=True))


def od_morph_fraction(tile: np.ndarray, beta: float = BETA) -> float:
    """The reference study's OD measure alone: the full-resolution check for borderline tiles."""
    return float(_close_dilate_fill(od_tissue_mask(tile, beta), 2).mean())


def reference_tissue_fractions(tile: np.ndarray, beta: float = BETA) -> tuple[float, float]:
    """The reference (seed) study's two per-tile measures (SystemML TUPAC16 `keep_tile`).

    1. Canny edges of the inverted grey image, closed and dilated with disk(10), holes filled.
    2. OD >= beta in all channels, closed and dilated with disk(2), holes filled.
    """
    from skimage.color import rgb2gray
    from skimage.feature import canny

    edges = canny(1.0 - rgb2gray(tile))
    return float(_close_dilate_fill(edges, 10).mean()), od_morph_fraction(tile, beta)


def reference_keep(tile: np.ndarray, threshold: float, beta: float = BETA) -> tuple[bool, float]:
    """The reference study's criterion, tissue mode `seed` (the public name means the reference
    (seed) study's per-tile test): both measures >= threshold. Returns (keep, the smaller
    measure)."""
    edge_fraction, od_frac = reference_tissue_fractions(tile, beta)
    low = min(edge_fraction, od_frac)
    return low >= threshold, low


@dataclass(frozen=True)
class FastCriterion:
    """Fast tissue test: trust the low-resolution coverage away from the threshold, check
    full-resolution pixels only in the band around it.

    Tiles with coverage below `threshold - band_below` are never candidates (never read).
    The default band reproduced the reference study's kept set exactly (Jaccard 1.0) on the
    shared slides while checking 7 of 25 (cmu) and 11 of 26 (TCGA) candidates at full
    resolution.
    """

    threshold: float
    band_below: float = 0.10
    band_above: float = 0.05

    @property
    def candidate_min(self) -> float:
        return max(0.0, self.threshold - self.band_below)

    def needs_pixels(self, coverage: float) -> bool:
        return self.candidate_min <= coverage < min(1.0, self.threshold + self.band_above)

    def keep(
        self, coverage: float, tile: np.ndarray | None, beta: float = BETA
    ) -> tuple[bool, float]:
        """(keep, tissue fraction used for the decision)."""
        if coverage < self.candidate_min:
            return False, coverage
        if not self.needs_pixels(coverage) or tile is None:
            return True, coverage
        fraction = od_morph_fraction(tile, beta)
        return fraction >= self.threshold, fraction
