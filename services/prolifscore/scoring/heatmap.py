"""Heatmap PNG: each tile's probability of the predicted score over the slide thumbnail, with
mitosis detections as dots.

Drawn as the tiles are scored (`Canvas`), one overlay per class, since the predicted score is
known only at the end: the memory is that of the thumbnail, whatever the number of tiles."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from prolifscore.v1 import pipeline_pb2 as pb

MIN_SIDE = 768
ALPHA = 110


def _colour(p: float) -> tuple[int, int, int]:
    """Blue (low) -> yellow -> red (high)."""
    p = float(np.clip(p, 0.0, 1.0))
    if p < 0.5:
        t = p / 0.5
        return int(255 * t), int(255 * t), int(255 * (1 - t))
    t = (p - 0.5) / 0.5
    return 255, int(255 * (1 - t)), 0


class Canvas:
    """The heatmap being drawn: `thumbnail` covers the slide at `downsample` level-0 px per
    pixel, or a window of it whose top-left pixel is `offset` (thumbnail pixels from the
    slide's origin: a region of interest's map); `add` draws a tile (level-0 position, one
    value in [0, 1] per class) on each class's overlay, `png` composes the chosen class's
    overlay with the mitoses."""

    def __init__(
        self,
        thumbnail: np.ndarray,
        downsample: float,
        footprint0: int,
        classes: int,
        offset: tuple[int, int] = (0, 0),
    ) -> None:
        base = Image.fromarray(thumbnail).convert("RGB")
        self.zoom = max(1, int(np.ceil(MIN_SIDE / max(base.size))))
        if self.zoom > 1:
            size = (base.width * self.zoom, base.height * self.zoom)
            base = base.resize(size, Image.Resampling.NEAREST)
        self.base = base
        self.scale = self.zoom / downsample
        self.origin = (offset[0] * self.zoom, offset[1] * self.zoom)
        self.footprint0 = footprint0
        self.overlays = [Image.new("RGBA", base.size, (0, 0, 0, 0)) for _ in range(classes)]
        self._draws = [ImageDraw.Draw(o) for o in self.overlays]

    def add(self, tile: pb.Tile, values: Sequence[float]) -> None:
        s, f, (ox, oy) = self.scale, self.footprint0, self.origin
        box = (
            tile.x * s - ox,
            tile.y * s - oy,
            (tile.x + f) * s - 1 - ox,
            (tile.y + f) * s - 1 - oy,
        )
        for draw, value in zip(self._draws, values, strict=True):
            draw.rectangle(box, fill=(*_colour(value), ALPHA))

    def png(self, cls: int, mitoses: Sequence[tuple[float, float]] = ()) -> bytes:
        overlay = self.overlays[cls].copy()
        draw = ImageDraw.Draw(overlay)
        r = max(2.0, 3.0 * self.zoom / 2)
        for x, y in mitoses:
            cx, cy = x * self.scale - self.origin[0], y * self.scale - self.origin[1]
            draw.ellipse(
                (cx - r, cy - r, cx + r, cy + r), outline=(0, 0, 0, 255), fill=(255, 0, 255, 230)
            )
        out = Image.alpha_composite(self.base.convert("RGBA"), overlay).convert("RGB")
        buf = io.BytesIO()
        out.save(buf, format="PNG", optimize=False)
        return buf.getvalue()


def render(
    thumbnail: np.ndarray,
    downsample: float,
    tiles: list[tuple[pb.Tile, float]],
    footprint0: int,
    mitoses: Sequence[tuple[float, float]] = (),
) -> bytes:
    """The heatmap of (tile, value in [0, 1]) pairs at once (tiles at level-0 positions)."""
    canvas = Canvas(thumbnail, downsample, footprint0, 1)
    for tile, value in tiles:
        canvas.add(tile, (value,))
    return canvas.png(0, mitoses)
