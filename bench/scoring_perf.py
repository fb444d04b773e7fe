"""Scoring on the CPUs users have (issue 15): bf16 vs fp32 serving, whole-slide throughput on
the large benchmark slide, concurrent vs sequential ScoreSlide calls with server-side batching.

Every side runs the service code: the local model server (`python -m
prolifscore.modelserver.server`) in a child process, ScoringService in this process (bf16,
concurrency) or in a child of its own (large slide, so that its peak RSS is its own). Models
are the untrained exports of bench/scoring.py (tumor ResNet50 at 224 px: the production cost).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import CMU, TCGA, WORK_DIR
from bench.pipeline import defaults, warm_file_cache
from bench.scoring import (
    SlideTiles,
    direct_slide,
    ensure_models,
    model_server,
    scoring_process,
    scoring_service,
)
from prolifscore.core.wsi.preprocess import iter_kept_tiles, plan_slide
from prolifscore.core.wsi.slide import open_slide
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import scoring_pb2_grpc

Results = dict[str, Any]
BATCHING_CONFIG = Path(__file__).resolve().parents[1] / "k8s/base/config/batching.config"


@dataclass(frozen=True)
class PerfConfig:
    slides: tuple[tuple[str, Path], ...] = (("cmu", CMU), ("tcga", TCGA))
    model_root: Path = WORK_DIR / "models"
    tumor_input_size: int = 224
    bf16_reps: int = 5  # samples of each precision per slide, alternated
    roi_tiles: int = 28  # side of the large slide's square ROI, in 256 px tiles; 0: whole slide
    large_reps: int = 2  # samples of each side on the large slide (ABBA)
    whole_reps: int = 1  # samples of each side on the whole large slide (section whole_slide)
    roi_centre: tuple[float, float] = (0.66, 0.50)  # in slide widths: inside a tissue piece
    concurrent_calls: int = 8
    concurrent_slide: tuple[str, Path] = ("cmu", CMU)
    concurrent_rounds: int = 3
    batching_config: Path = BATCHING_CONFIG  # the model server's BatchingParameters file
    work_dir: Path = WORK_DIR


def _score(stub: Any, request: spb.ScoreRequest, timeout: float = 600) -> tuple[Any, float]:
    start = time.perf_counter()
    result = stub.ScoreSlide(request, timeout=timeout)
    return result, time.perf_counter() - start


def _vmhwm_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a running process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- bf16 vs fp32 --------------------------------------------------------------------------


def _compare(a: Any, b: Any) -> tuple[bool, float]:
    """(same tumor score and mitotic grade, largest tile probability difference: tumor class
    probabilities and mitosis map maxima)."""
    same = (a.tumor_score, a.mitotic_score) == (b.tumor_score, b.mitotic_score)
    pa = np.array([[*t.probabilities, t.mitosis_max] for t in a.tiles])
    pb_ = np.array([[*t.probabilities, t.mitosis_max] for t in b.tiles])
    if pa.shape != pb_.shape:
        return False, float("inf")
    return same, float(np.abs(pa - pb_).max()) if pa.size else 0.0


Sample = tuple[Any, float, float]  # SlideScore, client seconds, CPU seconds (server + us)


def bench_bf16(cfg: PerfConfig, out: Results, log: Callable[[str], None] = print) -> None:
    """Two model servers over the same exports, PROLIF_MODEL_PRECISION fp32 and bf16, each
    behind its own in-process ScoringService; ScoreSlide on every bench slide, alternated."""
    ensure_models(cfg.model_root, cfg.tumor_input_size)
    roots = sorted({p.parent for _, p in cfg.slides})
    samples: dict[str, dict[str, list[Sample]]] = {"fp32": {}, "bf16": {}}
    with ExitStack() as stack:
        servers = {
            p: stack.enter_context(
                model_server(
                    cfg.model_root,
                    cfg.work_dir / f"bf16-modelserver-{p}.log",
                    {"PROLIF_MODEL_PRECISION": p},
                )
            )
            for p in samples
        }
        for _, path in cfg.slides:
            warm_file_cache(path)
        stubs, pids = {}, {}
        for p, server in servers.items():
            server.wait_serving(180)
            assert server.proc is not None
            pids[p] = [server.proc.pid]
            stubs[p] = stack.enter_context(scoring_service(server.grpc_address, roots))

        def one(p: str, request: spb.ScoreRequest) -> Sample:
            cpu = _cpu(pids[p])
            result, seconds = _score(stubs[p], request)
            return result, seconds, _cpu(pids[p]) - cpu

        for name, path in cfg.slides:
            request = spb.ScoreRequest(path=str(path), include_tiles=True)
            for p in samples:  # warm-up: each server's first batch shape
                _score(stubs[p], request)
                samples[p][name] = []
            for i in range(cfg.bf16_reps):
                for p in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
                    samples[p][name].append(one(p, request))
            best = ", ".join(f"{p} {_best(samples[p][name]):.2f} s" for p in samples)
            log(f"[bench]   bf16 {name}: {best}")
    report_bf16(cfg, samples, out)
    op_ceiling(out)


# The op that dominates ResNet50's cost (a 3 x 3 convolution of stage 3's shape, batch 32) and
# a plain matmul: what bf16 can gain on this CPU at most, whatever the serving around it.
CEILING_OPS = {
    "conv": ((32, 28, 28, 128), (3, 3, 128, 128)),
    "matmul": ((2048, 2048), (2048, 2048)),
}


def op_ceiling(out: Results, reps: int = 5, calls: int = 10) -> None:
    """fp32 vs bf16 speed of single TensorFlow ops in this process (oneDNN kernels, all cores),
    alternated, best of `reps` runs of `calls` calls each."""
    import tensorflow as tf

    parts = []
    for name, (a_shape, b_shape) in CEILING_OPS.items():
        best = {}
        rng = np.random.default_rng(0)
        a = rng.standard_normal(a_shape, np.float32)
        b = rng.standard_normal(b_shape, np.float32)
        fns = {}
        for dtype in (tf.float32, tf.bfloat16):
            x, k = tf.constant(a, dtype), tf.constant(b, dtype)
            op = (lambda x=x, k=k: tf.nn.conv2d(x, k, 1, "SAME")) if name == "conv" else None
            fns[dtype.name] = tf.function(op or (lambda x=x, k=k: tf.matmul(x, k)))
            fns[dtype.name]().numpy()  # trace and warm
            best[dtype.name] = float("inf")
        for i in range(2 * reps):
            dtype = ("float32", "bfloat16")[i % 2]
            start = time.perf_counter()
            for _ in range(calls):
                result = fns[dtype]()
            result.numpy()
            best[dtype] = min(best[dtype], time.perf_counter() - start)
        out[f"scoring_bf16_{name}_op_speedup"] = round(best["float32"] / best["bfloat16"], 3)
        parts.append(
            f"{name} {a_shape} x {b_shape}: fp32 {best['float32'] / calls * 1e3:.1f} ms, "
            f"bf16 {best['bfloat16'] / calls * 1e3:.1f} ms"
        )
    out["_note_scoring_bf16_ops"] = (
        "the ceiling: single TensorFlow ops in the bench process, fp32 vs bf16 inputs, "
        f"alternated, best of {reps} x {calls} calls: " + "; ".join(parts) + ". A 3 x 3 "
        "convolution is most of ResNet50's work; bf16 cannot speed the models up by more than "
        "these ops gain on this CPU (AVX-512 BF16 dot products, no AMX tiles)."
    )


def _best(runs: list[Sample], i: int = 1) -> float:
    return min(s[i] for s in runs)


def _tile_classes(result: Any) -> np.ndarray:
    return np.array([np.argmax(t.probabilities) for t in result.tiles])


def report_bf16(cfg: PerfConfig, samples: dict[str, Any], out: Results) -> None:
    fp32, bf16 = samples["fp32"], samples["bf16"]
    names = list(fp32)
    t32, t16 = sum(_best(fp32[n]) for n in names), sum(_best(bf16[n]) for n in names)
    c32, c16 = sum(_best(fp32[n], 2) for n in names), sum(_best(bf16[n], 2) for n in names)
    pred32 = sum(min(r[0].timings.predict_s for r in fp32[n]) for n in names)
    pred16 = sum(min(r[0].timings.predict_s for r in bf16[n]) for n in names)
    agree, diffs, tiles_same, tiles_all, parts = [], [], 0, 0, []
    for n in names:
        ref, low = fp32[n][0][0], bf16[n][0][0]
        for result, _, _ in bf16[n]:
            same, diff = _compare(ref, result)
            agree.append(same)
            diffs.append(diff)
        tiles_same += int((_tile_classes(ref) == _tile_classes(low)).sum())
        tiles_all += len(ref.tiles)
        maxima = [t.mitosis_max for t in ref.tiles]
        parts.append(
            f"{n} ({ref.tiles_scored} tiles): fp32 {_best(fp32[n]):.2f} s (predict "
            f"{min(r[0].timings.predict_s for r in fp32[n]):.2f}) vs bf16 "
            f"{_best(bf16[n]):.2f} s (predict {min(r[0].timings.predict_s for r in bf16[n]):.2f})"
            f"; tumor score / mitotic grade fp32 {ref.tumor_score}/{ref.mitotic_score}, bf16 "
            f"{low.tumor_score}/{low.mitotic_score}; slide probabilities fp32 "
            f"{[round(x, 4) for x in ref.probabilities]}, bf16 "
            f"{[round(x, 4) for x in low.probabilities]}; mitoses fp32 {ref.mitosis_count}, bf16 "
            f"{low.mitosis_count}; tile mitosis-map maxima {min(maxima):.3f}..{max(maxima):.3f}"
        )
    out["scoring_bf16_vs_fp32_speedup"] = round(t32 / t16, 3)
    out["scoring_bf16_vs_fp32_predict_speedup"] = round(pred32 / pred16, 3)
    out["scoring_bf16_vs_fp32_cpu_speedup"] = round(c32 / c16, 3)
    out["scoring_bf16_agreement"] = round(sum(agree) / len(agree), 3)
    out["scoring_bf16_tile_class_agreement"] = round(tiles_same / tiles_all, 4)
    out["scoring_bf16_max_prob_diff"] = round(max(diffs), 5)
    out["_note_scoring_bf16"] = (
        "two local model servers over the same fp32 SavedModels, PROLIF_MODEL_PRECISION=fp32 "
        "and =bf16 (TensorFlow's oneDNN auto mixed precision, auto_mixed_precision_onednn_"
        "bfloat16: convolutions and matmuls in bfloat16 on AVX-512 BF16, no AMX here; the "
        "option TF Serving's --mixed_precision=bfloat16 sets), each behind an in-process "
        "ScoringService; unary ScoreSlide with the tiles, one warm-up each, then "
        f"{cfg.bf16_reps} samples per precision per slide alternated. speedup = sum of best fp32 "
        "seconds / sum of best bf16 seconds, client wall clock; predict_speedup: the same with "
        f"the service's ScoreTimings predict_s ({pred32:.2f} vs {pred16:.2f} s); cpu_speedup: "
        f"CPU seconds of the model server + this process ({c32:.2f} vs {c16:.2f} s), less moved "
        "by other people's load. agreement = share of bf16 results with the fp32 result's tumor "
        "score and mitotic grade; tile_class_agreement = share of tiles with the same most "
        "probable class; max_prob_diff = largest |bf16 - fp32| over every tile's class "
        "probabilities and mitosis-map maximum. Untrained models: the tumor model's class "
        "probabilities are saturated (one class ~1), so its agreement is an easy test here; the "
        "mitosis maps are not. ONEDNN_DEFAULT_FPMATH_MODE=BF16 alone was tried first: outputs "
        "bit-identical to fp32 and no speedup (TensorFlow's oneDNN kernels do not take it up). "
        f"Totals fp32 {t32:.2f} s vs bf16 {t16:.2f} s. " + "; ".join(parts)
    )


# --- whole-slide throughput ----------------------------------------------------------------


def large_rois(cfg: PerfConfig, side0: int) -> list[pb.Polygon]:
    """The square ROI (level-0 px) the large-slide entries score; none for the whole slide."""
    if not cfg.roi_tiles:
        return []
    half = cfg.roi_tiles * 256 / 2
    cx, cy = cfg.roi_centre[0] * side0, cfg.roi_centre[1] * side0
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    return [pb.Polygon(rings=[pb.Ring(xy=[x0, y0, x1, y0, x1, y1, x0, y1])])]


def roi_tiles(name: str, path: Path, rois: list[pb.Polygon]) -> SlideTiles:
    with open_slide(path) as slide:
        plan = plan_slide(slide, path.stem, pb.TilingSpec(), defaults(), rois)
        origins = [(t.x, t.y) for t, _, _ in iter_kept_tiles(slide, plan)]
    spec = plan.spec
    return SlideTiles(name, path, spec.level, spec.read_size, origins, len(plan.candidates))


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) of this process and of `pids`."""
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bench_large(
    cfg: PerfConfig,
    large: Path,
    out: Results,
    log: Callable[[str], None] = print,
    prefix: str = "scoring_large",
) -> None:
    """The large slide's ROI (or the whole slide) through a ScoringService child and a model
    server child vs the same kept tiles through bare decode + the in-process model,
    alternated (ABBA), `large_reps` samples each; figures under `prefix`_*."""
    from prolifscore.scoring.model_client import InProcessModels

    ensure_models(cfg.model_root, cfg.tumor_input_size)
    with open_slide(large) as slide:
        side0 = slide.dimensions[0]
    rois = large_rois(cfg, side0)
    warm_file_cache(large)
    models = InProcessModels(cfg.model_root)
    samples: dict[str, list[dict[str, float]]] = {"grpc": [], "direct": []}
    with model_server(cfg.model_root, cfg.work_dir / "large-modelserver.log") as server:
        tiles = roi_tiles("large", large, rois)
        for name, output in (("resnet50", "probabilities"), ("mitosis", "mitosis_map")):
            models.predict(name, np.zeros((32, 256, 256, 3), np.uint8), output)  # warm-up
        server.wait_serving(180)
        assert server.proc is not None
        try:
            with scoring_process(
                server.grpc_address,
                [large.parent, CMU.parent],
                WORK_DIR / "results",
                cfg.work_dir / "large-scoring.log",
            ) as scoring:
                scoring.wait_serving(180)
                assert scoring.proc is not None
                pids = [server.proc.pid, scoring.proc.pid]
                with grpc.insecure_channel(scoring.grpc_address) as channel:
                    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
                    _score(stub, spb.ScoreRequest(path=str(CMU)))  # warm-up: the 32-tile shape
                    request = spb.ScoreRequest(path=str(large), rois=rois)
                    for i in range(2 * cfg.large_reps):
                        kind = "grpc" if i % 4 in (0, 3) else "direct"
                        cpu = _cpu(pids)
                        if kind == "grpc":
                            result, seconds = _score(stub, request, timeout=3600)
                            sample = {"total": seconds, "predict": result.timings.predict_s}
                            sample |= {"tiling": result.timings.tiling_s}
                        else:
                            sample = direct_slide(tiles, models, 32)
                        sample["cpu"] = _cpu(pids) - cpu
                        samples[kind].append(sample)
                        took = f"{sample['total']:.1f} s, cpu {sample['cpu']:.1f}"
                        log(f"[bench]   large {kind}: {took}")
                rss = {"scoring": _vmhwm_mb(scoring.proc.pid), "model": _vmhwm_mb(server.proc.pid)}
        finally:
            models.close()
    if result.tiles_scored != len(tiles.origins):
        raise RuntimeError(
            f"scored {result.tiles_scored} tiles, the library keeps {len(tiles.origins)}"
        )
    report_large(cfg, tiles, samples, rss, side0, out, prefix)


def report_large(
    cfg: PerfConfig,
    tiles: SlideTiles,
    samples: dict[str, list[dict[str, float]]],
    rss: dict[str, float],
    side0: int,
    out: Results,
    prefix: str,
) -> None:
    n = len(tiles.origins)
    g = min(samples["grpc"], key=lambda s: s["total"])
    d = min(samples["direct"], key=lambda s: s["total"])
    g_cpu = min(s["cpu"] for s in samples["grpc"])
    d_cpu = min(s["cpu"] for s in samples["direct"])
    out[f"{prefix}_kept_tiles_per_s"] = round(n / g["total"], 2)
    out[f"{prefix}_seconds_per_10k_tiles"] = round(g["total"] / n * 10_000, 1)
    out[f"{prefix}_peak_rss_gb"] = round((rss["scoring"] + rss["model"]) / 1024, 3)
    out[f"{prefix}_vs_direct_model_ratio"] = round(g["total"] / d["total"], 3)
    out[f"{prefix}_vs_direct_model_cpu_ratio"] = round(g_cpu / d_cpu, 3)
    where = (
        f"a {cfg.roi_tiles} x {cfg.roi_tiles}-tile square ROI ({cfg.roi_tiles * 256} px side, "
        f"centred at {cfg.roi_centre} of the {side0} px side, ScoreRequest.rois; the tissue map "
        "covers the ROI's window only) of the large slide, since the whole slide takes ~15 min "
        "per sample at these rates: section whole_slide (python -m bench.run --only "
        "whole_slide) measures it"
        if cfg.roi_tiles
        else f"the whole large slide ({side0} px side), no ROI"
    )
    out[f"_note_{prefix}"] = (
        f"{where}; {n} kept of {tiles.candidates} candidates. gRPC = one unary ScoreSlide "
        "(default request; results stored with tiles and heatmap, as the service does) to a "
        "ScoringService child (python -m prolifscore.scoring.server, thread reader "
        "PROLIF_SCORING_RAY_READERS=0, pipelined: the next batch is read while the model server "
        "predicts this one) and a model server child (fp32, no batching), on this machine's 2 "
        "cores, after a warm-up ScoreSlide of the small slide; best "
        f"{g['total']:.1f} s (server: tiling {g['tiling']:.1f}, waiting on Predict "
        f"{g['predict']:.1f}). direct = bare OpenSlide read_region of the same kept tiles + the "
        "same SavedModels called in-process (bench process, warmed), batches of 32, no overlap: "
        f"best {d['total']:.1f} s (decode {d['decode']:.1f} + predict {d['predict']:.1f}). "
        f"{cfg.large_reps} sample(s) each, "
        f"{'alternated ABBA' if cfg.large_reps > 1 else 'gRPC first'}: gRPC "
        f"{[round(s['total'], 1) for s in samples['grpc']]} s, direct "
        f"{[round(s['total'], 1) for s in samples['direct']]} s; cpu_ratio = best CPU seconds "
        f"(both children + this process) {g_cpu:.1f} vs {d_cpu:.1f}, which other people's load "
        "on the cores moves less than the wall clock. peak RSS = VmHWM of the two children at "
        f"the end: scoring {rss['scoring']:.0f} MB + model server {rss['model']:.0f} MB."
    )


# --- concurrency ---------------------------------------------------------------------------


def _alternate(
    fns: dict[str, Callable[[], None]],
    cfg: PerfConfig,
    pids: list[int],
    log: Callable[[str], None],
) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, CPU seconds of this process and `pids`) of each function per round,
    alternated."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(cfg.concurrent_rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            cpu, start = _cpu(pids), time.perf_counter()
            fns[name]()
            runs[name].append((time.perf_counter() - start, _cpu(pids) - cpu))
        last = ", ".join(f"{m} {runs[m][-1][0]:.2f} s (cpu {runs[m][-1][1]:.1f})" for m in runs)
        log(f"[bench]   concurrency round {i + 1}: {last}")
    return runs


def bench_concurrency(cfg: PerfConfig, out: Results, log: Callable[[str], None] = print) -> None:
    """`concurrent_calls` ScoreSlide calls of one small slide, one after another vs all at
    once, through an in-process ScoringService and a model server with batching on."""
    ensure_models(cfg.model_root, cfg.tumor_input_size)
    name, path = cfg.concurrent_slide
    n = cfg.concurrent_calls
    env = {
        "PROLIF_MODEL_SERVER_BATCHING": "true",
        "PROLIF_MODEL_SERVER_BATCHING_CONFIG": str(cfg.batching_config),
    }
    warm_file_cache(path)
    request = spb.ScoreRequest(path=str(path))
    with (
        model_server(cfg.model_root, cfg.work_dir / "concurrency-modelserver.log", env) as server,
        ThreadPoolExecutor(n) as pool,
    ):
        server.wait_serving(180)
        with scoring_service(server.grpc_address, [path.parent], max_concurrent=n) as stub:

            def sequential() -> None:
                for _ in range(n):
                    _score(stub, request)

            def concurrent() -> None:
                list(pool.map(lambda _: _score(stub, request), range(n)))

            tiles = _score(stub, request)[0].tiles_scored
            concurrent()  # warm-up: the merged batch shapes
            assert server.proc is not None
            fns = {"sequential": sequential, "concurrent": concurrent}
            samples = _alternate(fns, cfg, [server.proc.pid], log)
    runs = {k: [wall for wall, _ in v] for k, v in samples.items()}
    seq, conc = min(runs["sequential"]), min(runs["concurrent"])
    seq_cpu = min(c for _, c in samples["sequential"])
    conc_cpu = min(c for _, c in samples["concurrent"])
    out["scoring_concurrent_vs_sequential_speedup"] = round(seq / conc, 3)
    out["scoring_concurrent_vs_sequential_cpu_speedup"] = round(seq_cpu / conc_cpu, 3)
    out["scoring_concurrent_kept_tiles_per_s"] = round(n * tiles / conc, 2)
    out["scoring_sequential_kept_tiles_per_s"] = round(n * tiles / seq, 2)
    out["_note_scoring_concurrency"] = (
        f"{n} unary ScoreSlide calls of {name} ({tiles} kept tiles each) one after another vs "
        f"all at once from {n} client threads; in-process ScoringService "
        f"(PROLIF_SCORING_CONCURRENCY={n}, thread reader) and a model server child with "
        "batching on and the Kubernetes batching config (k8s/base/config/batching.config: "
        "max_batch_size 64, batch_timeout_micros 5000, 4 batch threads); warm-up of both ways "
        f"first, then {cfg.concurrent_rounds} rounds alternated, best of each: sequential "
        f"{seq:.2f} s vs concurrent {conc:.2f} s (all samples: sequential "
        f"{[round(x, 2) for x in runs['sequential']]}, concurrent "
        f"{[round(x, 2) for x in runs['concurrent']]}; medians "
        f"{statistics.median(runs['sequential']):.2f} vs "
        f"{statistics.median(runs['concurrent']):.2f} s). cpu_speedup = the same with the CPU "
        f"seconds of the model server + this process (best {seq_cpu:.1f} vs {conc_cpu:.1f} s): "
        "what merged batches save in work, which other people's load on the 2 cores moves "
        "less than the wall clock. On 2 cores both ways keep the cores busy with the models "
        "(TensorFlow's intra-op threads), so concurrency can only win what larger batches save "
        "per tile and the reading it overlaps."
    )
