"""Pyramidal tiled TIFFs that OpenSlide opens, and real tissue at the pipeline's resolution.

Shared by the benchmark's TUPAC-sized slide (`bench/large_slide.py`, which streams) and the
synthetic training benchmark (`prolifscore.synthetic.slides`, small in-memory slides), so
both write the same kind of file: OpenSlide's "generic tiled TIFF" with JPEG (YCbCr 4:2:0)
tiles, one page per pyramid level, and the microns per pixel in the resolution tags (which
OpenSlide reports as `openslide.mpp-x`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from prolifscore.core.runtime.settings import PreprocessSettings, load
from prolifscore.core.wsi.geometry import resolve_geometry
from prolifscore.core.wsi.slide import open_slide
from prolifscore.core.wsi.tissue import od_tissue_mask

TILE = 256

Tiles = Iterable[np.ndarray] | Iterable[bytes]


def level_sides(side: int, smallest_side: int) -> list[int]:
    """Sides of the pyramid levels: halve until one level is smaller than `smallest_side`."""
    sides = [side]
    while sides[-1] >= smallest_side:
        sides.append(math.ceil(sides[-1] / 2))
    return sides


def reduce2(a: np.ndarray) -> np.ndarray:
    """2x2 box mean, rounded (even-sized input)."""
    s = a[0::2, 0::2].astype(np.uint16) + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def write_pyramid(
    path: Path,
    shapes: Sequence[tuple[int, int]],
    level_tiles: Callable[[int], Tiles],
    *,
    mpp: float,
    quality: int = 80,
    tile: int = TILE,
) -> None:
    """Write one JPEG-tiled page per level; `level_tiles(level)` yields that level's tiles
    row-major, as uint8 arrays or as already encoded JPEG bytes (written as they are).

    `shapes` are (height, width) per level, level 0 first; level L is at mpp * 2^L.
    """
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, (height, width) in enumerate(shapes):
            res = 1e4 / (mpp * 2**level)  # pixels per cm
            tif.write(
                level_tiles(level),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                metadata=None,
                maxworkers=2,
                buffersize=16 << 20,  # tifffile buffers ~256 MB of raw tiles by default
            )


def write_image_pyramid(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float,
    quality: int = 90,
    smallest_side: int = 512,
    tile: int = TILE,
) -> list[tuple[int, int]]:
    """Write an in-memory RGB image as a pyramidal tiled TIFF; returns the level shapes.

    For small slides only (all levels are held in memory); large ones stream through
    `write_pyramid` as `bench/large_slide.py` does. Partial edge tiles are padded white.
    """
    levels = [np.ascontiguousarray(image[..., :3], dtype=np.uint8)]
    while max(levels[-1].shape[:2]) >= smallest_side:
        a = levels[-1]
        a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
        levels.append(reduce2(a))

    def tiles(level: int) -> Iterator[np.ndarray]:
        a = levels[level]
        for y in range(0, a.shape[0], tile):
            for x in range(0, a.shape[1], tile):
                out = np.full((tile, tile, 3), 255, np.uint8)
                block = a[y : y + tile, x : x + tile]
                out[: block.shape[0], : block.shape[1]] = block
                yield out

    shapes = [(a.shape[0], a.shape[1]) for a in levels]
    write_pyramid(path, shapes, tiles, mpp=mpp, quality=quality, tile=tile)
    return shapes


def tissue_level(
    path: Path, *, target_mpp: float | None = None, assumed_mpp: float | None = None
) -> np.ndarray:
    """A whole slide as one RGB array at `target_mpp` (pipeline default: 0.5 um/px), read
    from the level the pipeline itself would read. `assumed_mpp` is used for slides without
    mpp metadata (pipeline default: 0.25). Small slides only: the level is held in memory."""
    defaults = load(PreprocessSettings, environ={})
    with open_slide(path) as slide:
        g = resolve_geometry(
            slide.dimensions,
            slide.level_downsamples,
            slide.base_mpp(),
            target_mpp=target_mpp or defaults.target_mpp,
            tile_size=TILE,
            assumed_mpp=assumed_mpp or defaults.default_mpp,
        )
        w, h = slide.level_dimensions[g.level]
        level = slide.read(0, 0, g.level, w, h)
    if g.read_size != TILE:
        w, h = round(w * TILE / g.read_size), round(h * TILE / g.read_size)
        level = np.asarray(Image.fromarray(level).resize((w, h), Image.Resampling.BOX))
    return level


def real_tiles(
    slides: Sequence[Path],
    stride: int = TILE // 2,
    *,
    assumed_mpp: float | None = None,
    tissue_min: float = 0.5,
    background_max: float = 0.005,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(tissue tiles, background tiles): 256 px at the pipeline's target resolution, cut every
    `stride` px; a tile is tissue at OD tissue share >= `tissue_min`, background at
    <= `background_max` (tiles in between are neither)."""
    tissue: list[np.ndarray] = []
    background: list[np.ndarray] = []
    for path in slides:
        level = tissue_level(path, assumed_mpp=assumed_mpp)
        h, w = level.shape[:2]
        for y in range(0, h - TILE + 1, stride):
            for x in range(0, w - TILE + 1, stride):
                tile = level[y : y + TILE, x : x + TILE]
                share = float(od_tissue_mask(tile).mean())
                if share >= tissue_min:
                    tissue.append(np.ascontiguousarray(tile))
                elif share <= background_max:
                    background.append(np.ascontiguousarray(tile))
    return tissue, background
