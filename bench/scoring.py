"""Scoring benchmarks: end-to-end slide scoring over gRPC vs bare decode + in-process model call,
pipelined vs sequential reading, and the Ray reader vs the thread reader.

gRPC side: a real ScoringService (`prolifscore.scoring.server.build`) started in this process
on a free port, talking to the local model server (`python -m prolifscore.modelserver.server`)
in a child process on another free port; the client times `ScoreSlide` (open + plan_slide,
reading + tissue test, Predict of both models per batch, mitosis detection + NMS + grading,
aggregation). Direct side, same process, same slide: `openslide.OpenSlide.read_region` of the
kept tiles the library finds for the same spec, stacked into batches of the same size, and the
same SavedModels' `serving_default` signatures called in-process (`InProcessModels`) on them.

Both sides are warmed up first (model loading, first Predict), then alternate slide by slide
(ABBA), so that the two sides of a pair run seconds apart; the best sample of each side per
slide counts. Besides wall-clock seconds, each sample records the CPU seconds of this process
plus the model server child: a companion ratio that other people's load on the machine moves
much less. Models are untrained exports (the tumor model at 224 px so that its cost is the
production one) kept in bench/work/models.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import CMU, TCGA, WORK_DIR
from bench.pipeline import defaults, warm_file_cache
from prolifscore.core.runtime.settings import RuntimeSettings, load
from prolifscore.core.wsi.preprocess import iter_kept_tiles, plan_slide
from prolifscore.core.wsi.slide import open_slide
from prolifscore.localstack.stack import ServiceProcess
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import scoring_pb2_grpc

TUMOR, MITOSIS = "resnet50", "mitosis"
TARGET_RATIO = 1.15
Results = dict[str, Any]
Sample = dict[str, float]  # one slide under one configuration: "total" seconds and details
Samples = dict[str, dict[str, list[Sample]]]  # configuration -> slide -> samples


@dataclass(frozen=True)
class ScoringConfig:
    slides: tuple[tuple[str, Path], ...] = (("cmu", CMU), ("tcga", TCGA))
    model_root: Path = WORK_DIR / "models"
    tumor_input_size: int = 224  # production input size: the realistic model cost
    predict_batch: int = 32  # the service's default PROLIF_PREDICT_BATCH
    reps: int = 3  # timed samples of each side of the ratio per slide
    overlap_batch: int = 8  # several batches per slide, so that there is something to overlap
    overlap_rounds: int = 2
    ray_readers: int = 2  # 0: skip the Ray reader comparison
    ray_rounds: int = 1
    profile: bool | None = None  # None: profile only when the ratio misses its target
    work_dir: Path = WORK_DIR


@dataclass
class SlideTiles:
    """The kept tiles of a slide for the default spec, as the preprocessing library finds them."""

    name: str
    path: Path
    level: int
    read_size: int
    origins: list[tuple[int, int]]
    candidates: int


def ensure_models(root: Path, tumor_input_size: int = 224) -> bool:
    """Untrained exports of both models under `root` (TF Serving layout); reuses what is there
    when the tumor model has the wanted input size. Returns True when reused."""
    from prolifscore.core.models.export import export_untrained, list_versions, read_metadata

    tumor = list_versions(root, TUMOR)
    reused = True
    if not tumor or read_metadata(root / TUMOR / str(tumor[-1])).get("input_size") != (
        tumor_input_size
    ):
        export_untrained(root, "tumor", input_size=tumor_input_size)
        reused = False
    if not list_versions(root, MITOSIS):
        export_untrained(root, "mitosis")
        reused = False
    return reused


def kept_tiles(name: str, path: Path) -> SlideTiles:
    with open_slide(path) as slide:
        plan = plan_slide(slide, path.stem, pb.TilingSpec(), defaults())
        origins = [(t.x, t.y) for t, _, _ in iter_kept_tiles(slide, plan)]
    spec = plan.spec
    return SlideTiles(name, path, spec.level, spec.read_size, origins, len(plan.candidates))


def direct_slide(tiles: SlideTiles, models: Any, batch: int) -> dict[str, float]:
    """Bare OpenSlide decode of the kept tiles + in-process serving signatures, batch by batch
    (no overlap). Seconds: total, decode (open + read_region + RGB stack), predict."""
    import openslide

    clock = time.perf_counter
    start = clock()
    decode = predict = 0.0
    osr = openslide.OpenSlide(str(tiles.path))
    try:
        size = (tiles.read_size, tiles.read_size)
        opened = clock()
        decode += opened - start
        for i in range(0, len(tiles.origins), batch):
            t0 = clock()
            pixels = np.stack(
                [
                    np.asarray(osr.read_region(xy, tiles.level, size))[..., :3]
                    for xy in tiles.origins[i : i + batch]
                ]
            )
            t1 = clock()
            models.predict(TUMOR, pixels, "probabilities")
            models.predict(MITOSIS, pixels, "mitosis_map")
            t2 = clock()
            decode += t1 - t0
            predict += t2 - t1
    finally:
        osr.close()
    return {"total": clock() - start, "decode": decode, "predict": predict}


def grpc_slide(stub: Any, tiles: SlideTiles) -> Sample:
    """One unary ScoreSlide as a client sees it, plus the service's own ScoreTimings."""
    start = time.perf_counter()
    result = stub.ScoreSlide(spb.ScoreRequest(path=str(tiles.path)), timeout=600)
    seconds = time.perf_counter() - start
    if result.tiles_scored != len(tiles.origins):
        raise RuntimeError(
            f"{tiles.name}: the service scored {result.tiles_scored} tiles, the library keeps "
            f"{len(tiles.origins)}"
        )
    t = result.timings
    return {
        "total": seconds,
        "tiling": t.tiling_s,
        "reading": t.reading_s,
        "predict": t.predict_s,
        "server_total": t.total_s,
    }


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system, every thread) of this process, plus those of `pid`."""
    total = time.process_time()
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class ModelServerProcess(ServiceProcess):
    """The local model server in a child process. `launch` does not wait (the caller does its
    own set-up meanwhile, then `wait_serving`); this shell's PROLIF_* variables are not passed
    on: the child sees only the settings given here."""

    def launch(self) -> ModelServerProcess:
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if not k.startswith("PROLIF_")}
        env.update(self.env)
        env[self.port_env] = str(self.grpc_port)
        env.setdefault("PROLIF_METRICS_PORT", "0")
        env.setdefault("PROLIF_MODEL_SERVER_REST_PORT", "0")  # several may run side by side
        self.log_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self


@contextmanager
def model_server(
    model_root: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[ModelServerProcess]:
    """`python -m prolifscore.modelserver.server` over `model_root` on a free port (more
    settings in `env`), launched (not yet waited for); stopped (SIGTERM) on exit."""
    proc = ModelServerProcess(
        "prolifscore.modelserver.server",
        {"PROLIF_MODEL_ROOT": str(model_root), **(env or {})},
        log_path,
        port_env="PROLIF_MODEL_SERVER_PORT",
    ).launch()
    try:
        yield proc
    except BaseException:
        proc.stop()
        raise
    code = proc.stop()
    if code not in (0, None):
        raise RuntimeError(f"model server exited with {code}:\n{proc.tail()}")


@contextmanager
def scoring_process(
    model_server_address: str,
    slide_roots: Sequence[Path],
    results_root: Path,
    log_path: Path,
    **env: str,
) -> Iterator[ServiceProcess]:
    """`python -m prolifscore.scoring.server` in a child of its own on a free port, as `up`
    runs it: gRPC only (no Kafka consumer), tiles read in its own thread, results stored under
    `results_root`; more PROLIF_* variables in `env`. Launched; stopped on exit."""
    proc = ServiceProcess(
        "prolifscore.scoring.server",
        {
            "PROLIF_MODEL_SERVER": model_server_address,
            "PROLIF_SLIDE_ROOTS": ",".join(str(r) for r in slide_roots),
            "PROLIF_RESULTS_ROOT": str(results_root),
            "PROLIF_SCORING_KAFKA": "false",
            "PROLIF_SCORING_RAY_READERS": "0",
            **env,
        },
        log_path,
        port_env="PROLIF_SCORING_PORT",
    )
    proc.launch()
    try:
        yield proc
    finally:
        proc.stop()


@contextmanager
def scoring_service(
    model_server_address: str, slide_roots: Sequence[Path], ray_readers: int = 0, **settings: Any
) -> Iterator[Any]:
    """A ScoringService in this process on a free port, with its PredictionClient to
    `model_server_address` (more ScoringSettings fields in `settings`); yields a client stub."""
    from prolifscore.scoring.config import ScoringSettings
    from prolifscore.scoring.server import build

    settings = load(
        ScoringSettings,
        environ={},
        model_server=model_server_address,
        ray_readers=ray_readers,
        kafka_enabled=False,
        port=settings.pop("port", 0),  # any free port (the service default is 50051)
        **settings,
        runtime=load(
            RuntimeSettings,
            environ={},
            grpc_port=0,
            slide_roots=tuple(slide_roots),
            results_root=WORK_DIR / "results",  # stored like every scoring, in the work dir
        ),
    )
    runtime, servicer = build(settings)
    runtime.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        yield scoring_pb2_grpc.ScoringServiceStub(channel)
    finally:
        channel.close()
        runtime.stop()
        servicer.models.close()


def alternate(
    configs: Sequence[str],
    slides: Sequence[SlideTiles],
    rounds: int,
    fn: Callable[[str, SlideTiles], Sample],
    log: Callable[[str], None],
) -> Samples:
    """`rounds` samples of every configuration on every slide; the configurations run back to
    back on one slide, their order rotated from slide to slide and round to round."""
    out: Samples = {c: {t.name: [] for t in slides} for c in configs}
    names = list(configs)
    for i in range(rounds):
        for j, tiles in enumerate(slides):
            k = (i + j) % len(names)
            for config in names[k:] + names[:k]:
                out[config][tiles.name].append(fn(config, tiles))
        log(
            f"[bench]   round {i + 1}: "
            + ", ".join(
                f"{c} {sum(out[c][t.name][-1]['total'] for t in slides):.2f} s" for c in names
            )
        )
    return out


def best(samples: dict[str, list[Sample]], key: str = "total") -> dict[str, Sample]:
    """Per slide, the sample with the least `key`."""
    return {name: min(runs, key=lambda s: s[key]) for name, runs in samples.items()}


def total(per_slide: dict[str, Sample], key: str = "total") -> float:
    return sum(s[key] for s in per_slide.values())


def median_total(samples: dict[str, list[Sample]]) -> float:
    return sum(statistics.median(s["total"] for s in runs) for runs in samples.values())


def _fmt(sample: Sample, skip: tuple[str, ...] = ("total",)) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sample.items() if k not in skip)


def measure_ratio(
    cfg: ScoringConfig,
    slides: list[SlideTiles],
    models: Any,
    stub: Any,
    server_pid: int,
    log: Callable[[str], None],
) -> Samples:
    """ "grpc" and "direct" samples: one gRPC warm-up pass (the direct side is warmed by the
    caller), then `reps` samples of each side per slide, alternated."""
    for tiles in slides:  # warm-up: the model server's first Predict of each shape
        grpc_slide(stub, tiles)

    def one(kind: str, tiles: SlideTiles) -> Sample:
        cpu = cpu_seconds(server_pid)
        if kind == "grpc":
            sample = grpc_slide(stub, tiles)
        else:
            sample = direct_slide(tiles, models, cfg.predict_batch)
        sample["cpu"] = cpu_seconds(server_pid) - cpu
        return sample

    return alternate(("grpc", "direct"), slides, cfg.reps, one, log)


def profile_grpc_scoring(
    slides: list[SlideTiles], model_server: str, batch: int, top: int = 8
) -> tuple[str, float]:
    """cProfile of score_slide in this process with the gRPC PredictionClient (the service's
    code path without the ScoringService hop), sequential reading so that all of it runs in the
    profiled thread, every slide once. Returns the project's functions by cumulative time, the
    top functions by own time, and the total seconds."""
    from prolifscore.scoring.model_client import PredictionClient
    from prolifscore.scoring.scorer import ScoringOptions, score_slide

    client = PredictionClient(model_server)
    options = ScoringOptions(preprocess=defaults(), predict_batch=batch, pipelined=False)
    roots = tuple(str(t.path.parent) for t in slides)
    prof = cProfile.Profile()
    start = time.perf_counter()
    try:
        prof.enable()
        for tiles in slides:
            score_slide(
                spb.ScoreRequest(path=str(tiles.path)),
                slide_roots=roots,
                options=options,
                models=client,
            )
        prof.disable()
    finally:
        client.close()
    seconds = time.perf_counter() - start
    ours, everything = [], []
    package = str(Path(__file__).resolve().parents[1] / "services")
    for (file, line, func), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        own, cum = row[2], row[3]
        name = f"{Path(file).parent.name}/{Path(file).name}:{line}({func})"
        everything.append((own, cum, name))
        if file.startswith(package) and func != "<module>":
            ours.append((cum, own, name))
    ours.sort(reverse=True)
    everything.sort(reverse=True)
    text = (
        "project functions by cumulative time: "
        + "; ".join(f"{n} {c:.2f} s" for c, _o, n in ours[:top])
        + ". Top own time: "
        + "; ".join(f"{n} {o:.2f} s" for o, _c, n in everything[: top // 2])
    )
    return text, seconds


def score_one(tiles: SlideTiles, models: Any, options: Any) -> Sample:
    """score_slide on one slide in this process: seconds and its ScoreTimings."""
    from prolifscore.scoring.scorer import score_slide

    start = time.perf_counter()
    result = score_slide(
        spb.ScoreRequest(path=str(tiles.path)),
        slide_roots=(str(tiles.path.parent),),
        options=options,
        models=models,
    )
    seconds = time.perf_counter() - start
    if result.tiles_scored != len(tiles.origins):
        raise RuntimeError(f"{tiles.name}: {result.tiles_scored} tiles scored")
    t = result.timings
    return {"total": seconds, "tiling": t.tiling_s, "reading": t.reading_s, "predict": t.predict_s}


def measure_overlap(
    cfg: ScoringConfig, slides: list[SlideTiles], models: Any, log: Callable[[str], None]
) -> Samples:
    """score_slide in-process with `models` at `overlap_batch`, pipelined thread reader vs
    sequential reading (before any Ray is started)."""
    from prolifscore.scoring.scorer import ScoringOptions

    options = {
        mode: ScoringOptions(
            preprocess=defaults(), predict_batch=cfg.overlap_batch, pipelined=mode == "pipelined"
        )
        for mode in ("sequential", "pipelined")
    }
    return alternate(
        list(options),
        slides,
        cfg.overlap_rounds,
        lambda mode, tiles: score_one(tiles, models, options[mode]),
        log,
    )


def _ray_workers_started() -> int:
    """Worker processes this Ray session has started so far (one log file each); -1 when
    unknown."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()  # type: ignore[attr-defined]
    except Exception:
        return -1
    return len(list((Path(session) / "logs").glob("worker-*.out")))


def measure_ray(
    cfg: ScoringConfig, slides: list[SlideTiles], models: Any, log: Callable[[str], None]
) -> tuple[Samples, float]:
    """The same, pipelined, with `ray_readers` Ray reader tasks vs the thread reader, both run
    while a local Ray (2 CPUs) is up; Ray warmed with the first slide first. Ray samples count
    the Ray worker processes started meanwhile ("workers"). Returns the warm-up's seconds too."""
    from bench.rayrun import _start_ray
    from prolifscore.scoring.scorer import ScoringOptions

    options = {
        name: ScoringOptions(
            preprocess=defaults(), predict_batch=cfg.overlap_batch, ray_readers=readers
        )
        for name, readers in (("ray", cfg.ray_readers), ("thread", 0))
    }

    def one(name: str, tiles: SlideTiles) -> Sample:
        before = _ray_workers_started()
        sample = score_one(tiles, models, options[name])
        after = _ray_workers_started()
        if name == "ray":
            sample["workers"] = after - before if min(before, after) >= 0 else -1
        return sample

    _start_ray()
    import ray

    try:
        warm = score_one(slides[0], models, options["ray"])["total"]
        log(f"[bench]   ray warm-up: {warm:.2f} s")
        samples = alternate(list(options), slides, cfg.ray_rounds, one, log)
    finally:
        ray.shutdown()
    return samples, warm


def bench_scoring(cfg: ScoringConfig, out: Results, log: Callable[[str], None] = print) -> None:
    """Every scoring entry into `out`: the ratio (with its breakdown and, when it misses the
    target or `cfg.profile`, a cProfile), pipelined vs sequential, Ray vs thread reader."""
    from prolifscore.scoring.model_client import InProcessModels

    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    reused = ensure_models(cfg.model_root, cfg.tumor_input_size)
    models_s = time.perf_counter() - t
    roots = sorted({path.parent for _, path in cfg.slides})
    profile_text = ""
    load_start = os.getloadavg()[0]
    models = InProcessModels(cfg.model_root)
    try:
        log_path = cfg.work_dir / "scoring-modelserver.log"
        with model_server(cfg.model_root, log_path) as server:
            t = time.perf_counter()
            # While the model server starts: file cache, kept tiles, direct-side warm-up.
            for _, path in cfg.slides:
                warm_file_cache(path)
            slides = [kept_tiles(name, path) for name, path in cfg.slides]
            for tiles in slides:
                direct_slide(tiles, models, cfg.predict_batch)
            server.wait_serving(180)
            assert server.proc is not None
            with scoring_service(server.grpc_address, roots) as stub:
                ready_s = time.perf_counter() - t
                ratio_samples = measure_ratio(cfg, slides, models, stub, server.proc.pid, log)
            g, d = best(ratio_samples["grpc"]), best(ratio_samples["direct"])
            ratio = total(g) / total(d)
            if cfg.profile or (cfg.profile is None and ratio > TARGET_RATIO):
                log("[bench]   profiling score_slide with the gRPC model client ...")
                text, seconds = profile_grpc_scoring(slides, server.grpc_address, cfg.predict_batch)
                profile_text = (
                    f"cProfile of score_slide (gRPC model client, sequential reading) on every "
                    f"slide, {seconds:.2f} s: {text}"
                )
        load_ratio = os.getloadavg()[0]
        overlap = measure_overlap(cfg, slides, models, log)
        ray_cmp = measure_ray(cfg, slides, models, log) if cfg.ray_readers else None
    finally:
        models.close()
    report_ratio(cfg, slides, ratio_samples, out, reused, models_s, ready_s, load_start, load_ratio)
    if profile_text:
        out["_note_scoring_profile"] = profile_text
    report_overlap(cfg, overlap, out)
    if ray_cmp is not None:
        report_ray(cfg, slides, *ray_cmp, out)


def report_ratio(
    cfg: ScoringConfig,
    slides: list[SlideTiles],
    samples: Samples,
    out: Results,
    reused: bool,
    models_s: float,
    ready_s: float,
    load_start: float,
    load_end: float,
) -> None:
    g, d = best(samples["grpc"]), best(samples["direct"])
    g_cpu, d_cpu = best(samples["grpc"], "cpu"), best(samples["direct"], "cpu")
    kept = sum(len(t.origins) for t in slides)
    out["scoring_vs_direct_model_ratio"] = round(total(g) / total(d), 3)
    for tiles in slides:
        n = tiles.name
        out[f"scoring_vs_direct_model_ratio_{n}"] = round(g[n]["total"] / d[n]["total"], 3)
    out["scoring_vs_direct_model_cpu_ratio"] = round(total(g_cpu, "cpu") / total(d_cpu, "cpu"), 3)
    out["scoring_grpc_kept_tiles_per_s"] = round(kept / total(g), 2)
    out["scoring_direct_kept_tiles_per_s"] = round(kept / total(d), 2)
    per_slide = "; ".join(
        f"{t.name} ({len(t.origins)} kept of {t.candidates} candidates, level {t.level}): gRPC "
        f"{g[t.name]['total']:.2f} s [{_fmt(g[t.name])}] vs direct {d[t.name]['total']:.2f} s "
        f"[{_fmt(d[t.name])}]; all samples gRPC "
        f"{[round(s['total'], 2) for s in samples['grpc'][t.name]]}, direct "
        f"{[round(s['total'], 2) for s in samples['direct'][t.name]]}"
        for t in slides
    )
    g_pred, d_pred = total(g, "predict"), total(d, "predict")
    g_srv = total(g, "server_total")
    out["_note_scoring"] = (
        "scoring_vs_direct_model_ratio = sum over the slides of the best unary ScoreSlide "
        "(client wall clock; default request: mitosis on, no per-tile list, no heatmap) / sum "
        "of the best bare OpenSlide decode of the same kept tiles + in-process serving "
        f"signatures of the same SavedModels; {cfg.reps} samples of each side per slide, "
        "alternated slide by slide (ABBA), after a warm-up of each side (sums of medians "
        f"{median_total(samples['grpc']):.2f} vs {median_total(samples['direct']):.2f} s). "
        "scoring_vs_direct_model_cpu_ratio: the same with CPU seconds of this process + the "
        f"model server child (best per slide: {total(g_cpu, 'cpu'):.2f} vs "
        f"{total(d_cpu, 'cpu'):.2f} s), less moved by other people's load (1-min load average "
        f"{load_start:.1f} before, {load_end:.1f} after). Batch {cfg.predict_batch} on both "
        "sides (the service default; each slide here is one batch, so the service has nothing "
        f"to overlap). Untrained models ({'reused from' if reused else 'exported to'} "
        f"{cfg.model_root.name}/, {models_s:.1f} s): resnet50 at {cfg.tumor_input_size} px + "
        "mitosis. ScoringService in this process (ray_readers=0: the thread reader; the "
        "service default is 2, see ray_readers_vs_thread_speedup), model server in a child "
        f"process, both serving {ready_s:.1f} s after launch. Best samples summed: gRPC "
        f"{total(g):.2f} s = ScoreSlide on the server {g_srv:.2f} (tiling "
        f"{total(g, 'tiling'):.2f} + waiting on Predict of both models {g_pred:.2f} + reading, "
        f"tissue test, aggregation {total(g, 'reading'):.2f}) + the gRPC hop "
        f"{total(g) - g_srv:.3f}; direct {total(d):.2f} s = decode {total(d, 'decode'):.2f} + "
        f"in-process predict {d_pred:.2f}: Predict through the model server "
        f"{g_pred - d_pred:+.2f} s over the in-process call. " + per_slide
    )


def report_overlap(cfg: ScoringConfig, samples: Samples, out: Results) -> None:
    seq, pipe = best(samples["sequential"]), best(samples["pipelined"])
    out["pipelined_vs_sequential_speedup"] = round(total(seq) / total(pipe), 3)
    hidden = total(seq) - total(seq, "reading")
    out["pipelined_vs_sequential_speedup_max"] = round(total(seq) / hidden, 3)
    out["_note_scoring_overlap"] = (
        "score_slide in-process with InProcessModels (the same SavedModels, no server), thread "
        f"reader, batch {cfg.overlap_batch} so that a slide has several batches to overlap (at "
        f"the service's {cfg.predict_batch} every slide here is one batch: speedup 1 by "
        f"construction); best of {cfg.overlap_rounds} per slide, alternated slide by slide, "
        f"before Ray starts: sequential {total(seq):.2f} s vs pipelined {total(pipe):.2f} s "
        f"(sums of medians {median_total(samples['sequential']):.2f} vs "
        f"{median_total(samples['pipelined']):.2f} s); the sequential reading (ScoreTimings "
        f"reading_s) {total(seq, 'reading'):.2f} s is the most that overlap can hide, hence "
        "pipelined_vs_sequential_speedup_max (sequential / (sequential - reading)): a measured "
        "speedup above it is noise. Best per slide, sequential: "
        + "; ".join(f"{n} {s['total']:.2f} s [{_fmt(s)}]" for n, s in seq.items())
        + "; pipelined: "
        + "; ".join(f"{n} {s['total']:.2f} s [{_fmt(s)}]" for n, s in pipe.items())
    )


def report_ray(
    cfg: ScoringConfig, slides: list[SlideTiles], samples: Samples, warm: float, out: Results
) -> None:
    ray_best, thread = best(samples["ray"]), best(samples["thread"])
    workers = [int(s["workers"]) for runs in samples["ray"].values() for s in runs]
    out["ray_readers_vs_thread_speedup"] = round(total(thread) / total(ray_best), 3)
    out["_note_scoring_ray"] = (
        f"ray_readers_vs_thread_speedup = thread-reader seconds / ray_readers={cfg.ray_readers}"
        " seconds (< 1: Ray is slower), score_slide in-process, pipelined, batch "
        f"{cfg.overlap_batch} (chunks of {cfg.overlap_batch} candidates per Ray task), both "
        f"while a local Ray with 2 CPUs is up, best of {cfg.ray_rounds} per slide after a Ray "
        f"warm-up on {slides[0].name} ({warm:.2f} s): Ray {total(ray_best):.2f} s vs thread "
        f"{total(thread):.2f} s. Ray worker processes started during each timed Ray sample: "
        f"{workers} (each new worker imports prolifscore.scoring.scorer, which imports "
        "TensorFlow, to unpickle _read_chunk). Ray per slide: "
        + "; ".join(f"{n} {s['total']:.2f} s [{_fmt(s)}]" for n, s in ray_best.items())
        + "; thread per slide: "
        + "; ".join(f"{n} {s['total']:.2f} s [{_fmt(s)}]" for n, s in thread.items())
    )
