"""Where the shared real slides are (../shared/data/slides beside the checkout), and small
synthetic slides made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SLIDES = Path(
    os.environ.get(
        "PROLIF_TEST_SLIDES", Path(__file__).resolve().parents[1].parent / "shared/data/slides"
    )
)
CMU = SLIDES / "cmu-1-small-region.svs"
TCGA = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
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
