"""DeepZoom tiles from any slide `core.wsi.slide` opens (OpenSlide or tiffslide).

The DeepZoom pyramid halves the level-0 size (rounding up) down to 1 x 1 px, as
`openslide.deepzoom.DeepZoomGenerator` does; level `L` of `N` is downsampled 2^(N-1-L). Each
tile is read from the coarsest slide level at least as fine as its DeepZoom level (so resizing
only ever shrinks) with `Slide.read`, reduced by an exact k x k block mean when the levels are
a whole factor k apart (always, for pyramids of 2x levels; a partial block at the slide's edge
averages the pixels it has), else by an area filter, and JPEG-encoded. No overlap: 256 px
tiles stay 256 px.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from prolifscore.core.wsi.slide import Slide, open_slide

LEVEL_TOLERANCE = 0.02  # levels are 4.000345x (SVS) or 3.99x (odd sizes): a whole factor


class TileNotFound(LookupError):
    """A level or tile address outside the pyramid."""


@dataclass(frozen=True)
class TileRegion:
    """What to read for one DeepZoom tile: `Slide.read(x0, y0, level, width, height)`, then
    shrink to (out_width, out_height), by a block mean when `factor` (> 0) is whole."""

    level: int
    x0: int
    y0: int
    width: int
    height: int
    out_width: int
    out_height: int
    factor: int  # slide-level pixels per output pixel when whole, else 0


class DeepZoom:
    """The DeepZoom view of one open slide: the DZI descriptor and its tiles."""

    def __init__(self, slide: Slide, tile_size: int = 256, quality: int = 80) -> None:
        if tile_size < 1 or not 1 <= quality <= 100:
            raise ValueError(f"need tile_size >= 1 and quality 1..100, got {tile_size}/{quality}")
        self.slide = slide
        self.tile_size = tile_size
        self.quality = quality
        size = slide.dimensions
        sizes = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            sizes.append(size)
        self.level_dimensions: list[tuple[int, int]] = sizes[::-1]
        self.level_count = len(sizes)
        self.level_tiles = [
            (math.ceil(w / tile_size), math.ceil(h / tile_size)) for w, h in self.level_dimensions
        ]
        # tiffslide's readers share a file handle: one read at a time. OpenSlide is thread-safe.
        self._lock = threading.Lock() if slide.backend != "openslide" else None

    def downsample(self, level: int) -> int:
        return 2 ** (self.level_count - 1 - level)

    def slide_level(self, level: int) -> int:
        """The coarsest slide level whose downsample does not exceed the DeepZoom level's."""
        wanted = self.downsample(level) * (1 + LEVEL_TOLERANCE)
        best = 0
        for i, ds in enumerate(self.slide.level_downsamples):
            if ds <= wanted and ds >= self.slide.level_downsamples[best]:
                best = i
        return best

    def dzi(self, fmt: str = "jpeg") -> str:
        width, height = self.slide.dimensions
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'Format="{fmt}" Overlap="0" TileSize="{self.tile_size}">'
            f'<Size Width="{width}" Height="{height}"/></Image>\n'
        )

    def region(self, level: int, col: int, row: int) -> TileRegion:
        if not 0 <= level < self.level_count:
            raise TileNotFound(f"level {level} is not in 0..{self.level_count - 1}")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"tile {col}_{row} is not in level {level} ({cols} x {rows})")
        zw, zh = self.level_dimensions[level]
        d = self.downsample(level)
        out_w = min(self.tile_size, zw - col * self.tile_size)
        out_h = min(self.tile_size, zh - row * self.tile_size)
        x0, y0 = col * self.tile_size * d, row * self.tile_size * d
        width0, height0 = self.slide.dimensions
        w0, h0 = min(out_w * d, width0 - x0), min(out_h * d, height0 - y0)
        s = self.slide_level(level)
        ds = self.slide.level_downsamples[s]
        lw, lh = self.slide.level_dimensions[s]
        lx, ly = int(x0 / ds), int(y0 / ds)
        ratio = d / ds
        k = round(ratio) if abs(ratio - round(ratio)) <= LEVEL_TOLERANCE * ratio else 0
        want_w, want_h = (k * out_w, k * out_h) if k else (math.ceil(w0 / ds), math.ceil(h0 / ds))
        read_w = max(1, min(want_w, lw - lx))
        read_h = max(1, min(want_h, lh - ly))
        return TileRegion(s, x0, y0, read_w, read_h, out_w, out_h, k)

    def tile_rgb(self, level: int, col: int, row: int) -> np.ndarray:
        r = self.region(level, col, row)
        if self._lock is None:
            pixels = self.slide.read(r.x0, r.y0, r.level, r.width, r.height)
        else:
            with self._lock:
                pixels = self.slide.read(r.x0, r.y0, r.level, r.width, r.height)
        return shrink(pixels, r.out_width, r.out_height, r.factor)

    def tile_jpeg(self, level: int, col: int, row: int) -> bytes:
        return encode_jpeg(self.tile_rgb(level, col, row), self.quality)


def shrink(pixels: np.ndarray, width: int, height: int, factor: int) -> np.ndarray:
    """`pixels` [H, W, 3] to [height, width, 3]. With a whole `factor` k: a k x k block mean,
    the slide's last row and column repeated to fill a block the edge cuts short (so an edge
    pixel is the mean of the pixels it covers). Otherwise an area (box) filter."""
    h, w = pixels.shape[:2]
    if factor:
        pad_h, pad_w = factor * height - h, factor * width - w
        if pad_h or pad_w:
            pixels = np.pad(pixels, ((0, max(0, pad_h)), (0, max(0, pad_w)), (0, 0)), "edge")
            pixels = pixels[: factor * height, : factor * width]
        if factor == 1:
            return np.ascontiguousarray(pixels)
        return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).reduce(factor))
    if (w, h) == (width, height):
        return np.ascontiguousarray(pixels)
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BOX))


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """libjpeg-turbo through imagecodecs; its defaults are YCbCr 4:2:0, as slides' own tiles."""
    return bytes(imagecodecs.jpeg_encode(np.ascontiguousarray(rgb), level=quality))


class TileCache:
    """Encoded tiles, least recently used out first, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes -= len(old) if old else 0
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)


class OpenSlides:
    """Open slides kept for reuse (opening costs far more than a tile). A slide leaving the
    cache is closed only once no request still reads it."""

    def __init__(self, capacity: int, tile_size: int, quality: int) -> None:
        self.capacity = max(1, capacity)
        self.tile_size = tile_size
        self.quality = quality
        self._open: OrderedDict[Path, DeepZoom] = OrderedDict()
        self._users: dict[int, int] = {}
        self._retired: dict[int, DeepZoom] = {}
        self._lock = threading.Lock()

    @contextmanager
    def deepzoom(self, path: Path) -> Iterator[DeepZoom]:
        """The DeepZoom view of `path` (already confined to the slide roots)."""
        dz = self._acquire(path)
        try:
            yield dz
        finally:
            self._release(dz)

    def _acquire(self, path: Path) -> DeepZoom:
        with self._lock:
            dz = self._open.get(path)
            if dz is not None:
                self._open.move_to_end(path)
                self._users[id(dz)] = self._users.get(id(dz), 0) + 1
                return dz
        opened = DeepZoom(open_slide(path), self.tile_size, self.quality)  # outside the lock
        with self._lock:
            dz = self._open.get(path)
            if dz is None:
                dz, opened = opened, None
                self._open[path] = dz
                while len(self._open) > self.capacity:
                    _, old = self._open.popitem(last=False)
                    self._retire(old)
            self._users[id(dz)] = self._users.get(id(dz), 0) + 1
        if opened is not None:  # another request opened it first
            opened.slide.close()
        return dz

    def _retire(self, dz: DeepZoom) -> None:
        if self._users.get(id(dz), 0) == 0:
            self._users.pop(id(dz), None)
            dz.slide.close()
        else:
            self._retired[id(dz)] = dz

    def _release(self, dz: DeepZoom) -> None:
        with self._lock:
            self._users[id(dz)] -= 1
            if self._users[id(dz)] == 0 and id(dz) in self._retired:
                del self._retired[id(dz)], self._users[id(dz)]
                dz.slide.close()

    def close(self) -> None:
        with self._lock:
            for dz in self._open.values():
                dz.slide.close()
            self._open.clear()
