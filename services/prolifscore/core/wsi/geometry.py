"""Tile geometry: which pyramid level to read, how much to read, where the grid lies.

All grid coordinates are level-0 pixels. Partial edge tiles are dropped (the seed did so
too), and a slide whose resolution is within `MPP_TOLERANCE` of the target is read 1:1
instead of being resized by a pixel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MPP_TOLERANCE = 0.02


@dataclass(frozen=True)
class TileGeometry:
    level: int
    level_downsample: float
    read_size: int  # pixels read at `level` per tile side
    tile_size: int  # pixels per tile side as delivered
    overlap: int  # output pixels shared by neighbours
    footprint0: int  # tile side in level-0 pixels
    stride0: int  # grid step in level-0 pixels
    cols: int
    rows: int
    base_mpp: float
    base_mpp_assumed: bool
    target_mpp: float

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.tile_size

    @property
    def tile_count(self) -> int:
        return self.cols * self.rows

    def origin(self, col: int, row: int) -> tuple[int, int]:
        return col * self.stride0, row * self.stride0

    def grid(self) -> Iterator[tuple[int, int, int, int]]:
        """(col, row, x, y) of every full tile, row-major."""
        for row in range(self.rows):
            for col in range(self.cols):
                yield col, row, col * self.stride0, row * self.stride0


def target_mpp_from(magnification: float | None, mpp: float | None, default_mpp: float) -> float:
    """mpp wins over magnification; 20x corresponds to ~0.5 um/px (10 / magnification)."""
    if mpp:
        return float(mpp)
    if magnification:
        return 10.0 / float(magnification)
    return default_mpp


def resolve_geometry(
    dimensions: tuple[int, int],
    level_downsamples: Sequence[float],
    base_mpp: float | None,
    *,
    target_mpp: float,
    tile_size: int,
    overlap: int = 0,
    assumed_mpp: float = 0.25,
) -> TileGeometry:
    """Pick the level and read size that deliver `tile_size` px tiles at `target_mpp`.

    Reads from the coarsest level that is still at least as fine as the target, so that
    resizing only ever shrinks (or is skipped when within tolerance).
    """
    if tile_size <= 0 or not 0 <= overlap < tile_size:
        raise ValueError(
            f"need tile_size > 0 and 0 <= overlap < tile_size, got {tile_size}/{overlap}"
        )
    if target_mpp <= 0:
        raise ValueError(f"target mpp must be positive, got {target_mpp}")
    assumed = base_mpp is None
    mpp0 = assumed_mpp if base_mpp is None else base_mpp
    factor = target_mpp / mpp0  # level-0 pixels per output pixel
    if abs(factor - 1.0) <= MPP_TOLERANCE:
        factor = 1.0
    level = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= factor * (1 + MPP_TOLERANCE):
            level = i if ds >= level_downsamples[level] else level
    ds = float(level_downsamples[level])
    read_size = max(1, round(tile_size * factor / ds))
    if abs(read_size - tile_size) <= MPP_TOLERANCE * tile_size:
        read_size = tile_size
    footprint0 = max(1, round(read_size * ds))
    stride0 = max(1, round((tile_size - overlap) * footprint0 / tile_size))
    width, height = dimensions
    cols = 0 if width < footprint0 else (width - footprint0) // stride0 + 1
    rows = 0 if height < footprint0 else (height - footprint0) // stride0 + 1
    return TileGeometry(
        level=level,
        level_downsample=ds,
        read_size=read_size,
        tile_size=tile_size,
        overlap=overlap,
        footprint0=footprint0,
        stride0=stride0,
        cols=cols,
        rows=rows,
        base_mpp=mpp0,
        base_mpp_assumed=assumed,
        target_mpp=target_mpp,
    )


def mask_downsample_for(geometry: TileGeometry, samples_per_side: int = 16) -> float:
    """Level-0 pixels per tissue-mask pixel: enough that a tile spans ~16 x 16 mask pixels."""
    return max(1.0, geometry.footprint0 / samples_per_side)
