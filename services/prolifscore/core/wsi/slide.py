"""Opening slides: OpenSlide first, `tiffslide` for plain TIFFs OpenSlide rejects.

Paths are confined to configured roots before anything touches the file, and every failure
becomes a `SlideError` subclass whose message is safe to show a user (status events, gRPC).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class SlideError(Exception):
    """A slide cannot be used; `reason` is the short machine-readable kind."""

    reason = "unreadable"


class SlideNotFound(SlideError):
    reason = "not_found"


class SlidePathDenied(SlideError):
    reason = "permission_denied"


class SlideUnreadable(SlideError):
    reason = "unreadable"


def confine_path(path: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]]) -> Path:
    """Resolve `path` (symlinks included) and require it to lie under one of `roots`.

    Relative paths are taken relative to the first root, so producers can send names.
    """
    if not roots:
        raise SlidePathDenied("no slide roots are configured (PROLIF_SLIDE_ROOTS)")
    real_roots = [Path(r).resolve() for r in roots]
    raw = Path(path)
    candidate = (raw if raw.is_absolute() else real_roots[0] / raw).resolve()
    if not any(candidate.is_relative_to(r) for r in real_roots):
        raise SlidePathDenied(f"{path} is outside the configured slide roots")
    if not candidate.exists():
        raise SlideNotFound(f"{path} does not exist")
    if not candidate.is_file():
        raise SlideUnreadable(f"{path} is not a file")
    return candidate


class Slide:
    """One open whole-slide image. Open once per worker and reuse: opening costs far more
    than reading a tile."""

    def __init__(self, path: Path, handle: Any, backend: str) -> None:
        self.path = path
        self._h = handle
        self.backend = backend
        self.dimensions: tuple[int, int] = tuple(handle.dimensions)  # type: ignore[assignment]
        self.level_dimensions: list[tuple[int, int]] = [tuple(d) for d in handle.level_dimensions]
        self.level_downsamples: list[float] = [float(d) for d in handle.level_downsamples]
        props = handle.properties
        prefix = "openslide" if backend == "openslide" else "tiffslide"
        self.mpp: float | None = _positive_float(props.get(f"{prefix}.mpp-x"))
        self.objective_power: float | None = _positive_float(props.get(f"{prefix}.objective-power"))

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def base_mpp(self) -> float | None:
        """Microns per level-0 pixel from mpp, else from objective power (10 / power)."""
        if self.mpp:
            return self.mpp
        if self.objective_power:
            return 10.0 / self.objective_power
        return None

    def read(self, x: int, y: int, level: int, width: int, height: int | None = None) -> np.ndarray:
        """RGB uint8 [H, W, 3] at `level`, top-left (x, y) in level-0 pixels.

        Transparent pixels (outside the scanned area) come back white, not black, so that
        they never look like tissue.
        """
        height = width if height is None else height
        if self.backend == "tiffslide":
            arr = self._h.read_region((x, y), level, (width, height), as_array=True)
            return np.ascontiguousarray(arr[..., :3])
        fast = _openslide_fast_read()
        if fast is not None and width > 0 and height > 0:
            return fast(self._h, x, y, level, width, height)
        image = self._h.read_region((x, y), level, (width, height))
        if image.getextrema()[3][0] == 255:  # fully opaque: PIL's RGB conversion, no numpy copy
            return np.asarray(image.convert("RGB"))
        rgba = np.asarray(image)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def associated_rgb(self, name: str) -> np.ndarray | None:
        """An associated image (label, macro, thumbnail) as RGB uint8, or None."""
        try:
            image = self._h.associated_images.get(name)
        except Exception:
            return None
        if image is None:
            return None
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.cache
def _openslide_fast_read() -> Any:
    """`openslide_read_region` straight into a numpy buffer, or None where that is not possible.

    OpenSlide returns premultiplied ARGB (native-endian uint32: B, G, R, A bytes on
    little-endian machines). Where every pixel is opaque, premultiplied and straight colour
    are the same, so RGB is three channel copies: no PIL image, no `tobytes`, no RGBA->RGB
    conversion (together ~1.5 ms of a 256 px tile, about half of the decode itself). Otherwise
    OpenSlide's own `argb2rgba` un-premultiplies, as `OpenSlide.read_region` does, and
    transparent pixels become white: the same pixels as the public path, bit for bit.
    The ctypes call releases the GIL, so a reader thread overlaps decoding with other work.
    """
    if sys.byteorder != "little":
        return None
    try:
        from openslide import _convert, lowlevel

        c_read = lowlevel._read_region  # private; checked here, public path otherwise
    except (ImportError, AttributeError):
        return None
    pointer = ctypes.POINTER(ctypes.c_uint32)

    def read(handle: Any, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        buf = np.empty((height, width), np.uint32)
        c_read(handle._osr, buf.ctypes.data_as(pointer), x, y, level, width, height)
        bgra = buf.view(np.uint8).reshape(height, width, 4)
        if bgra[..., 3].min() == 255:
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[..., 0] = bgra[..., 2]
            rgb[..., 1] = bgra[..., 1]
            rgb[..., 2] = bgra[..., 0]
            return rgb
        _convert.argb2rgba(buf)  # in place: R, G, B, A bytes, un-premultiplied
        rgba = buf.view(np.uint8).reshape(height, width, 4)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    return read


def _positive_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f > 0 else None


def open_slide(path: str | os.PathLike[str]) -> Slide:
    """Open with OpenSlide, falling back to tiffslide; raise `SlideUnreadable` with both
    readers' reasons when neither can."""
    p = Path(path)
    if not p.exists():
        raise SlideNotFound(f"{p} does not exist")
    import openslide

    try:
        return Slide(p, openslide.OpenSlide(str(p)), "openslide")
    except (openslide.OpenSlideError, OSError) as exc:
        first = f"OpenSlide: {exc}"
    import tiffslide

    try:
        handle = tiffslide.TiffSlide(str(p))
    except Exception as exc:  # tiffslide raises tifffile/zarr/value errors on garbage
        raise SlideUnreadable(f"cannot read {p.name}: {first}; tiffslide: {exc}") from exc
    try:
        if handle.level_count < 1 or min(handle.dimensions) < 1:
            raise SlideUnreadable(f"cannot read {p.name}: no image levels")
        handle.read_region((0, 0), handle.level_count - 1, (1, 1), as_array=True)
        return Slide(p, handle, "tiffslide")
    except SlideUnreadable:
        handle.close()
        raise
    except Exception as exc:
        handle.close()
        raise SlideUnreadable(f"cannot read {p.name}: {first}; tiffslide: {exc}") from exc
