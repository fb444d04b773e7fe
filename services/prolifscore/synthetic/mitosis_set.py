"""A synthetic mitosis detector data set in the TUPAC16 auxiliary layout (`<case>/<region>.tif`
regions and `<case>/<region>.csv` centroids): real tissue crops with planted figures and
mimics, compressed like a scanner's tiles."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from prolifscore.synthetic.figures import (
    MIMICS_PER_MM2,
    SYNTHETIC_NOTE,
    area_mm2,
    plant_mimics,
    plant_mitoses,
)
from prolifscore.synthetic.sources import (
    DEFAULT_SOURCES,
    SYNTHETIC_MPP,
    sample_crop,
    sources,
    tissue_windows,
)


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
    levels = sources(source_dir)
    windows = [tissue_windows(lv, region_size, 0.6, 32) for lv in levels]
    if not any(len(w) for w in windows):
        raise ValueError(f"no tissue-rich {region_size} px window in the source slides")
    mimic_count = mimics_per_mm2 * area_mm2((region_size, region_size), mpp)
    total = empty = 0
    for case in range(1, cases + 1):
        case_dir = out / f"{case:02d}"
        case_dir.mkdir(exist_ok=True)
        for region in range(1, regions_per_case + 1):
            image = sample_crop(levels, windows, region_size, rng)
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
        "note": SYNTHETIC_NOTE,
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
