"""Synthetic benchmark from real tissue: planted mitosis-like figures with known positions.

No TUPAC16 data can be downloaded here, so training is proven on real H&E tissue (the shared
slides, read at 0.5 um/px = 20x) with mitosis-like figures planted where we know them:

- a mitosis figure is a dark, compact, irregular chromatin clump (prophase/metaphase clump,
  metaphase plate, anaphase pair of plates, telophase pair of clumps), 14-24 px = 7-12 um
  across, near-black blue-purple with granular texture, rough edges, slight blur and often a
  pale cytoplasm halo;
- "mimics" are planted too and never labelled: smooth, round, smaller and less dark nuclei
  (lymphocyte / pyknotic look), the classic false positives, so that a detector has to learn
  shape and size as well as darkness (the tissue's own dark nuclei are further confounders).

Two products: `make_mitosis_dataset` writes the TUPAC16 auxiliary layout (regions + CSV of
centroids) for the detector; `make_synthetic_slides` writes small OpenSlide-readable
pyramidal slides whose mitosis density defines their score, with TUPAC16-style labels.
These are a machinery check, not a TUPAC16 result.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from prolifscore.core.grading.mitoses import MitosisGrading
from prolifscore.core.wsi.tissue import od_tissue_mask
from prolifscore.synthetic.pyramid import TILE, tissue_level, write_image_pyramid

DEFAULT_SOURCES = ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs")
# The TCGA slide has no mpp metadata; its level-0 nuclei measure like 20x (8-10 um = 16-20 px),
# so it is read at level 0 as 0.5 um/px rather than at the pipeline's 40x assumption.
SOURCE_ASSUMED_MPP = 0.5
SYNTHETIC_MPP = 0.5

# Planted mitoses per slide, by score: the number in the densest 10-HPF window, which is what
# `MitosisGrading` grades (<= 7 -> 1, 8-14 -> 2, >= 15 -> 3). A 2048 px slide at 0.5 um/px is
# 1.05 mm^2 = 5.3 HPF, smaller than that window (2.8 mm side), so the window holds the whole
# slide and these are the per-slide counts; each range sits >= 3 inside its class. Per 256 px
# tile that is ~0.04 / 0.17 / 0.7 mitoses: class-3 tiles mostly show one, class-1 tiles
# almost never.
CLASS_COUNTS: dict[int, tuple[int, int]] = {1: (1, 4), 2: (10, 12), 3: (36, 54)}
MIMICS_PER_MM2 = 40.0  # unlabelled mitosis look-alikes (dark round nuclei)


def _mm2(shape: tuple[int, ...], mpp: float) -> float:
    return shape[0] * shape[1] * (mpp / 1000.0) ** 2


# --------------------------------------------------------------------------------------------
# Figures.


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


# --------------------------------------------------------------------------------------------
# Source tissue.


def default_source_dir() -> Path:
    """../shared/data/slides beside the checkout (as the tests find it)."""
    return Path(__file__).resolve().parents[2].parent / "shared/data/slides"


@lru_cache(maxsize=4)
def _source_levels(paths: tuple[Path, ...]) -> tuple[np.ndarray, ...]:
    """Whole source slides at 0.5 um/px (read once per process: a few seconds)."""
    return tuple(
        tissue_level(p, target_mpp=SYNTHETIC_MPP, assumed_mpp=SOURCE_ASSUMED_MPP) for p in paths
    )


def _sources(source_dir: Path | None) -> tuple[np.ndarray, ...]:
    folder = Path(source_dir) if source_dir else default_source_dir()
    paths = tuple(folder / name for name in DEFAULT_SOURCES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"source slides missing: {', '.join(missing)}")
    return _source_levels(paths)


# Values keep their level alive, so that its id() cannot be reused by another array.
_WINDOWS: dict[tuple[int, int, float, int], tuple[np.ndarray, np.ndarray]] = {}


def _tissue_windows(level: np.ndarray, size: int, min_share: float, step: int) -> np.ndarray:
    """Top-left (y, x) of every `size` window (on a `step` grid) with tissue share >= min
    (cached per source level: the sources are cached too)."""
    key = (id(level), size, min_share, step)
    if key not in _WINDOWS:
        _WINDOWS[key] = (level, _find_windows(level, size, min_share, step))
    return _WINDOWS[key][1]


def _find_windows(level: np.ndarray, size: int, min_share: float, step: int) -> np.ndarray:
    mask = od_tissue_mask(level).astype(np.int32)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys = np.arange(0, level.shape[0] - size + 1, step)
    xs = np.arange(0, level.shape[1] - size + 1, step)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    total = (
        integral[y0 + size, x0 + size]
        - integral[y0, x0 + size]
        - integral[y0 + size, x0]
        + integral[y0, x0]
    )
    keep = total >= min_share * size * size
    return np.stack([y0[keep], x0[keep]], axis=1)


def _orient(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of a square array."""
    return np.ascontiguousarray(np.rot90(a[:, ::-1] if k >= 4 else a, k % 4))


def _sample_crop(
    levels: Sequence[np.ndarray],
    windows: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A random tissue-rich `size` crop of a random source, in a random orientation."""
    candidates = [i for i, w in enumerate(windows) if len(w)]
    src = int(rng.choice(candidates))
    y, x = windows[src][int(rng.integers(len(windows[src])))]
    return _orient(levels[src][y : y + size, x : x + size], int(rng.integers(8)))


# --------------------------------------------------------------------------------------------
# Mitosis detector data set (TUPAC16 auxiliary layout).


def scanner_jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
    """The image after a JPEG (YCbCr 4:2:0) round trip, as a scanner stores tiles.

    Figures planted into decoded tissue have full-resolution chroma edges that no scanned
    image has; a detector trained on them learns that cue and then fires on hundreds of
    nuclei once the same tissue is JPEG-compressed (measured: 5 -> 663 false positives on
    40 regions). Compressing after planting gives figures and tissue the same history.
    """
    import imagecodecs

    data = imagecodecs.jpeg_encode(
        np.ascontiguousarray(image),
        level=quality,
        subsampling=(2, 2),
        colorspace="RGB",
        outcolorspace="YCBCR",
    )
    return np.asarray(imagecodecs.jpeg_decode(data))


def _write_centroids(path: Path, centroids: Sequence[tuple[float, float]]) -> None:
    """TUPAC16 auxiliary CSV: one `row,col` line per mitosis, integer pixels, no header."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        for r, c in centroids:
            w.writerow([round(r), round(c)])


def make_mitosis_dataset(
    out_dir: Path | str,
    *,
    cases: int = 8,
    regions_per_case: int = 4,
    region_size: int = 512,
    seed: int = 0,
    mpp: float = SYNTHETIC_MPP,
    empty_fraction: float = 0.25,
    mitoses_per_region: tuple[int, int] = (1, 6),
    mimics_per_mm2: float = MIMICS_PER_MM2,
    jpeg_quality: int | None = 90,
    source_dir: Path | None = None,
) -> Path:
    """Write `<case>/<region>.tif` (RGB TIFF) + `<case>/<region>.csv` (`row,col` centroids;
    no CSV for a region without mitoses, as in TUPAC16) and `dataset.json`; returns out_dir.

    A share `empty_fraction` of regions gets no mitosis (but mimics and real dark nuclei),
    so negatives from mitosis-free tissue are part of the data. Regions go through
    `scanner_jpeg` at `jpeg_quality` (None: not) before being stored losslessly, as the
    challenge's regions were cut from JPEG-compressed scans. Deterministic for a seed.
    Only `mpp=0.5` tissue is available (the sources are 20x); other values only label the data.
    """
    if cases < 1 or regions_per_case < 1 or region_size < 128:
        raise ValueError("need cases >= 1, regions_per_case >= 1 and region_size >= 128")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    levels = _sources(source_dir)
    windows = [_tissue_windows(lv, region_size, 0.6, 32) for lv in levels]
    if not any(len(w) for w in windows):
        raise ValueError(f"no tissue-rich {region_size} px window in the source slides")
    mimic_count = mimics_per_mm2 * _mm2((region_size, region_size), mpp)
    total = empty = 0
    for case in range(1, cases + 1):
        case_dir = out / f"{case:02d}"
        case_dir.mkdir(exist_ok=True)
        for region in range(1, regions_per_case + 1):
            image = _sample_crop(levels, windows, region_size, rng)
            lo, hi = mitoses_per_region
            n = 0 if rng.random() < empty_fraction else int(rng.integers(lo, hi + 1))
            image, centroids = plant_mitoses(image, n, rng)
            image = plant_mimics(image, int(rng.poisson(mimic_count)), rng, avoid=centroids)
            if jpeg_quality:
                image = scanner_jpeg(image, jpeg_quality)
            name = f"{region:02d}"
            tifffile.imwrite(case_dir / f"{name}.tif", image, photometric="rgb", compression="zlib")
            csv_path = case_dir / f"{name}.csv"
            csv_path.unlink(missing_ok=True)
            if centroids:
                _write_centroids(csv_path, centroids)
            else:
                empty += 1
            total += len(centroids)
    meta = {
        "synthetic": True,
        "note": "planted mitosis-like figures on real tissue: a machinery check, not TUPAC16 data",
        "layout": "TUPAC16 auxiliary: <case>/<region>.tif + <case>/<region>.csv (row,col)",
        "mpp": mpp,
        "seed": seed,
        "cases": cases,
        "regions": cases * regions_per_case,
        "regions_without_mitoses": empty,
        "mitoses": total,
        "region_size": region_size,
        "mimics_per_mm2": mimics_per_mm2,
        "jpeg_quality": jpeg_quality,
        "sources": list(DEFAULT_SOURCES),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


# --------------------------------------------------------------------------------------------
# Scored synthetic slides.


@dataclass(frozen=True)
class SyntheticSlide:
    slide_id: str
    path: Path
    tumor_score: int
    molecular_score: float
    mitoses: list[tuple[float, float]]  # level-0 (x, y)


def _mosaic(
    tissue: Sequence[np.ndarray], tiles_per_side: int, rng: np.random.Generator
) -> np.ndarray:
    """A square slide of randomly chosen and oriented real tissue tiles (grid-aligned, so the
    pipeline's 256 px tiles are exactly these tiles)."""
    n = tiles_per_side
    out = np.empty((n * TILE, n * TILE, 3), np.uint8)
    for i in range(n):
        for j in range(n):
            t = tissue[int(rng.integers(len(tissue)))]
            out[i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE] = _orient(
                t, int(rng.integers(8))
            )
    return out


def _pipeline_tissue_tiles(level: np.ndarray, block: int = 16, min_block: float = 0.1) -> list:
    """Top-left (y, x) of the 256 px tiles (every 128 px) that the pipeline's fast tissue
    criterion keeps: >= 95% of their 16 px blocks hold >= 10% OD-tissue pixels (see
    prolifscore.core.wsi.tissue). A plain OD share would reject the pale TCGA tissue."""
    h, w = (level.shape[0] // block) * block, (level.shape[1] // block) * block
    mask = od_tissue_mask(level[:h, :w]).reshape(h // block, block, w // block, block)
    blocks = (mask.mean(axis=(1, 3)) >= min_block).astype(np.int32)
    integral = np.pad(blocks.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    n, step = TILE // block, (TILE // 2) // block
    out = []
    for i in range(0, blocks.shape[0] - n + 1, step):
        for j in range(0, blocks.shape[1] - n + 1, step):
            inside = (
                integral[i + n, j + n] - integral[i, j + n] - integral[i + n, j] + integral[i, j]
            )
            if inside >= 0.95 * n * n:
                out.append((i * block, j * block))
    return out


def _source_tiles(source_dir: Path | None) -> list[np.ndarray]:
    """Tissue-rich 256 px tiles of all sources (~70 cmu + ~390 TCGA bases, x 8 orientations
    when placed), so that the pipeline keeps nearly every tile of a synthetic slide."""
    tiles = [
        level[y : y + TILE, x : x + TILE]
        for level in _sources(source_dir)
        for y, x in _pipeline_tissue_tiles(level)
    ]
    if not tiles:
        raise ValueError("no tissue-rich tile in the source slides")
    return tiles


def molecular_for(score: int, rng: np.random.Generator) -> float:
    """A stand-in for TUPAC16's PAM50 proliferation score: rises with the class, plus noise
    (Spearman with the class ~0.8 on balanced sets)."""
    return round(float(-0.5 + 0.4 * (score - 1) + rng.normal(0.0, 0.15)), 4)


def make_synthetic_slides(
    out_dir: Path | str,
    *,
    slides: int = 12,
    seed: int = 0,
    size_px: int = 2048,
    mpp: float = SYNTHETIC_MPP,
    quality: int = 90,
    prefix: str = "SYN",
    mimics_per_mm2: float = MIMICS_PER_MM2,
    source_dir: Path | None = None,
) -> Path:
    """Write `<prefix>-NNN.tiff` pyramidal slides (OpenSlide generic tiled TIFF, mpp in the
    tags), `ground_truth.csv` (`slide_id,tumor_score,molecular_score`), `mitoses.csv`
    (`slide_id,x,y` level-0 centroids) and `slides.json`; returns out_dir.

    Scores are balanced over 1-3 (shuffled); a slide of score s gets a count drawn from
    `CLASS_COUNTS[s]`, scaled by the slide's area over one 10-HPF window when the slide is
    larger than the window. Tiles are pooled from both sources regardless of score, so the
    tissue itself says nothing about the score. Deterministic for a seed.
    """
    if slides < 1 or size_px < TILE or size_px % TILE:
        raise ValueError(f"need slides >= 1 and size_px a positive multiple of {TILE}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tissue = _source_tiles(source_dir)
    grading = MitosisGrading()
    window_mm2 = 10 * grading.hpf_area_mm2
    area = _mm2((size_px, size_px), mpp)
    scale = max(1.0, area / window_mm2)
    scores = np.resize(np.array([1, 2, 3]), slides)
    rng.shuffle(scores)
    made: list[SyntheticSlide] = []
    for k, score in enumerate(scores.tolist(), start=1):
        slide_id = f"{prefix}-{k:03d}"
        lo, hi = CLASS_COUNTS[score]
        count = round(int(rng.integers(lo, hi + 1)) * scale)
        image = _mosaic(tissue, size_px // TILE, rng)
        image, centroids = plant_mitoses(image, count, rng)
        if len(centroids) != count:
            raise RuntimeError(f"{slide_id}: only {len(centroids)} of {count} mitoses fit")
        image = plant_mimics(image, int(rng.poisson(mimics_per_mm2 * area)), rng, avoid=centroids)
        path = out / f"{slide_id}.tiff"
        write_image_pyramid(path, image, mpp=mpp, quality=quality, smallest_side=512)
        made.append(
            SyntheticSlide(
                slide_id=slide_id,
                path=path,
                tumor_score=int(score),
                molecular_score=molecular_for(int(score), rng),
                mitoses=[(c, r) for r, c in centroids],
            )
        )
    with (out / "ground_truth.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "tumor_score", "molecular_score"])
        for s in made:
            w.writerow([s.slide_id, s.tumor_score, s.molecular_score])
    with (out / "mitoses.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "x", "y"])
        for s in made:
            for x, y in s.mitoses:
                w.writerow([s.slide_id, round(x, 1), round(y, 1)])
    meta = {
        "synthetic": True,
        "note": "planted mitosis-like figures on real tissue: a machinery check, not TUPAC16 data",
        "mpp": mpp,
        "seed": seed,
        "size_px": size_px,
        "area_mm2": round(area, 4),
        "hpf_mm2": grading.hpf_area_mm2,
        "class_counts_per_10hpf_window": {str(k): list(v) for k, v in CLASS_COUNTS.items()},
        "count_scale": round(scale, 4),
        "mimics_per_mm2": mimics_per_mm2,
        "slides": [
            {
                "slide_id": s.slide_id,
                "file": s.path.name,
                "tumor_score": s.tumor_score,
                "molecular_score": s.molecular_score,
                "mitoses": len(s.mitoses),
                "mitoses_per_tile": round(len(s.mitoses) / (size_px // TILE) ** 2, 3),
            }
            for s in made
        ],
    }
    (out / "slides.json").write_text(json.dumps(meta, indent=2))
    return out
