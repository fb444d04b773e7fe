"""The shared real slides (located once, in bench: `SLIDES`, `CMU`, `TCGA`), the test-only ones
beside them, and small synthetic slides made on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import CMU, SLIDES, TCGA

__all__ = ["BROKEN", "CMU", "KIDNEY", "READABLE", "SLIDES", "TCGA", "write_blank_slide"]

KIDNEY = SLIDES / "kidney-48-5.tif"
BROKEN = SLIDES / "broken.svs"
READABLE = [CMU, TCGA, KIDNEY]


def write_blank_slide(path: Path, size: int = 1024) -> Path:
    """A tiled, pyramidal, all-white TIFF with 0.5 um/px: a slide without tissue."""
    import tifffile

    image = np.full((size, size, 3), 250, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            image,
            tile=(256, 256),
            photometric="rgb",
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
        )
    return path
