"""Ray scaling: the same tile tasks through an ActorPool of 1 and of 2 BatchFilter actors.

Actors are started and warmed (one task each, slide opened) before the clock starts, so the
figure is steady-state throughput, not Ray start-up.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prolifscore.core.raycluster import init_ray
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


def _warm_task(task: bytes) -> bytes:
    """A copy of `task` under another slide id, so warming writes nothing the timed run does."""
    msg = pb.TileTask.FromString(task)
    msg.slide_id = f"warmup-{msg.slide_id}"
    return msg.SerializeToString()


def run_pool(tasks: Sequence[bytes], actors: int, slide_root: Path, out_dir: Path) -> RayRun:
    """Time `tasks` through `actors` warm BatchFilter actors; shards go to `out_dir`
    (deleted afterwards)."""
    import ray
    from ray.util import ActorPool

    shutil.rmtree(out_dir, ignore_errors=True)
    remote = ray.remote(num_cpus=1)(BatchFilter)
    handles = [remote.remote(str(out_dir), (str(slide_root),)) for _ in range(actors)]
    try:
        warm = _warm_task(tasks[0])
        for r in ray.get([h.process.remote(warm) for h in handles]):
            if "error" in r:
                raise RuntimeError(f"warm-up failed: {r['error']}")
        pool = ActorPool(handles)
        start = time.perf_counter()
        results = list(pool.map_unordered(lambda a, t: a.process.remote(t), tasks))
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            ray.kill(h)
        shutil.rmtree(out_dir, ignore_errors=True)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} tasks failed, first: {errors[0]}")
    return RayRun(
        actors=actors,
        seconds=seconds,
        candidates=sum(r["candidates"] for r in results),
        kept=sum(r["tile_count"] for r in results),
    )


def ray_scaling(
    tasks: Sequence[bytes], slide_root: Path, work_dir: Path, rounds: int = 1
) -> tuple[float, list[RayRun]]:
    """(speedup of 2 actors over 1, every run), best of `rounds` each, in one Ray session
    with 2 CPUs. Order 2, 1, 1, 2, ... so that neither side always goes first."""
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
    import ray  # only now: init_ray sets variables Ray reads at import time

    runs: list[RayRun] = []
    try:
        for i in range(rounds):
            for n in (2, 1) if i % 2 == 0 else (1, 2):
                runs.append(run_pool(tasks, n, slide_root, work_dir / f"ray-{n}-actors-{i}"))
    finally:
        ray.shutdown()
    best = {n: min(r.seconds for r in runs if r.actors == n) for n in (1, 2)}
    return best[1] / best[2], runs
