"""The synthetic benchmark generator: layouts, readability, label semantics, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from prolifscore.core.grading.mitoses import MitosisGrading
from prolifscore.core.wsi.slide import open_slide
from prolifscore.synthetic.figures import plant_mitoses
from prolifscore.synthetic.mitosis_set import make_mitosis_dataset
from prolifscore.synthetic.slides import CLASS_COUNTS, make_synthetic_slides
from prolifscore.training.detector.regions import read_mitosis_dataset
from tests.slides import CMU, SLIDES

pytestmark = pytest.mark.skipif(not CMU.is_file(), reason="shared slides not available")


def _tissue_tile(seed: int = 0) -> np.ndarray:
    """Pink, textured 'tissue' everywhere (OD well above the tissue cutoff)."""
    rng = np.random.default_rng(seed)
    base = np.array([205, 140, 180], np.float32)
    return np.clip(base + rng.normal(0, 8, (256, 256, 3)), 0, 255).astype(np.uint8)


def _darkness_at(image: np.ndarray, row: float, col: float, r: int = 3) -> float:
    y, x = round(row), round(col)
    return float(image[y - r : y + r + 1, x - r : x + r + 1].astype(np.float32).mean())


def test_plant_mitoses_dark_spaced_figures_on_tissue() -> None:
    tile = _tissue_tile()
    out, centroids = plant_mitoses(tile, 5, np.random.default_rng(3), min_distance=40)
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert len(centroids) == 5
    pts = np.asarray(centroids)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) + np.eye(5) * 1e9
    assert d.min() >= 38  # min distance (alpha-weighted centroids move by a pixel or two)
    for r, c in centroids:
        assert _darkness_at(out, r, c) < 110 < _darkness_at(tile, r, c)
    # Figures are compact: pixels more than 32 px from every centroid are untouched.
    yy, xx = np.mgrid[0:256, 0:256]
    far = np.min([(yy - r) ** 2 + (xx - c) ** 2 for r, c in centroids], axis=0) > 32**2
    assert np.array_equal(out[far], tile[far])
    # Size: 6-12 um at 0.5 um/px, i.e. a dark area of roughly 40-450 px per figure.
    dark = (out.astype(np.int32).sum(-1) < 300) & ~far
    assert 40 * 5 <= dark.sum() <= 450 * 5
    again, same = plant_mitoses(tile, 5, np.random.default_rng(3), min_distance=40)
    assert np.array_equal(again, out) and same == centroids


def test_plant_mitoses_only_on_tissue() -> None:
    blank = np.full((256, 256, 3), 245, np.uint8)
    out, centroids = plant_mitoses(blank, 4, np.random.default_rng(0))
    assert centroids == [] and np.array_equal(out, blank)


@pytest.fixture(scope="module")
def aux_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mitosis_dataset(
        tmp_path_factory.mktemp("aux") / "data",
        cases=2,
        regions_per_case=4,
        region_size=256,
        seed=5,
        source_dir=SLIDES,
    )


def test_mitosis_dataset_layout(aux_set: Path) -> None:
    meta = json.loads((aux_set / "dataset.json").read_text())
    assert meta["synthetic"] is True and meta["mpp"] == 0.5
    tifs = sorted(aux_set.glob("*/*.tif"))
    assert [p.relative_to(aux_set).as_posix() for p in tifs] == [
        f"{c:02d}/{r:02d}.tif" for c in (1, 2) for r in (1, 2, 3, 4)
    ]
    with_csv = without = total = 0
    for tif in tifs:
        image = tifffile.imread(tif)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        with Image.open(tif) as im:  # a plain RGB TIFF any reader opens
            assert im.mode == "RGB" and im.size == (256, 256)
        csv_path = tif.with_suffix(".csv")
        if not csv_path.exists():
            without += 1
            continue
        with_csv += 1
        rows = list(csv.reader(csv_path.open()))
        assert rows and all(len(r) == 2 for r in rows)
        for r, c in ((int(a), int(b)) for a, b in rows):  # TUPAC: integer row,col, no header
            assert 0 <= r < 256 and 0 <= c < 256
            assert _darkness_at(image, r, c, 2) < 130  # the centroid sits on the dark figure
            total += 1
    assert with_csv and without, "the set must hold regions with and without mitoses"
    assert meta["regions_without_mitoses"] == without and meta["mitoses"] == total
    data = read_mitosis_dataset(aux_set)
    assert data.synthetic and data.mpp == 0.5 and len(data.regions) == 8
    assert sum(len(r.centroids) for r in data.regions) == total


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_mitosis_dataset_deterministic(aux_set: Path, tmp_path: Path) -> None:
    kw = {"cases": 2, "regions_per_case": 4, "region_size": 256, "source_dir": SLIDES}
    assert _digest(make_mitosis_dataset(tmp_path / "a", seed=5, **kw)) == _digest(aux_set)
    assert _digest(make_mitosis_dataset(tmp_path / "b", seed=6, **kw)) != _digest(aux_set)


def test_synthetic_slides(tmp_path: Path) -> None:
    out = make_synthetic_slides(tmp_path / "s", slides=3, seed=2, size_px=1024, source_dir=SLIDES)
    with (out / "ground_truth.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "tumor_score", "molecular_score"]
    scores = {r["slide_id"]: int(r["tumor_score"]) for r in rows}
    assert sorted(scores.values()) == [1, 2, 3]
    molecular = {r["slide_id"]: float(r["molecular_score"]) for r in rows}
    by_score = sorted(scores, key=scores.get)
    assert [molecular[s] for s in by_score] == sorted(molecular.values())
    with (out / "mitoses.csv").open() as f:
        mitoses = list(csv.DictReader(f))
    counts = {s: sum(m["slide_id"] == s for m in mitoses) for s in scores}
    grading = MitosisGrading()
    for slide_id, score in scores.items():
        lo, hi = CLASS_COUNTS[score]
        assert lo <= counts[slide_id] <= hi  # 1024 px < one 10-HPF window: no scaling
        assert grading.mitotic_score(counts[slide_id]) == score
    assert [counts[s] for s in by_score] == sorted(counts.values())
    for slide_id in scores:
        with open_slide(out / f"{slide_id}.tiff") as slide:
            assert slide.backend == "openslide"
            assert slide.base_mpp() == pytest.approx(0.5)
            assert slide.dimensions == (1024, 1024) and slide.level_count >= 2
            for m in (m for m in mitoses if m["slide_id"] == slide_id):
                x, y = float(m["x"]), float(m["y"])
                patch = slide.read(round(x) - 3, round(y) - 3, 0, 7)
                assert patch.astype(np.float32).mean() < 130  # a dark figure at (x, y)
    meta = json.loads((out / "slides.json").read_text())
    assert meta["synthetic"] and meta["mpp"] == 0.5
    again = make_synthetic_slides(tmp_path / "t", slides=3, seed=2, size_px=1024, source_dir=SLIDES)
    assert _digest(again) == _digest(out)
