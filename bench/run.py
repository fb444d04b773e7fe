"""`make bench`: preprocessing throughput, criterion speed/agreement, Ray scaling, memory,
scoring (gRPC end to end vs bare decode + in-process model call, pipelined reading).

A run writes its results (metric name -> number, plus `_note*` strings) to
build/bench/results.json (`--out` elsewhere) and prints a table. The committed figures,
bench/results.json and the README's table, change only with `--update` (`make bench-update`).
Ratios are measured within one run (both sides alternately, best of several): this machine is
small and noisy, so absolute tiles/s are context, not targets.

`python -m bench.run --only scoring` (or `--only ratio,ray`, ...) runs some sections (with what
they need) and merges their entries into the previous results: those of the file it writes,
or the committed ones where that file does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import CMU, OUTPUT, RESULTS, TCGA, WORK_DIR
from bench.child import run_child
from bench.large_slide import PyramidInfo, PyramidSpec, build_pyramid
from bench.pipeline import (
    Workload,
    jaccard,
    make_workload,
    measure_ratio,
    run_pipeline,
    stage_breakdown,
)
from bench.rayrun import ray_scaling
from bench.scoring import ScoringConfig, bench_scoring
from bench.scoring_perf import PerfConfig, bench_bf16, bench_concurrency, bench_large
from bench.table import TARGETS, update_readme
from bench.viewer import ViewerBenchConfig, bench_viewer
from prolifscore.v1 import pipeline_pb2 as pb

SECTIONS = ("pyramid", "ratio", "breakdown", "fast_vs_seed", "rss", "ray", "viewer", "scoring")
SECTIONS += ("bf16", "large_scoring", "concurrency")  # scoring on users' CPUs (bench/scoring_perf)
SECTIONS += ("whole_slide",)
# Run only when named in --only: the whole 50k slide takes ~30 min (both sides) on 2 cores.
OPT_IN = ("whole_slide",)
SCORING_SECTIONS = ("scoring", "bf16", "large_scoring", "concurrency", "whole_slide")
NEEDS = {"ratio": ("pyramid",), "breakdown": ("ratio",), "fast_vs_seed": ("ratio",)}
NEEDS |= {"rss": ("ratio",), "ray": ("ratio",), "viewer": ("pyramid",)}
NEEDS |= {"large_scoring": ("pyramid",), "whole_slide": ("pyramid",)}
# Tissue mode `seed`: the reference (seed) study's per-tile test, as the results' `seed` keys.
REFERENCE_SPEC = pb.TilingSpec(tissue_mode=pb.TISSUE_MODE_SEED)
PIPELINE_SIDE = (
    "Pipeline side: one process, the service code (open + plan_slide, then BatchFilter.process "
    "per task), with the services' defaults: 2 reader threads decode tiles ahead "
    "(PROLIF_FILTER_READ_THREADS; OpenSlide releases the GIL) while the calling thread runs "
    "the tissue test, encodes and writes shards (fsync + rename, marker after, as in the "
    "service); plan_slide's coverage map reads its strips in 2 threads (PROLIF_READ_THREADS). "
    "Decode side: bare single-threaded OpenSlide read_region of the kept tiles, slide opened "
    "once, unchanged. So the pipeline may use both cores and the decode side one: the wall "
    "ratio is what one pipeline process delivers against one plain decoding loop; "
    "*_cpu_ratio (decode CPU seconds / pipeline CPU seconds, all threads) is the cost in "
    "cores, which threads cannot hide."
)


@dataclass(frozen=True)
class Config:
    pyramid: PyramidSpec = field(default_factory=PyramidSpec)
    band_candidates: int = 3000  # candidates of the large slide in the timed workloads
    small_reps: int = 5
    large_reps: int = 3
    seed_reps: int = 2
    seed_rows: int = 2  # grid rows of the large slide compared with the seed criterion
    breakdown_sample: int = 300
    ray_rounds: int = 2
    ray_tasks: int = 32  # first tasks of the large band (64 candidates each) per Ray run
    rss_tasks: int = 16  # first tasks of the large band for the filter worker's peak RSS
    work_dir: Path = WORK_DIR
    slides: tuple[tuple[str, Path], ...] = (("cmu", CMU), ("tcga", TCGA))
    pyramid_sources: tuple[Path, ...] = (CMU, TCGA)
    scoring: ScoringConfig | None = field(default_factory=ScoringConfig)  # None: skipped
    perf: PerfConfig = field(default_factory=PerfConfig)  # skipped too when scoring is None
    viewer: ViewerBenchConfig = field(default_factory=ViewerBenchConfig)


Results = dict[str, Any]


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def bench_pyramid(cfg: Config, out: Results) -> PyramidInfo:
    start = time.perf_counter()
    info = build_pyramid(cfg.work_dir / "large-slide.tiff", cfg.pyramid_sources, cfg.pyramid)
    out["pyramid_build_seconds"] = info.build_seconds
    out["pyramid_size_mb"] = _r(info.size_bytes / 2**20, 1)
    out["_note_pyramid"] = (
        f"{info.path.name}: {info.level_sides[0]} x {info.level_sides[0]} px at "
        f"{cfg.pyramid.mpp} um/px (TIFF resolution tags; OpenSlide reports it as mpp), "
        f"{len(info.level_sides)} levels {info.level_sides}, JPEG q{cfg.pyramid.quality} 256 px "
        f"tiles, {info.size_bytes / 2**20:.0f} MiB; tissue region {info.tissue_share:.0%} of the "
        f"area; level-0 tiles {info.tile_kinds}; built in {info.build_seconds} s"
        + (
            f" (cached, reused: {time.perf_counter() - start:.1f} s to check)"
            if info.reused
            else ""
        )
    )
    return info


def bench_ratio(cfg: Config, large: Path, out: Results) -> Workload:
    """Pipeline vs bare decode on each real slide and on a band of the large slide."""
    parts = []
    for name, path in cfg.slides:
        work = make_workload(name, path)
        res = measure_ratio(work, cfg.work_dir / "shards", cfg.small_reps)
        out[f"preprocess_vs_raw_decode_ratio_{name}"] = _r(res.ratio)
        out[f"preprocess_vs_raw_decode_cpu_ratio_{name}"] = _r(res.cpu_ratio)
        parts.append(
            f"{name}: {res.kept} kept of {work.candidates} candidates "
            f"({work.plan.grid_tiles} grid), pipeline {res.pipeline_tps:.0f} vs decode "
            f"{res.decode_tps:.0f} kept tiles/s, best of {cfg.small_reps}"
        )
    work = make_workload("large", large, band_candidates=cfg.band_candidates)
    res = measure_ratio(work, cfg.work_dir / "shards", cfg.large_reps)
    best = min(res.pipeline, key=lambda r: r.seconds)
    out["preprocess_vs_raw_decode_ratio"] = _r(res.ratio)
    out["preprocess_vs_raw_decode_ratio_large"] = _r(res.ratio)
    out["preprocess_vs_raw_decode_cpu_ratio"] = _r(res.cpu_ratio)
    out["large_pipeline_kept_tiles_per_s"] = _r(res.pipeline_tps, 1)
    out["large_decode_kept_tiles_per_s"] = _r(res.decode_tps, 1)
    out["large_plan_seconds"] = _r(min(r.plan_seconds for r in res.pipeline))
    out["_note_ratio"] = (
        "headline preprocess_vs_raw_decode_ratio is the large slide; per-slide keys alongside. "
        f"large: grid rows {work.rows} of {work.plan.geometry.rows} = {work.candidates} "
        f"candidates of {len(work.plan.candidates)} on the slide ({work.plan.grid_tiles} grid "
        f"tiles), {res.kept} kept; pipeline {res.pipeline_tps:.0f} kept tiles/s "
        f"(plan_slide {best.plan_seconds:.2f} s for the whole slide, charged "
        f"{work.plan_share:.0%} by candidate share, + filter {best.filter_seconds:.2f} s, "
        f"{best.shard_bytes / 2**20:.0f} MiB of shards) vs bare read_region "
        f"{res.decode_tps:.0f} kept tiles/s, best of {cfg.large_reps} each, alternated, "
        f"file cache warm. " + "; ".join(parts) + ". " + PIPELINE_SIDE
    )
    return work


def bench_breakdown(cfg: Config, work: Workload, out: Results) -> None:
    steps = stage_breakdown(work, cfg.work_dir / "breakdown", cfg.breakdown_sample)
    for key, value in steps.items():
        out[f"large_{key}"] = _r(value)
    out["_note_breakdown"] = (
        "large_*_ms_per_candidate / _per_kept: each step of BatchFilter.process timed on the "
        f"first {int(steps['sampled_candidates'])} candidates of the large band "
        "(bare_read_region = openslide read_region alone, slide_read = Slide.read, keep = "
        "tissue criterion, contiguous_copy = np.ascontiguousarray of the RGB view, "
        "tile_example = hand-encoded Example, write = frame + crc32c + file write, with "
        "early writeback); "
        "shard commit + marker is per shard (fsyncs)"
    )


def bench_fast_vs_seed(cfg: Config, large: Workload, out: Results) -> None:
    """Whole real slides through the same pipeline with each criterion; kept-set agreement."""
    fast_total = seed_total = 0.0
    fast_all: set[tuple[str, int, int]] = set()
    seed_all: set[tuple[str, int, int]] = set()
    parts = []
    for name, path in cfg.slides:
        work = {
            "fast": make_workload(name, path),
            "seed": make_workload(name, path, REFERENCE_SPEC),
        }
        runs: dict[str, list] = {"fast": [], "seed": []}
        for i in range(cfg.seed_reps):
            for mode in ("fast", "seed") if i % 2 == 0 else ("seed", "fast"):
                runs[mode].append(run_pipeline(work[mode], cfg.work_dir / "shards"))
        fast = min(r.seconds for r in runs["fast"])
        seed = min(r.seconds for r in runs["seed"])
        kf, ks = runs["fast"][0].kept, runs["seed"][0].kept
        out[f"fast_vs_seed_filter_speedup_{name}"] = _r(seed / fast, 2)
        out[f"fast_vs_seed_jaccard_{name}"] = _r(jaccard(kf, ks))
        fast_total, seed_total = fast_total + fast, seed_total + seed
        fast_all |= {(name, *k) for k in kf}
        seed_all |= {(name, *k) for k in ks}
        parts.append(
            f"{name}: fast {fast:.3f} s ({len(kf)} kept), seed {seed:.3f} s ({len(ks)} kept) "
            f"over {work['fast'].plan.grid_tiles} grid tiles"
        )
    out["fast_vs_seed_filter_speedup"] = _r(seed_total / fast_total, 2)
    out["fast_vs_seed_jaccard"] = _r(jaccard(fast_all, seed_all))
    note = (
        "speedup = seed / fast seconds of plan + filter over both real slides together (best of "
        f"{cfg.seed_reps}); jaccard over the union of both slides' kept (slide, col, row). "
        + "; ".join(parts)
    )
    if cfg.seed_rows:
        first = large.plan.geometry.rows // 2 - cfg.seed_rows // 2
        rows = (first, first + cfg.seed_rows)
        kept = {
            mode: run_pipeline(
                make_workload("large", large.path, spec, rows=rows), cfg.work_dir / "shards"
            ).kept
            for mode, spec in (("fast", pb.TilingSpec()), ("seed", REFERENCE_SPEC))
        }
        kf, ks = kept["fast"], kept["seed"]
        out["fast_vs_seed_jaccard_large"] = _r(jaccard(kf, ks))
        note += (
            f". large slide, grid rows {rows}: fast keeps {len(kf)}, seed {len(ks)}, "
            f"both {len(kf & ks)}"
        )
    out["_note_fast_vs_seed"] = note


def bench_rss(cfg: Config, large: Path, work: Workload, out: Results) -> None:
    """Peak RSS of a filter worker on the large band, of tiling the large slide, and of a
    child that only imports, each in a fresh process."""
    tasks_file = cfg.work_dir / "rss-tasks.pkl"
    tiles_root = cfg.work_dir / "rss-shards"
    tasks_file.write_bytes(pickle.dumps(work.tasks[: cfg.rss_tasks]))
    try:
        base = run_child("baseline")
        tiling = run_child("tiling", str(large))
        filt = run_child("filter", str(tasks_file), str(tiles_root), str(large.parent))
    finally:
        tasks_file.unlink(missing_ok=True)
        shutil.rmtree(tiles_root, ignore_errors=True)
    out["filter_worker_peak_rss_mb"] = _r(filt["vmhwm_mb"], 1)
    out["tiling_peak_rss_mb"] = _r(tiling["vmhwm_mb"], 1)
    out["worker_import_baseline_rss_mb"] = _r(base["vmhwm_mb"], 1)
    out["_note_rss"] = (
        "peak RSS = VmHWM of a fresh child (python -m bench.child), read by the child itself "
        "at the end. filter: one BatchFilter over the first "
        f"{filt['tasks']} tasks of the large band ({filt['candidates']} candidates, "
        f"{filt['kept']} kept, "
        f"{filt['seconds']:.1f} s); tiling: open + plan_slide of the whole large slide "
        f"({tiling['candidates']} candidates, coverage map {tiling['coverage_map_shape']}, "
        f"{tiling['seconds']:.1f} s); baseline: the same imports only. (wait4's ru_maxrss is "
        "not used: Linux carries the parent's RSS at fork into it, "
        f"{filt['ru_maxrss_mb']:.0f} MB here.)"
    )


def bench_ray(cfg: Config, large: Path, work: Workload, out: Results) -> None:
    tasks = work.tasks[: cfg.ray_tasks]
    speedup, runs = ray_scaling(tasks, large.parent, cfg.work_dir, cfg.ray_rounds)
    out["ray_2_vs_1_worker_speedup"] = _r(speedup, 2)
    out["_note_ray"] = (
        "BatchFilter as ray.remote(num_cpus=1) actors in an ActorPool, init_ray(num_cpus=2), "
        "each actor confined to a core of its own (CPU affinity, as a 1-CPU worker on a "
        "cluster; unconfined, one actor's reader threads already use both cores here), "
        f"the first {len(tasks)} tasks of the large band ({runs[0].candidates} candidates); "
        f"actors warmed with one task each before timing; best of {cfg.ray_rounds}; runs: "
        + ", ".join(
            f"{r.actors} actor(s) {r.seconds:.2f} s = {r.kept_per_second:.0f} kept tiles/s"
            for r in runs
        )
    )


def selected(only: Collection[str] | None) -> set[str]:
    """The sections to run: `only` (None: all) plus the sections they need."""
    if only is None:
        return set(SECTIONS) - set(OPT_IN)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
    todo: set[str] = set()
    stack = list(only)
    while stack:
        name = stack.pop()
        if name not in todo:
            todo.add(name)
            stack.extend(NEEDS.get(name, ()))
    return todo


def run(
    cfg: Config | None = None,
    log: Callable[[str], None] = print,
    only: Collection[str] | None = None,
) -> Results:
    """The benchmarks in order (all, or the sections in `only` and what they need); returns
    the results mapping."""
    cfg = cfg or Config()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    todo = selected(only)
    if cfg.scoring is None:
        todo -= set(SCORING_SECTIONS)
    out: Results = {}
    start = time.perf_counter()
    load_before = os.getloadavg()[0]

    def step(name: str, fn: Callable[[], Any]) -> Any:
        if name not in todo:
            return None
        t = time.perf_counter()
        log(f"[bench] {name} ...")
        value = fn()
        out[f"_seconds_{name}"] = _r(time.perf_counter() - t, 1)
        return value

    info = step("pyramid", lambda: bench_pyramid(cfg, out))
    large = info.path if info is not None else None
    work = step("ratio", lambda: bench_ratio(cfg, large, out))
    step("breakdown", lambda: bench_breakdown(cfg, work, out))
    step("fast_vs_seed", lambda: bench_fast_vs_seed(cfg, work, out))
    step("rss", lambda: bench_rss(cfg, large, work, out))  # before Ray: keep children few
    step("ray", lambda: bench_ray(cfg, large, work, out))
    step("viewer", lambda: bench_viewer(cfg.viewer, large, out))
    if cfg.scoring is not None:
        scoring = cfg.scoring
        step("scoring", lambda: bench_scoring(scoring, out, log))
    step("bf16", lambda: bench_bf16(cfg.perf, out, log))
    step("large_scoring", lambda: bench_large(cfg.perf, large, out, log))
    step("concurrency", lambda: bench_concurrency(cfg.perf, out, log))
    whole = replace(cfg.perf, roi_tiles=0, large_reps=cfg.perf.whole_reps)
    step("whole_slide", lambda: bench_large(whole, large, out, log, "scoring_whole_slide"))
    out["bench_seconds"] = _r(time.perf_counter() - start, 1)
    out["_note"] = (
        f"machine: {os.cpu_count()} cores (noisy; compare ratios, not absolute rates). "
        f"slides: {', '.join(p.name for _, p in cfg.slides)} (real) and "
        f"{large.name if large else 'large-slide.tiff'} "
        "(built here, bench/work/, never committed). Tiles are 256 px at 0.5 um/px with the "
        "services' default spec (fast criterion, threshold 0.9, no stain normalization, "
        "64 tiles per shard); throughput counts kept tiles on both sides. "
        f"1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        "end (anything above ~0 means other processes shared the cores)."
    )
    timings = {k: out.pop(k) for k in [k for k in out if k.startswith("_seconds_")]}
    out["_note_sections"] = ", ".join(f"{k[9:]} {v} s" for k, v in timings.items())
    return out


def table(results: Results) -> str:
    rows = [(k, v) for k, v in results.items() if not k.startswith("_")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  {'value':>10}  target", "-" * (width + 22)]
    for key, value in rows:
        lines.append(f"{key:<{width}}  {value:>10}  {TARGETS.get(key, '')}")
    lines.append("")
    lines.extend(f"{k}: {v}" for k, v in results.items() if k.startswith("_"))
    return "\n".join(lines)


def merge(previous: Results, partial: Results) -> Results:
    """A partial run's entries over the previous results: the full run's bench_seconds, _note
    and _note_sections stay; the partial run's own go to `*_partial` keys."""
    merged = dict(previous)
    own = {"bench_seconds", "_note", "_note_sections"}
    merged.update({k: v for k, v in partial.items() if k not in own})
    merged["bench_seconds_partial"] = partial["bench_seconds"]
    merged["_note_partial"] = (
        f"sections rerun alone ({partial['_note_sections']}), merged into the previous "
        f"results. {partial['_note']}"
    )
    return merged


def save(results: Results, out: Path, partial: bool = False) -> Results:
    """Write `results` to `out` and return what was written: a partial run's entries merged
    into the previous results (those in `out`, else the committed RESULTS)."""
    if partial:
        previous = out if out.exists() else RESULTS
        if previous.exists():
            results = merge(json.loads(previous.read_text()), results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        help=f"comma-separated sections to run (and what they need): {','.join(SECTIONS)}; "
        f"without it, all but {','.join(OPT_IN)}",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, default=OUTPUT, help=f"results file to write (default: {OUTPUT})"
    )
    where.add_argument(
        "--update",
        action="store_true",
        help=f"write the committed figures instead: {RESULTS} and the README's table",
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    out: Path = RESULTS if args.update else args.out
    results = save(run(only=only), out, partial=only is not None)
    print(table(results))
    print(f"\nwrote {out}")
    if args.update:
        update_readme(results)


if __name__ == "__main__":
    main()
