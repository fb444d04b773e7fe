"""Tiling service: prolif.slides.ingest -> prolif.tiles.tasks (+ status), slides in parallel
on Ray. Entry point: `prolifscore-tiling`."""

from __future__ import annotations

import logging
from typing import Any

from prolifscore.core.runtime import metrics
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.logs import setup_logging
from prolifscore.core.runtime.ray import init_ray
from prolifscore.core.runtime.service import ServiceRuntime, consume_loop
from prolifscore.core.runtime.settings import load
from prolifscore.tiling.config import TilingSettings
from prolifscore.tiling.worker import TilingOutcome, tile_slide
from prolifscore.v1 import pipeline_pb2 as pb

log = logging.getLogger(__name__)
NAME = "tiling"


class TilingService:
    def __init__(self, settings: TilingSettings, bus: Bus) -> None:
        import ray

        self.settings = settings
        self.bus = bus
        self._remote = ray.remote(num_cpus=settings.task_cpus)(tile_slide)
        self._roots = tuple(str(r) for r in settings.runtime.slide_roots)

    def handle(self, items: list[tuple[Any, pb.SlideIngest]]) -> None:
        import ray

        refs = [
            self._remote.remote(msg.SerializeToString(), self._roots, self.settings.preprocess)
            for _, msg in items
        ]
        for (record, msg), ref in zip(items, refs, strict=True):
            with metrics.DURATION.labels(NAME, "slide").time():
                outcome: TilingOutcome = ray.get(ref)
            if outcome.error:
                self.fail(record, msg, outcome.error)
                continue
            topic = self.settings.kafka.topic_tasks
            for task in outcome.tasks:
                self.bus.publish_bytes(topic, msg.slide_id, task)
            self.bus.publish_bytes(self.settings.kafka.topic_status, msg.slide_id, outcome.status)
            metrics.SLIDES.labels(NAME, "tiled").inc()
            metrics.TILES.labels(NAME, "candidate").inc(outcome.candidates)
            log.info(
                "slide tiled",
                extra={
                    "slide_id": msg.slide_id,
                    "candidates": outcome.candidates,
                    "batches": len(outcome.tasks),
                },
            )

    def fail(self, record: Any, msg: pb.SlideIngest, reason: str) -> None:
        log.warning("slide failed", extra={"slide_id": msg.slide_id, "reason": reason})
        status = pb.SlideStatus(
            slide_id=msg.slide_id,
            stage=pb.STAGE_FAILED,
            service=NAME,
            reason=reason,
            path=msg.path,
            run_id=msg.run_id,
        )
        status.time.GetCurrentTime()
        self.bus.publish(self.settings.kafka.topic_status, msg.slide_id or msg.path, status)
        self.bus.dead_letter(record, reason, NAME)
        metrics.FAILURES.labels(NAME, "slide").inc()
        metrics.DEAD_LETTERS.labels(NAME).inc()


def main() -> None:
    settings = load(TilingSettings)
    setup_logging(NAME, settings.runtime.log_level)
    runtime = ServiceRuntime(NAME, settings.runtime).start()
    init_ray(settings.runtime.ray_address, settings.runtime.ray_num_cpus)
    bus = Bus(settings.kafka, NAME)
    k = settings.kafka
    bus.ensure_topics([k.topic_ingest, k.topic_tasks, k.topic_status, k.topic_dlq, k.topic_shards])
    service = TilingService(settings, bus)
    try:
        consume_loop(
            runtime, bus, [k.topic_ingest], settings.group_id, pb.SlideIngest, service.handle
        )
    finally:
        bus.close()
        runtime.stop()


if __name__ == "__main__":
    main()
