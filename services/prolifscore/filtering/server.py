"""Filtering service: prolif.tiles.tasks -> TFRecord shards + prolif.tiles.shards (+ status),
batches in parallel on a pool of Ray actors. Entry point: `prolifscore-filtering`.

An actor that dies (killed, out of memory) is restarted by Ray, so the pool never stays short;
the batch it was doing fails once and is retried (`core/runtime/delivery.py`). Temporaries left
by writers that died are removed at start-up and when their batch is redone."""

from __future__ import annotations

import logging
from typing import Any

from prolifscore.core.runtime import inflight, metrics, tracing
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.events import stamp
from prolifscore.core.runtime.failures import accepted, give_up, slide_failed
from prolifscore.core.runtime.service import KafkaWork, ServiceRuntime, configure, run_service
from prolifscore.core.runtime.validation import validate_tile_task
from prolifscore.core.wsi.leftovers import remove_stale_temporaries
from prolifscore.core.wsi.shards import completed_markers, write_manifest
from prolifscore.filtering.config import FilteringSettings
from prolifscore.filtering.worker import SPLIT_NAMES, BatchFilter
from prolifscore.v1 import pipeline_pb2 as pb

log = logging.getLogger(__name__)
NAME = "filtering"


class FilteringService:
    def __init__(self, settings: FilteringSettings, bus: Bus) -> None:
        import ray

        self.settings = settings
        self.bus = bus
        rt = settings.runtime
        removed = remove_stale_temporaries(rt.tiles_root)
        if removed:
            log.info("removed temporaries of writers that died", extra={"files": len(removed)})
        n = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Restarted by Ray whenever it dies; the task it was running fails (no silent retry),
        # so the consumer counts the attempt against the record.
        actor = ray.remote(num_cpus=settings.actor_cpus, max_restarts=-1, max_task_retries=0)(
            BatchFilter
        )
        roots = tuple(str(r) for r in rt.slide_roots)
        self.actors = [
            actor.remote(str(rt.tiles_root), roots, settings.slide_cache, settings.read_threads)
            for _ in range(n)
        ]

    def handle(self, items: list[tuple[Any, pb.TileTask]]) -> None:
        """Every batch on a free actor; results reported as they come. If an actor died under a
        batch, the other batches still finish, then the first such error is raised."""
        import ray

        # Tasks come from the tiling service, but the topic is open to any producer: a task's
        # slide id and spec hash name shard files, so it is checked before a worker sees it.
        items = [(r, t) for r, t in items if accepted(self.bus, r, t, validate_tile_task, "batch")]
        # One span per batch, from the tile task's trace (its slide's): the shard, its index
        # record and the status events carry it on.
        spans = [tracing.start_consumer("filter batch", r, **_attributes(t)) for r, t in items]
        queue = list(enumerate(items))
        free = list(self.actors)
        running: dict[Any, tuple[int, Any]] = {}
        errors: list[Exception] = []
        try:
            while queue or running:
                while queue and free:
                    index, (_, task) = queue.pop(0)
                    actor = free.pop()
                    running[actor.process.remote(task.SerializeToString())] = (index, actor)
                ready, _ = ray.wait(list(running), num_returns=1)
                index, actor = running.pop(ready[0])
                free.append(actor)
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayActorError as exc:
                    spans[index].record_exception(exc)
                    errors.append(exc)
                    continue
                record, task = items[index]
                with tracing.current(spans[index]) as span:
                    if "error" in result:
                        span.set_attribute("prolif.error", result["error"])
                        self.failed(record, task, result["error"])
                    else:
                        span.set_attribute("prolif.tiles.kept", result["tile_count"])
                        span.set_attribute("prolif.shard.path", result.get("path") or "")
                        self.done(task, result)
        finally:
            tracing.end_all(spans)  # those a failure left open
        if errors:
            raise errors[0]

    def failed(self, record: Any, task: pb.TileTask, reason: str) -> None:
        """The batch failed for a reason a retry cannot fix: reported, and its record
        dead-lettered."""
        self.abandon(record, task, reason)
        give_up(self.bus, record, reason, "batch")

    def abandon(self, record: Any, task: pb.TileTask, reason: str) -> None:
        """Report the batch's slide FAILED (its record is dead-lettered by the caller)."""
        slide_failed(
            self.bus,
            reason,
            slide_id=task.slide_id,
            path=task.path,
            run_id=task.run_id,
            batch_index=task.batch_index,
            batch_count=task.batch_count,
            spec_hash=task.spec.spec_hash,
        )
        inflight.end(self.settings.runtime.tiles_root, task.slide_id, task.spec.spec_hash)

    def done(self, task: pb.TileTask, result: dict[str, Any]) -> None:
        k = self.settings.kafka
        metrics.TILES.labels(NAME, "kept").inc(result["tile_count"])
        metrics.TILES.labels(NAME, "dropped").inc(result["candidates"] - result["tile_count"])
        metrics.DURATION.labels(NAME, "batch").observe(result["seconds"])
        if result["tile_count"]:
            self.bus.publish(
                k.topic_shards,
                task.slide_id,
                pb.ShardIndex(
                    slide_id=task.slide_id,
                    path=result["path"],
                    tile_count=result["tile_count"],
                    split=task.split,
                    labels=task.labels,
                    batch_index=task.batch_index,
                    batch_count=task.batch_count,
                    spec_hash=task.spec.spec_hash,
                    size_bytes=result["size_bytes"],
                    run_id=task.run_id,
                    crc32c=result["crc32c"],
                ),
            )
        root = self.settings.runtime.tiles_root
        markers = completed_markers(root, task.slide_id, task.spec.spec_hash, task.batch_count)
        status = pb.SlideStatus(
            slide_id=task.slide_id,
            service=NAME,
            path=task.path,
            run_id=task.run_id,
            candidate_tiles=task.candidate_tiles,
            batch_count=task.batch_count,
            batch_index=task.batch_index,
        )
        status.time.GetCurrentTime()
        if markers is None:
            status.stage = pb.STAGE_FILTERING
            status.kept_tiles = result["tile_count"]
            status.duration_s = result["seconds"]
        else:
            summary = {
                "path": task.path,
                "split": SPLIT_NAMES.get(task.split, "train"),
                "labels": {
                    "tumor_score": task.labels.tumor_score
                    if task.labels.HasField("tumor_score")
                    else None,
                    "molecular_score": task.labels.molecular_score
                    if task.labels.HasField("molecular_score")
                    else None,
                },
                "candidate_tiles": task.candidate_tiles,
                "run_id": task.run_id,
                "spec": {f.name: v for f, v in task.spec.ListFields()},
            }
            manifest = write_manifest(root, task.slide_id, task.spec.spec_hash, summary, markers)
            status.stage = pb.STAGE_FILTERED
            status.kept_tiles = sum(m["tile_count"] for m in markers)
            status.batches_done = len(markers)
            status.duration_s = sum(m["seconds"] for m in markers)
            status.manifest_path = str(manifest)
            metrics.SLIDES.labels(NAME, "filtered").inc()
            tracing.event("slide filtered", **{"prolif.manifest": str(manifest)})
            log.info("slide filtered", extra={"slide_id": task.slide_id, "kept": status.kept_tiles})
            inflight.end(root, task.slide_id, task.spec.spec_hash)
        self.bus.publish(k.topic_status, task.slide_id, stamp(status, task.spec.spec_hash))


def _attributes(task: pb.TileTask) -> dict[str, Any]:
    return {
        "prolif.slide_id": task.slide_id,
        "prolif.batch_index": task.batch_index,
        "prolif.batch_count": task.batch_count,
    }


def main() -> None:
    settings = configure(NAME, FilteringSettings)
    k = settings.kafka
    work = KafkaWork(
        k,
        consume=k.topic_tasks,
        produce=[k.topic_shards, k.topic_status],
        group_id=settings.group_id,
        msg_type=pb.TileTask,
        handler=lambda bus: FilteringService(settings, bus),
    )
    run_service(ServiceRuntime(NAME, settings.runtime), work)


if __name__ == "__main__":
    main()
