"""The preprocessing library: slide -> resolved spec, candidate tiles, kept tiles.

The tiling service calls `plan_slide`, the filtering workers call `TileSource`, and
`iter_kept_tiles` chains both in-process (tests, benchmarks, scoring) so that every route
computes exactly the same tiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from prolifscore.core.runtime.settings import PreprocessSettings
from prolifscore.core.wsi import roi as roi_lib
from prolifscore.core.wsi import stain as stain_lib
from prolifscore.core.wsi.geometry import (
    TileGeometry,
    mask_downsample_for,
    resolve_geometry,
    target_mpp_from,
)
from prolifscore.core.wsi.prefetch import prefetched
from prolifscore.core.wsi.slide import Slide
from prolifscore.core.wsi.tissue import (
    CoverageMap,
    FastCriterion,
    compute_coverage_map,
    reference_keep,
)
from prolifscore.v1 import pipeline_pb2 as pb

# Bump when a change alters which pixels a spec produces: it renames every shard.
PIPELINE_VERSION = 1

# Mode `seed` is the reference (seed) study's per-tile test (`reference_keep`), not a random seed.
_MODES = {"fast": pb.TISSUE_MODE_FAST, "seed": pb.TISSUE_MODE_SEED}
_STAINS = {
    "none": pb.STAIN_NORMALIZATION_NONE,
    "macenko": pb.STAIN_NORMALIZATION_MACENKO,
    "reinhard": pb.STAIN_NORMALIZATION_REINHARD,
}


class SpecError(ValueError):
    """An ingest message asks for an impossible spec."""


def _enum(value: int, name: str, table: dict[str, int]) -> int:
    if value:
        return value
    if name not in table:
        raise SpecError(f"unknown setting {name!r}; expected one of {sorted(table)}")
    return table[name]


def resolve_spec(
    slide: Slide,
    overrides: pb.TilingSpec,
    defaults: PreprocessSettings,
    roi_digest: str = "",
) -> tuple[pb.ResolvedSpec, TileGeometry, list[str]]:
    """Merge per-slide overrides with defaults, resolve the geometry, name the spec by hash
    (regions of interest, by their digest, are part of the name)."""
    o = overrides
    target = target_mpp_from(
        o.target_magnification if o.HasField("target_magnification") else None,
        o.target_mpp if o.HasField("target_mpp") else None,
        defaults.target_mpp,
    )
    tile_size = o.tile_size if o.HasField("tile_size") else defaults.tile_size
    overlap = o.overlap if o.HasField("overlap") else defaults.overlap
    threshold = o.tissue_threshold if o.HasField("tissue_threshold") else defaults.tissue_threshold
    max_tiles = o.max_tiles if o.HasField("max_tiles") else defaults.max_tiles
    if not 0.0 <= threshold <= 1.0:
        raise SpecError(f"tissue_threshold must be within [0, 1], got {threshold}")
    if max_tiles < 0:
        raise SpecError(f"max_tiles must be >= 0, got {max_tiles}")
    if not 16 <= tile_size <= 4096:
        raise SpecError(f"tile_size must be within [16, 4096], got {tile_size}")
    try:
        geometry = resolve_geometry(
            slide.dimensions,
            slide.level_downsamples,
            slide.base_mpp(),
            target_mpp=target,
            tile_size=tile_size,
            overlap=overlap,
            assumed_mpp=defaults.default_mpp,
        )
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    warnings = []
    if geometry.base_mpp_assumed:
        warnings.append(
            f"slide has no mpp or objective-power metadata; assumed {defaults.default_mpp} um/px"
        )
    if geometry.read_size < geometry.tile_size:
        warnings.append(
            f"slide resolution ({geometry.base_mpp} um/px) is coarser than the target "
            f"({target} um/px): tiles are upsampled"
        )
    spec = pb.ResolvedSpec(
        level=geometry.level,
        level_downsample=geometry.level_downsample,
        read_size=geometry.read_size,
        tile_size=geometry.tile_size,
        overlap=geometry.overlap,
        stride0=geometry.stride0,
        footprint0=geometry.footprint0,
        base_mpp=geometry.base_mpp,
        base_mpp_assumed=geometry.base_mpp_assumed,
        target_mpp=target,
        tissue_threshold=threshold,
        tissue_mode=_enum(o.tissue_mode, defaults.tissue_mode, _MODES),
        stain_normalization=_enum(o.stain_normalization, defaults.stain_normalization, _STAINS),
        max_tiles=max_tiles,
        roi_digest=roi_digest,
    )
    spec.spec_hash = spec_hash(spec, defaults.batch_size)
    return spec, geometry, warnings


def spec_hash(spec: pb.ResolvedSpec, batch_size: int) -> str:
    """Stable name of everything that decides a shard's content (and its batch boundaries)."""
    fields = {f.name: v for f, v in spec.ListFields() if f.name != "spec_hash"}
    fields.update(batch_size=batch_size, version=PIPELINE_VERSION)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class SlidePlan:
    spec: pb.ResolvedSpec
    geometry: TileGeometry
    coverage: CoverageMap
    candidates: list[pb.Tile]
    stain: pb.StainFit
    warnings: list[str] = field(default_factory=list)
    grid_tiles: int = 0


def plan_slide(
    slide: Slide,
    slide_id: str,
    overrides: pb.TilingSpec,
    defaults: PreprocessSettings,
    rois: Sequence[pb.Polygon] = (),
) -> SlidePlan:
    """Grid + low-resolution tissue mask -> the tiles worth reading, and the stain fit. With
    regions of interest, only grid tiles whose centre lies in one are candidates (`roi.py`)."""
    try:
        regions = roi_lib.validate(rois)
    except roi_lib.RoiError as exc:
        raise SpecError(f"regions of interest: {exc}") from exc
    spec, geometry, warnings = resolve_spec(slide, overrides, defaults, roi_lib.digest(regions))
    criterion = FastCriterion(spec.tissue_threshold)
    every_tile = spec.tissue_mode == pb.TISSUE_MODE_SEED  # the reference study reads them all
    cols, rows = np.meshgrid(np.arange(geometry.cols), np.arange(geometry.rows))
    cols, rows = cols.ravel(), rows.ravel()  # row-major grid order
    window = None  # the level-0 box the coverage map covers: the whole slide without regions
    if regions:
        half = geometry.footprint0 / 2
        inside = roi_lib.contains(
            regions, cols * geometry.stride0 + half, rows * geometry.stride0 + half
        )
        cols, rows = cols[inside], rows[inside]
        if not len(cols):
            warnings.append("no tile of the slide's grid has its centre in the regions of interest")
        else:
            x0, y0 = int(cols.min()) * geometry.stride0, int(rows.min()) * geometry.stride0
            x1 = int(cols.max()) * geometry.stride0 + geometry.footprint0
            window = (x0, y0, x1, int(rows.max()) * geometry.stride0 + geometry.footprint0)
    cmap = compute_coverage_map(
        slide, mask_downsample_for(geometry), threads=defaults.read_threads, region=window
    )
    xs, ys = cols * geometry.stride0, rows * geometry.stride0
    cov = cmap.coverages(xs, ys, geometry.footprint0)
    chosen = np.arange(len(cov)) if every_tile else np.flatnonzero(cov >= criterion.candidate_min)
    candidates = [
        pb.Tile(
            col=int(cols[i]),
            row=int(rows[i]),
            x=int(xs[i]),
            y=int(ys[i]),
            coarse_tissue=float(cov[i]),
        )
        for i in chosen
    ]
    if spec.max_tiles and len(candidates) > spec.max_tiles:
        rng = np.random.default_rng(zlib.crc32(slide_id.encode()))
        chosen = np.sort(rng.choice(len(candidates), spec.max_tiles, replace=False))
        candidates = [candidates[i] for i in chosen]
    stain_fit = pb.StainFit()
    if candidates and spec.stain_normalization != pb.STAIN_NORMALIZATION_NONE:
        stain_fit = fit_stain(slide, spec, candidates)
    return SlidePlan(
        spec=spec,
        geometry=geometry,
        coverage=cmap,
        candidates=candidates,
        stain=stain_fit,
        warnings=warnings,
        grid_tiles=geometry.tile_count,
    )


STAIN_FIT_TILES = 16
READ_AHEAD = 8  # tiles per reader thread decoded ahead of the tissue test (~200 KiB each)


def fit_stain(slide: Slide, spec: pb.ResolvedSpec, candidates: list[pb.Tile]) -> pb.StainFit:
    """Fit once per slide on its most tissue-rich candidate tiles at tiling resolution.

    Not on the thumbnail: downsampling blurs nuclei, which lowers the fitted maximum
    concentrations (CMU-1: [2.24, 2.05] from a thumbnail vs [3.58, 2.70] from tiles) and
    would darken every normalized tile. Raises StainFitError with too little tissue.
    """
    best = sorted(candidates, key=lambda t: (-t.coarse_tissue, t.row, t.col))[:STAIN_FIT_TILES]
    source = TileSource(slide, spec, pb.StainFit())
    pixels = np.stack([source.read(t) for t in best])
    if spec.stain_normalization == pb.STAIN_NORMALIZATION_MACENKO:
        return pb.StainFit(**stain_lib.fit_macenko(pixels).to_lists())
    return pb.StainFit(**stain_lib.fit_reinhard(pixels).to_lists())


class TileSource:
    """Reads, tests and normalizes the tiles of one slide for one spec (one per worker)."""

    def __init__(self, slide: Slide, spec: pb.ResolvedSpec, stain: pb.StainFit) -> None:
        self.slide = slide
        self.spec = spec
        self.criterion = FastCriterion(spec.tissue_threshold)
        has_fit = bool(stain.stain_matrix or stain.lab_mean)
        self.normalize = _normalizer(spec.stain_normalization, stain) if has_fit else None

    def read(self, tile: pb.Tile) -> np.ndarray:
        s = self.spec
        rgb = self.slide.read(tile.x, tile.y, s.level, s.read_size)
        if s.read_size != s.tile_size:
            resample = (
                Image.Resampling.BOX if s.read_size > s.tile_size else Image.Resampling.BILINEAR
            )
            rgb = np.asarray(Image.fromarray(rgb).resize((s.tile_size, s.tile_size), resample))
        return rgb

    def keep(self, tile: pb.Tile, rgb: np.ndarray) -> tuple[bool, float]:
        if self.spec.tissue_mode == pb.TISSUE_MODE_SEED:
            return reference_keep(rgb, self.spec.tissue_threshold)
        return self.criterion.keep(tile.coarse_tissue, rgb)

    def process(self, tile: pb.Tile) -> tuple[np.ndarray, float] | None:
        """(pixels as stored, tissue fraction) of a kept tile, else None."""
        return self.finish(tile, self.read(tile))

    def finish(self, tile: pb.Tile, rgb: np.ndarray) -> tuple[np.ndarray, float] | None:
        """`process` after the read: tissue test and stain normalization of `rgb`."""
        keep, fraction = self.keep(tile, rgb)
        if not keep:
            return None
        return (self.normalize(rgb) if self.normalize else rgb), fraction

    def read_ahead(
        self, tiles: Sequence[pb.Tile], reader: Executor, depth: int = READ_AHEAD
    ) -> Iterator[tuple[pb.Tile, np.ndarray]]:
        """(tile, `read(tile)`) in order, read up to `depth` tiles ahead (`prefetched`): the
        caller's tissue test, encoding and writing overlap the next tiles' decoding."""
        return prefetched(tiles, self.read, reader, depth)


def _normalizer(kind: int, fit: pb.StainFit):  # type: ignore[no-untyped-def]
    if kind == pb.STAIN_NORMALIZATION_MACENKO:
        return stain_lib.MacenkoNormalizer(
            stain_lib.MacenkoFit.from_lists(list(fit.stain_matrix), list(fit.max_concentrations))
        )
    if kind == pb.STAIN_NORMALIZATION_REINHARD:
        return stain_lib.ReinhardNormalizer(
            stain_lib.ReinhardFit.from_lists(list(fit.lab_mean), list(fit.lab_std))
        )
    return None


def iter_kept_tiles(slide: Slide, plan: SlidePlan) -> Iterator[tuple[pb.Tile, np.ndarray, float]]:
    """Every kept tile of a plan, in grid order: what the services write, computed directly."""
    source = TileSource(slide, plan.spec, plan.stain)
    for tile in plan.candidates:
        result = source.process(tile)
        if result is not None:
            yield tile, result[0], result[1]


def batches(candidates: list[pb.Tile], batch_size: int) -> list[list[pb.Tile]]:
    """Fixed-size batches in grid order; a slide with no candidates is one empty batch, so
    that it still completes (with zero tiles) through the same path."""
    if not candidates:
        return [[]]
    return [candidates[i : i + batch_size] for i in range(0, len(candidates), batch_size)]


def tile_tasks(
    plan: SlidePlan,
    slide_id: str,
    path: str | os.PathLike[str],
    batch_size: int,
    *,
    tiles: Sequence[pb.Tile] | None = None,
    labels: pb.Labels | None = None,
    split: int = pb.SPLIT_UNSPECIFIED,
    run_id: str = "",
) -> list[pb.TileTask]:
    """The plan's candidates (or `tiles`, some of them) as the filter workers' tile tasks, one
    per batch (`batches`), each with the slide, its labels, the spec and the stain fit: what
    the tiling service publishes, and what tests and benchmarks feed a `BatchFilter`."""
    tiles = plan.candidates if tiles is None else list(tiles)
    groups = batches(tiles, batch_size)
    return [
        pb.TileTask(
            slide_id=slide_id,
            path=str(path),
            labels=labels,
            split=split,
            spec=plan.spec,
            stain=plan.stain,
            batch_index=i,
            batch_count=len(groups),
            tiles=group,
            run_id=run_id,
            candidate_tiles=len(tiles),
        )
        for i, group in enumerate(groups)
    ]
