"""Timed runs of both sides of the preprocessing benchmark.

Pipeline side: open + `plan_slide` (tiling, with its coverage map) + every tile task through
`BatchFilter.process` (read, tissue test, TFRecord shard and marker written), in one process.
Decode side: `openslide.OpenSlide.read_region` of the pipeline's kept tiles, slide opened once.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prolifscore.core.runtime.settings import PreprocessSettings, load
from prolifscore.core.wsi.preprocess import SlidePlan, TileSource, plan_slide, tile_tasks
from prolifscore.core.wsi.shards import write_marker
from prolifscore.core.wsi.slide import open_slide
from prolifscore.core.wsi.tfrecord import AtomicShardWriter, TileLabels, TileRecord, tile_example
from prolifscore.filtering.worker import BatchFilter
from prolifscore.v1 import pipeline_pb2 as pb

TileKey = tuple[int, int]  # (col, row)


def defaults() -> PreprocessSettings:
    """The services' defaults, unaffected by this shell's PROLIF_* variables."""
    return load(PreprocessSettings, environ={})


@dataclass
class Workload:
    """The tile tasks of one slide (or of a band of grid rows of it), as the tiling service
    would publish them."""

    name: str
    path: Path
    overrides: pb.TilingSpec
    plan: SlidePlan
    tasks: list[bytes]
    candidates: int
    rows: tuple[int, int] | None = None  # grid rows [first, last) when only a band is used

    @property
    def plan_share(self) -> float:
        """Share of the per-slide planning cost charged to this workload (by candidates)."""
        return self.candidates / max(1, len(self.plan.candidates))

    @property
    def spec(self) -> pb.ResolvedSpec:
        return self.plan.spec


def band_rows(plan: SlidePlan, target: int) -> tuple[int, int]:
    """Contiguous grid rows around the slide's middle row holding >= `target` candidates."""
    per_row = Counter(t.row for t in plan.candidates)
    first = last = plan.geometry.rows // 2
    count = 0
    while count < target and (first > 0 or last < plan.geometry.rows):
        if last < plan.geometry.rows:
            count += per_row.get(last, 0)
            last += 1
        if count < target and first > 0:
            first -= 1
            count += per_row.get(first, 0)
    return first, last


def make_workload(
    name: str,
    path: Path,
    overrides: pb.TilingSpec | None = None,
    band_candidates: int = 0,
    rows: tuple[int, int] | None = None,
    settings: PreprocessSettings | None = None,
) -> Workload:
    """Plan `path` and cut its candidates (all, those of grid `rows`, or a middle band of
    about `band_candidates`) into tile tasks exactly as the tiling service does."""
    settings = settings or defaults()
    overrides = overrides or pb.TilingSpec()
    with open_slide(path) as slide:
        plan = plan_slide(slide, name, overrides, settings)
    if rows is None and band_candidates:
        rows = band_rows(plan, band_candidates)
    tiles = plan.candidates
    if rows is not None:
        tiles = [t for t in tiles if rows[0] <= t.row < rows[1]]
    tasks = [
        task.SerializeToString()
        for task in tile_tasks(plan, name, path, settings.batch_size, tiles=tiles)
    ]
    return Workload(name, path, overrides, plan, tasks, len(tiles), rows)


@dataclass
class PipelineRun:
    seconds: float  # charged plan share + filtering
    plan_seconds: float  # open + plan_slide, whole slide
    filter_seconds: float
    cpu_seconds: float  # CPU time of all threads, charged like `seconds`
    kept: set[TileKey] = field(default_factory=set)
    shard_bytes: int = 0


def run_pipeline(work: Workload, out_dir: Path) -> PipelineRun:
    """Plan the slide again (timed) and push every task through one BatchFilter. Shards go
    to `out_dir`, which is deleted afterwards (outside the timing)."""
    settings = defaults()
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        with open_slide(work.path) as slide:
            plan_slide(slide, work.name, work.overrides, settings)
        planned, cpu_planned = time.perf_counter(), time.process_time()
        worker = BatchFilter(str(out_dir), (str(work.path.parent),))
        results = [worker.process(task) for task in work.tasks]
        done, cpu_done = time.perf_counter(), time.process_time()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    kept: set[TileKey] = set()
    size = 0
    for r in results:
        if "error" in r:
            raise RuntimeError(f"{work.name}: batch {r['batch_index']} failed: {r['error']}")
        kept.update((c, w) for c, w in r["kept"])
        size += r["size_bytes"]
    plan_s, filter_s = planned - start, done - planned
    cpu = (cpu_planned - cpu_start) * work.plan_share + cpu_done - cpu_planned
    return PipelineRun(plan_s * work.plan_share + filter_s, plan_s, filter_s, cpu, kept, size)


def kept_origins(work: Workload, kept: set[TileKey]) -> list[tuple[int, int]]:
    """Level-0 top-left of each kept tile, in grid order (the order the pipeline reads)."""
    return [(t.x, t.y) for t in work.plan.candidates if (t.col, t.row) in kept]


def run_decode(
    path: Path, level: int, size: int, origins: Sequence[tuple[int, int]]
) -> tuple[float, float]:
    """(seconds, CPU seconds) to open `path` with OpenSlide once and read_region every origin."""
    import openslide

    start, cpu_start = time.perf_counter(), time.process_time()
    osr = openslide.OpenSlide(str(path))
    try:
        for xy in origins:
            osr.read_region(xy, level, (size, size))
    finally:
        osr.close()
    return time.perf_counter() - start, time.process_time() - cpu_start


def warm_file_cache(path: Path, chunk: int = 16 << 20) -> None:
    """Read the whole file once so that both sides start from the OS page cache."""
    with open(path, "rb") as f:
        while f.read(chunk):
            pass


@dataclass
class RatioResult:
    pipeline: list[PipelineRun]
    decode: list[tuple[float, float]]  # (seconds, CPU seconds) per run
    kept: int

    @property
    def pipeline_tps(self) -> float:
        return self.kept / min(r.seconds for r in self.pipeline)

    @property
    def decode_tps(self) -> float:
        return self.kept / min(s for s, _ in self.decode)

    @property
    def ratio(self) -> float:
        return self.pipeline_tps / self.decode_tps

    @property
    def cpu_ratio(self) -> float:
        """Decode CPU / pipeline CPU for the same kept tiles (best of each): what the
        pipeline costs in cores, which threads cannot hide."""
        return min(c for _, c in self.decode) / min(r.cpu_seconds for r in self.pipeline)


def measure_ratio(work: Workload, out_dir: Path, reps: int = 3) -> RatioResult:
    """Pipeline vs bare decode of the same kept tiles, best of `reps` each, run alternately
    (ABBA order) after warming the file cache."""
    warm_file_cache(work.path)
    first = run_pipeline(work, out_dir)  # also finds the kept set
    origins = kept_origins(work, first.kept)
    level, size = work.spec.level, work.spec.read_size
    pipeline = [first]
    decode: list[tuple[float, float]] = []
    for i in range(reps):
        if i % 2 == 0:
            decode.append(run_decode(work.path, level, size, origins))
            if i:
                pipeline.append(run_pipeline(work, out_dir))
        else:
            pipeline.append(run_pipeline(work, out_dir))
            decode.append(run_decode(work.path, level, size, origins))
    for run in pipeline[1:]:
        if run.kept != first.kept:
            raise RuntimeError(f"{work.name}: kept set changed between runs")
    return RatioResult(pipeline, decode, len(first.kept))


def stage_breakdown(work: Workload, out_dir: Path, sample: int = 300) -> dict[str, float]:
    """Milliseconds per tile of each step of `BatchFilter.process` on the workload's first
    `sample` candidates, with bare `read_region` of the same tiles for reference."""
    import openslide

    tiles = [t for task in work.tasks for t in pb.TileTask.FromString(task).tiles][:sample]
    spec = work.spec
    ms: dict[str, float] = dict.fromkeys(
        ("bare_read_region", "slide_read", "keep", "contiguous_copy", "tile_example", "write"),
        0.0,
    )
    labels = TileLabels(work.name, spec.spec_hash, spec.level, split="train")
    kept = borderline = 0
    shutil.rmtree(out_dir, ignore_errors=True)
    clock = time.perf_counter
    try:
        osr = openslide.OpenSlide(str(work.path))
        with open_slide(work.path) as slide, AtomicShardWriter(out_dir / "b.tfrecord") as writer:
            source = TileSource(slide, spec, work.plan.stain)
            for tile in tiles:
                t0 = clock()
                osr.read_region((tile.x, tile.y), spec.level, (spec.read_size, spec.read_size))
                t1 = clock()
                rgb = source.read(tile)
                t2 = clock()
                keep, fraction = source.keep(tile, rgb)
                t3 = clock()
                ms["bare_read_region"] += t1 - t0
                ms["slide_read"] += t2 - t1
                ms["keep"] += t3 - t2
                borderline += source.criterion.needs_pixels(tile.coarse_tissue)
                if not keep:
                    continue
                kept += 1
                t4 = clock()
                pixels = np.ascontiguousarray(rgb)
                t5 = clock()
                record = tile_example(
                    TileRecord(pixels, tile.col, tile.row, tile.x, tile.y, fraction), labels
                )
                t6 = clock()
                writer.write(record)
                t7 = clock()
                ms["contiguous_copy"] += t5 - t4
                ms["tile_example"] += t6 - t5
                ms["write"] += t7 - t6
            t8 = clock()
            writer.commit()
            write_marker(out_dir, work.name, spec.spec_hash, 0, 1, {"tile_count": kept})
            commit = clock() - t8
        osr.close()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    n, k = max(1, len(tiles)), max(1, kept)
    out: dict[str, float] = {}
    for name, seconds in ms.items():
        if name in _PER_CANDIDATE:
            out[f"{name}_ms_per_candidate"] = 1e3 * seconds / n
        else:
            out[f"{name}_ms_per_kept"] = 1e3 * seconds / k
    out["shard_commit_and_marker_ms_per_shard"] = 1e3 * commit
    out["borderline_share_of_candidates"] = borderline / n
    out["kept_share_of_candidates"] = kept / n
    out["sampled_candidates"] = float(len(tiles))
    return out


_PER_CANDIDATE = ("bare_read_region", "slide_read", "keep")


def jaccard(a: set[TileKey], b: set[TileKey]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0
