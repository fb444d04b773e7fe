"""Heatmap PNG: each tile's probability of the predicted score over the slide thumbnail, with
mitosis detections as dots."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from prolifscore.v1 import pipeline_pb2 as pb

MIN_SIDE = 768


def _colour(p: float) -> tuple[int, int, int]:
    """Blue (low) -> yellow -> red (high)."""
    p = float(np.clip(p, 0.0, 1.0))
    if p < 0.5:
        t = p / 0.5
        return int(255 * t), int(255 * t), int(255 * (1 - t))
    t = (p - 0.5) / 0.5
    return 255, int(255 * (1 - t)), 0


def render(
    thumbnail: np.ndarray,
    downsample: float,
    tiles: list[tuple[pb.Tile, float]],
    footprint0: int,
    mitoses: list[tuple[float, float]] = (),  # type: ignore[assignment]
) -> bytes:
    """`thumbnail` covers the slide at `downsample` level-0 px per pixel; tiles are
    (tile, value in [0, 1]) with level-0 positions."""
    base = Image.fromarray(thumbnail).convert("RGB")
    zoom = max(1, int(np.ceil(MIN_SIDE / max(base.size))))
    if zoom > 1:
        base = base.resize((base.width * zoom, base.height * zoom), Image.Resampling.NEAREST)
    scale = zoom / downsample
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for tile, value in tiles:
        x0, y0 = tile.x * scale, tile.y * scale
        x1, y1 = (tile.x + footprint0) * scale - 1, (tile.y + footprint0) * scale - 1
        draw.rectangle((x0, y0, x1, y1), fill=(*_colour(value), 110))
    r = max(2.0, 3.0 * zoom / 2)
    for x, y in mitoses:
        cx, cy = x * scale, y * scale
        draw.ellipse(
            (cx - r, cy - r, cx + r, cy + r), outline=(0, 0, 0, 255), fill=(255, 0, 255, 230)
        )
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
