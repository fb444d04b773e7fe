"""Ray scaling: the same tile tasks through an ActorPool of 1 and of 2 BatchFilter actors.

Both actors are started and warmed (one task each, slide opened) before any clock starts, so
the figure is steady-state throughput, not Ray start-up. Each run renames the slide id, so its
shards land in a folder of their own.

Each actor is confined to one core of its own (CPU affinity), as a Ray worker with a 1-CPU
limit is on a cluster: `num_cpus=1` only reserves a CPU in Ray's bookkeeping, and an actor's
reader threads would otherwise spread over both cores of this machine, so that "1 worker"
already used 2 cores and the figure measured nothing about adding workers.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prolifscore.core.runtime.ray import init_ray
from prolifscore.filtering.worker import BatchFilter
from prolifscore.v1 import pipeline_pb2 as pb


@dataclass
class RayRun:
    actors: int
    seconds: float
    candidates: int
    kept: int

    @property
    def kept_per_second(self) -> float:
        return self.kept / self.seconds


class PinnedBatchFilter(BatchFilter):
    def pin(self, cpu: int) -> list[int]:
        """Run this actor's threads (reader threads included) on core `cpu` only."""
        os.sched_setaffinity(0, {cpu})
        for tid in os.listdir("/proc/self/task"):  # threads started before the call too
            os.sched_setaffinity(int(tid), {cpu})
        return sorted(os.sched_getaffinity(0))


def renamed(tasks: Sequence[bytes], slide_id: str) -> list[bytes]:
    """`tasks` under another slide id (shards go to a folder per slide id)."""
    out = []
    for task in tasks:
        msg = pb.TileTask.FromString(task)
        msg.slide_id = slide_id
        out.append(msg.SerializeToString())
    return out


def _check(results: Sequence[dict]) -> None:
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} tasks failed, first: {errors[0]}")


def _start_ray() -> None:
    # init_ray() without an address joins any Ray instance already running on this machine
    # (ray.init(address=None) looks for one), and then fails on num_cpus. "local" forces a
    # fresh instance of our own.
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    try:
        init_ray(num_cpus=2)
    finally:
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous


def ray_scaling(
    tasks: Sequence[bytes], slide_root: Path, work_dir: Path, rounds: int = 1
) -> tuple[float, list[RayRun]]:
    """(speedup of 2 actors over 1, every run), best of `rounds` each, in one Ray session
    with 2 CPUs. Order 2, 1, 1, 2, ... so that neither side always goes first."""
    _start_ray()
    import ray  # only now: init_ray sets variables Ray reads at import time
    from ray.util import ActorPool

    out_dir = work_dir / "ray-shards"
    shutil.rmtree(out_dir, ignore_errors=True)
    name = pb.TileTask.FromString(tasks[0]).slide_id
    runs: list[RayRun] = []
    try:
        remote = ray.remote(num_cpus=1)(PinnedBatchFilter)
        handles = [remote.remote(str(out_dir), (str(slide_root),)) for _ in range(2)]
        cores = sorted(os.sched_getaffinity(0))[:2]
        ray.get([h.pin.remote(cpu) for h, cpu in zip(handles, cores, strict=True)])
        warm = renamed(tasks[:1], f"{name}-warmup")[0]
        _check(ray.get([h.process.remote(warm) for h in handles]))
        for i in range(rounds):
            for n in (2, 1) if i % 2 == 0 else (1, 2):
                batch = renamed(tasks, f"{name}-{n}-actors-{i}")
                pool = ActorPool(handles[:n])
                start = time.perf_counter()
                results = list(pool.map_unordered(lambda a, t: a.process.remote(t), batch))
                seconds = time.perf_counter() - start
                _check(results)
                kept = sum(r["tile_count"] for r in results)
                candidates = sum(r["candidates"] for r in results)
                runs.append(RayRun(n, seconds, candidates, kept))
    finally:
        ray.shutdown()
        shutil.rmtree(out_dir, ignore_errors=True)
    best = {n: min(r.seconds for r in runs if r.actors == n) for n in (1, 2)}
    return best[1] / best[2], runs
