"""A TUPAC16-sized test slide: a ~50k x 50k px pyramidal TIFF tiled from real tissue.

Level 0 is a mosaic of 256 px tiles cut from the shared real slides (tissue tiles with their
8 flips/rotations, background tiles), laid out as a few irregular tissue pieces with holes,
surrounded by background. Tiles on a piece's edge are composited pixel-wise, so the tissue
criterion sees borderline tiles as on a real slide. The file is OpenSlide's "generic tiled
TIFF": JPEG (YCbCr 4:2:0) tiles, one page per pyramid level, 0.5 um/px in the resolution tags.

Everything streams: level-0 tiles are JPEG-encoded once per distinct tile and written as
bytes; lower levels are assembled from per-tile 2^L reductions (exact, since a 2^L block never
straddles two level-0 tiles), so no level is ever held in memory.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np

from prolifscore.synthetic.pyramid import TILE, real_tiles, reduce2, write_pyramid
from prolifscore.synthetic.pyramid import level_sides as _level_sides

FORMAT_VERSION = 1

# Tissue pieces and holes: (centre x, centre y, radius x, radius y, phase), in slide widths.
PIECES = (
    (0.31, 0.40, 0.23, 0.31, 0.0),
    (0.68, 0.55, 0.22, 0.31, 1.3),
    (0.50, 0.87, 0.20, 0.08, 2.1),
)
HOLES = (
    (0.28, 0.35, 0.05, 0.04, 0.7),
    (0.72, 0.64, 0.04, 0.06, 2.9),
)


@dataclass(frozen=True)
class PyramidSpec:
    """What decides the file's content (a cached file is reused only for the same spec)."""

    tiles_per_side: int = 196  # 196 x 256 = 50,176 px
    mpp: float = 0.5
    quality: int = 80
    seed: int = 0
    tissue_bases: int = 80  # distinct real tissue tiles (x 8 orientations)
    background_bases: int = 16
    smallest_side: int = 1000  # add levels until one is smaller than this
    version: int = FORMAT_VERSION

    @property
    def side(self) -> int:
        return self.tiles_per_side * TILE


@dataclass
class PyramidInfo:
    path: Path
    spec: PyramidSpec
    level_sides: list[int]
    size_bytes: int
    tissue_share: float  # share of the slide's area inside the tissue pieces
    tile_kinds: dict[str, int]  # level-0 tiles: tissue / edge / background
    build_seconds: float
    reused: bool = False
    stats: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def level_sides(spec: PyramidSpec) -> list[int]:
    return _level_sides(spec.side, spec.smallest_side)


def _inside(u: np.ndarray, v: np.ndarray, shapes: Sequence[tuple[float, ...]]) -> np.ndarray:
    """True inside any of `shapes`: ellipses with a wavy rim (so edges cut tiles at all angles)."""
    out = np.zeros(np.broadcast(u, v).shape, bool)
    for cx, cy, rx, ry, phase in shapes:
        du, dv = (u - cx) / rx, (v - cy) / ry
        theta = np.arctan2(dv, du)
        rim = 1.0 + 0.06 * np.sin(5 * theta + phase) + 0.03 * np.sin(13 * theta + 2 * phase)
        out |= du * du + dv * dv <= rim * rim
    return out


def tissue_at(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The tissue region at normalized slide coordinates (u, v in [0, 1])."""
    return _inside(u, v, PIECES) & ~_inside(u, v, HOLES)


class _Bank:
    """Distinct level-0 tiles: JPEG bytes for level 0 and 2^L reductions for the levels below."""

    def __init__(self, quality: int, levels: int) -> None:
        self.quality = quality
        self.levels = levels
        self.jpeg: list[bytes] = []
        self.small: list[list[np.ndarray]] = []

    def add(self, pixels: np.ndarray) -> int:
        data = imagecodecs.jpeg_encode(
            np.ascontiguousarray(pixels),
            level=self.quality,
            subsampling=(2, 2),
            colorspace="RGB",
            outcolorspace="YCBCR",
        )
        stored = imagecodecs.jpeg_decode(data)  # reduce what readers will see
        reductions = []
        for _ in range(1, self.levels):
            stored = reduce2(stored)
            reductions.append(stored)
        self.jpeg.append(data)
        self.small.append(reductions)
        return len(self.jpeg) - 1


def _orientations(tile: np.ndarray) -> list[np.ndarray]:
    out = []
    for t in (tile, tile[:, ::-1]):
        out.extend(np.ascontiguousarray(np.rot90(t, k)) for k in range(4))
    return out


def _layout(
    spec: PyramidSpec, bank: _Bank, tissue: list[np.ndarray], background: list[np.ndarray]
) -> tuple[np.ndarray, dict[str, int], float]:
    """Bank id of every level-0 tile, tile counts per kind, and the tissue area share."""
    rng = np.random.default_rng(spec.seed)
    n = spec.tiles_per_side
    tissue_pick = rng.choice(len(tissue), min(spec.tissue_bases, len(tissue)), replace=False)
    bg_pick = rng.choice(len(background), min(spec.background_bases, len(background)), False)
    tissue_ids = [bank.add(v) for i in tissue_pick for v in _orientations(tissue[i])]
    bg_ids = [bank.add(v) for i in bg_pick for v in _orientations(background[i])]

    # 9 x 9 samples per tile classify it as all tissue, all background, or edge.
    k = 8
    s = (np.arange(n * k + 1) / (n * k)).astype(np.float64)
    inside = tissue_at(s[None, :], s[:, None])
    blocks = np.lib.stride_tricks.sliding_window_view(inside, (k + 1, k + 1))[::k, ::k]
    share_in = blocks.mean(axis=(2, 3))
    ids = np.where(
        share_in == 1.0,
        rng.choice(tissue_ids, (n, n)),
        rng.choice(bg_ids, (n, n)),
    ).astype(np.int32)
    edge = (share_in > 0) & (share_in < 1)
    sub = 64  # edge masks at 4 px resolution
    grid = (np.arange(sub) + 0.5) / sub
    for row, col in zip(*np.nonzero(edge), strict=True):
        mask = tissue_at((col + grid[None, :]) / n, (row + grid[:, None]) / n)
        mask = np.repeat(np.repeat(mask, TILE // sub, 0), TILE // sub, 1)
        fg = tissue[int(rng.choice(tissue_pick))]
        bg = background[int(rng.choice(bg_pick))]
        ids[row, col] = bank.add(np.where(mask[..., None], fg, bg))
    kinds = {
        "tissue": int((share_in == 1.0).sum()),
        "edge": int(edge.sum()),
        "background": int((share_in == 0).sum()),
    }
    return ids, kinds, float(inside.mean())


def _level_tiles(ids: np.ndarray, bank: _Bank, level: int) -> Iterator[np.ndarray]:
    """Level-`level` tiles, row-major, assembled from the bank's reductions."""
    f = 2**level
    piece = TILE // f
    n = ids.shape[0]
    m = math.ceil(n / f)
    for ty in range(m):
        for tx in range(m):
            out = np.full((TILE, TILE, 3), 255, np.uint8)
            block = ids[ty * f : (ty + 1) * f, tx * f : (tx + 1) * f]
            for (j, i), tid in np.ndenumerate(block):
                out[j * piece : (j + 1) * piece, i * piece : (i + 1) * piece] = bank.small[tid][
                    level - 1
                ]
            yield out


def _write(path: Path, spec: PyramidSpec, ids: np.ndarray, bank: _Bank) -> list[int]:
    sides = level_sides(spec)

    def tiles(level: int) -> Iterator[bytes] | Iterator[np.ndarray]:
        if level == 0:
            return (bank.jpeg[i] for i in ids.ravel())
        return _level_tiles(ids, bank, level)

    write_pyramid(path, [(s, s) for s in sides], tiles, mpp=spec.mpp, quality=spec.quality)
    return sides


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def cached(path: Path, spec: PyramidSpec) -> PyramidInfo | None:
    """The cached slide at `path` when it was built from `spec`, is complete and OpenSlide
    reads it as a pyramid; else None."""
    import openslide

    try:
        meta = json.loads(_meta_path(path).read_text())
        if meta["spec"] != asdict(spec) or path.stat().st_size != meta["size_bytes"]:
            return None
        with openslide.OpenSlide(str(path)) as osr:
            if [d[0] for d in osr.level_dimensions] != meta["level_sides"]:
                return None
    except (OSError, ValueError, KeyError, openslide.OpenSlideError):
        return None
    meta["spec"] = spec
    meta["path"] = path
    meta["reused"] = True
    return PyramidInfo(**meta)


def build_pyramid(
    path: Path, sources: Sequence[Path], spec: PyramidSpec | None = None
) -> PyramidInfo:
    """Return the slide at `path`, building it (atomically) unless a valid one is cached."""
    spec = spec or PyramidSpec()
    found = cached(path, spec)
    if found is not None:
        return found
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tissue, background = real_tiles(sources)
    if not tissue or not background:
        raise RuntimeError("the source slides gave no tissue or no background tiles")
    bank = _Bank(spec.quality, len(level_sides(spec)))
    ids, kinds, share = _layout(spec, bank, tissue, background)
    prepared = time.perf_counter() - start
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        sides = _write(tmp, spec, ids, bank)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    info = PyramidInfo(
        path=path,
        spec=spec,
        level_sides=sides,
        size_bytes=path.stat().st_size,
        tissue_share=round(share, 4),
        tile_kinds=kinds,
        build_seconds=round(time.perf_counter() - start, 2),
        stats={
            "prepare_seconds": round(prepared, 2),
            "distinct_level0_tiles": len(bank.jpeg),
            "source_tissue_tiles": len(tissue),
            "source_background_tiles": len(background),
        },
    )
    meta = info.to_json()
    meta.pop("reused")
    _meta_path(path).write_text(json.dumps(meta, indent=2))
    return info
