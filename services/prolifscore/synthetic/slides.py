"""Scored synthetic slides: small OpenSlide-readable pyramidal slides of real tissue tiles whose
planted mitosis density defines their score, with TUPAC16-style labels. A machinery check for
the tumor model and the mitosis-count route, not a TUPAC16 result."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prolifscore.core.grading.mitoses import MitosisGrading
from prolifscore.synthetic.figures import (
    MIMICS_PER_MM2,
    SYNTHETIC_NOTE,
    area_mm2,
    plant_mimics,
    plant_mitoses,
)
from prolifscore.synthetic.pyramid import TILE, write_image_pyramid
from prolifscore.synthetic.sources import SYNTHETIC_MPP, orient, source_tiles

# Planted mitoses per slide, by score: the number in the densest 10-HPF window, which is what
# `MitosisGrading` grades (<= 7 -> 1, 8-14 -> 2, >= 15 -> 3). A 2048 px slide at 0.5 um/px is
# 1.05 mm^2 = 5.3 HPF, smaller than that window (2.8 mm side), so the window holds the whole
# slide and these are the per-slide counts; each range sits >= 3 inside its class. Per 256 px
# tile that is ~0.04 / 0.17 / 0.7 mitoses: class-3 tiles mostly show one, class-1 tiles
# almost never.
CLASS_COUNTS: dict[int, tuple[int, int]] = {1: (1, 4), 2: (10, 12), 3: (36, 54)}


@dataclass(frozen=True)
class SyntheticSlide:
    slide_id: str
    path: Path
    tumor_score: int
    molecular_score: float
    mitoses: list[tuple[float, float]]  # level-0 (x, y)


def _mosaic(
    tissue: Sequence[np.ndarray], tiles_per_side: int, rng: np.random.Generator
) -> np.ndarray:
    """A square slide of randomly chosen and oriented real tissue tiles (grid-aligned, so the
    pipeline's 256 px tiles are exactly these tiles)."""
    n = tiles_per_side
    out = np.empty((n * TILE, n * TILE, 3), np.uint8)
    for i in range(n):
        for j in range(n):
            t = tissue[int(rng.integers(len(tissue)))]
            out[i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE] = orient(
                t, int(rng.integers(8))
            )
    return out


def molecular_for(score: int, rng: np.random.Generator) -> float:
    """A stand-in for TUPAC16's PAM50 proliferation score: rises with the class, plus noise
    (Spearman with the class ~0.8 on balanced sets)."""
    return round(float(-0.5 + 0.4 * (score - 1) + rng.normal(0.0, 0.15)), 4)


@dataclass(frozen=True)
class _SlidePlan:
    """What every slide of a set shares."""

    size_px: int
    mpp: float
    quality: int
    area_mm2: float
    count_scale: float  # the class counts' scale: slide area over one 10-HPF window, if larger
    mimics_per_mm2: float


def make_synthetic_slides(
    out_dir: Path | str,
    *,
    slides: int = 12,
    seed: int = 0,
    size_px: int = 2048,
    mpp: float = SYNTHETIC_MPP,
    quality: int = 90,
    prefix: str = "SYN",
    mimics_per_mm2: float = MIMICS_PER_MM2,
    source_dir: Path | None = None,
) -> Path:
    """Write `<prefix>-NNN.tiff` pyramidal slides (OpenSlide generic tiled TIFF, mpp in the
    tags), `ground_truth.csv` (`slide_id,tumor_score,molecular_score`), `mitoses.csv`
    (`slide_id,x,y` level-0 centroids) and `slides.json`; returns out_dir.

    Scores are balanced over 1-3 (shuffled); a slide of score s gets a count drawn from
    `CLASS_COUNTS[s]`, scaled by the slide's area over one 10-HPF window when the slide is
    larger than the window. Tiles are pooled from both sources regardless of score, so the
    tissue itself says nothing about the score. Deterministic for a seed.
    """
    if slides < 1 or size_px < TILE or size_px % TILE:
        raise ValueError(f"need slides >= 1 and size_px a positive multiple of {TILE}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tissue = source_tiles(source_dir)
    grading = MitosisGrading()
    window_mm2 = 10 * grading.hpf_area_mm2
    area = area_mm2((size_px, size_px), mpp)
    plan = _SlidePlan(
        size_px=size_px,
        mpp=mpp,
        quality=quality,
        area_mm2=area,
        count_scale=max(1.0, area / window_mm2),
        mimics_per_mm2=mimics_per_mm2,
    )
    scores = np.resize(np.array([1, 2, 3]), slides)
    rng.shuffle(scores)
    made = [
        _make_slide(out / f"{prefix}-{k:03d}.tiff", int(score), tissue, plan, rng)
        for k, score in enumerate(scores.tolist(), start=1)
    ]
    _write_labels(out, made)
    _write_meta(out, made, plan, seed, grading.hpf_area_mm2)
    return out


def _make_slide(
    path: Path,
    score: int,
    tissue: Sequence[np.ndarray],
    plan: _SlidePlan,
    rng: np.random.Generator,
) -> SyntheticSlide:
    """One slide of `score` at `path`: a tissue mosaic, its class's count of planted mitoses
    (all of them, or an error), mimics."""
    slide_id = path.stem
    lo, hi = CLASS_COUNTS[score]
    count = round(int(rng.integers(lo, hi + 1)) * plan.count_scale)
    image = _mosaic(tissue, plan.size_px // TILE, rng)
    image, centroids = plant_mitoses(image, count, rng)
    if len(centroids) != count:
        raise RuntimeError(f"{slide_id}: only {len(centroids)} of {count} mitoses fit")
    mimics = int(rng.poisson(plan.mimics_per_mm2 * plan.area_mm2))
    image = plant_mimics(image, mimics, rng, avoid=centroids)
    write_image_pyramid(path, image, mpp=plan.mpp, quality=plan.quality, smallest_side=512)
    return SyntheticSlide(
        slide_id=slide_id,
        path=path,
        tumor_score=score,
        molecular_score=molecular_for(score, rng),
        mitoses=[(c, r) for r, c in centroids],
    )


def _write_labels(out: Path, made: Sequence[SyntheticSlide]) -> None:
    """`ground_truth.csv` (TUPAC16's training labels) and `mitoses.csv` (level-0 centroids)."""
    with (out / "ground_truth.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "tumor_score", "molecular_score"])
        for s in made:
            w.writerow([s.slide_id, s.tumor_score, s.molecular_score])
    with (out / "mitoses.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "x", "y"])
        for s in made:
            for x, y in s.mitoses:
                w.writerow([s.slide_id, round(x, 1), round(y, 1)])


def _write_meta(
    out: Path, made: Sequence[SyntheticSlide], plan: _SlidePlan, seed: int, hpf_mm2: float
) -> None:
    tiles = (plan.size_px // TILE) ** 2
    meta = {
        "synthetic": True,
        "note": SYNTHETIC_NOTE,
        "mpp": plan.mpp,
        "seed": seed,
        "size_px": plan.size_px,
        "area_mm2": round(plan.area_mm2, 4),
        "hpf_mm2": hpf_mm2,
        "class_counts_per_10hpf_window": {str(k): list(v) for k, v in CLASS_COUNTS.items()},
        "count_scale": round(plan.count_scale, 4),
        "mimics_per_mm2": plan.mimics_per_mm2,
        "slides": [
            {
                "slide_id": s.slide_id,
                "file": s.path.name,
                "tumor_score": s.tumor_score,
                "molecular_score": s.molecular_score,
                "mitoses": len(s.mitoses),
                "mitoses_per_tile": round(len(s.mitoses) / tiles, 3),
            }
            for s in made
        ],
    }
    (out / "slides.json").write_text(json.dumps(meta, indent=2))
