"""Tiling service: prolif.slides.ingest -> prolif.tiles.tasks (+ status), slides in parallel
on Ray. Entry point: `prolifscore-tiling`."""

from __future__ import annotations

import logging
from typing import Any

from prolifscore.core.runtime import inflight, metrics, tracing
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.events import stamp
from prolifscore.core.runtime.failures import accepted, fail_slide, slide_failed
from prolifscore.core.runtime.service import KafkaWork, ServiceRuntime, configure, run_service
from prolifscore.core.runtime.validation import validate_ingest
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

        valid = [(r, m) for r, m in items if accepted(self.bus, r, m, validate_ingest, "slide")]
        # One span per slide, from the ingest record's trace; its tile tasks carry it on.
        spans = [
            tracing.start_consumer("tile slide", r, **{"prolif.slide_id": m.slide_id})
            for r, m in valid
        ]
        refs = [  # only valid messages reach Ray
            self._remote.remote(msg.SerializeToString(), self._roots, self.settings.preprocess)
            for _, msg in valid
        ]
        try:
            for (record, msg), ref, span in zip(valid, refs, spans, strict=True):
                with tracing.current(span):
                    with metrics.DURATION.labels(NAME, "slide").time():
                        outcome: TilingOutcome = ray.get(ref)
                    if outcome.error:
                        span.set_attribute("prolif.error", outcome.error)
                        fail_slide(
                            self.bus,
                            record,
                            outcome.error,
                            "slide",
                            slide_id=msg.slide_id,
                            path=msg.path,
                            run_id=msg.run_id,
                        )
                        continue
                    span.set_attribute("prolif.tiles.candidates", outcome.candidates)
                    span.set_attribute("prolif.batches", len(outcome.tasks))
                    self.publish(msg, outcome)
        finally:
            tracing.end_all(spans)  # those a failure left open

    def publish(self, msg: pb.SlideIngest, outcome: TilingOutcome) -> None:
        """The slide's tile tasks and its TILED status; the slide is in flight from now on."""
        k = self.settings.kafka
        for task in outcome.tasks:
            self.bus.publish_bytes(k.topic_tasks, msg.slide_id, task)
        status = pb.SlideStatus.FromString(outcome.status)
        first = pb.TileTask.FromString(outcome.tasks[0]) if outcome.tasks else pb.TileTask()
        spec_hash = first.spec.spec_hash
        self.bus.publish(k.topic_status, msg.slide_id, stamp(status, spec_hash))
        inflight.begin(
            self.settings.runtime.tiles_root,
            msg.slide_id,
            spec_hash,
            path=status.path,
            run_id=msg.run_id,
            batch_count=status.batch_count,
        )
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

    def abandon(self, record: Any, msg: pb.SlideIngest, reason: str) -> None:
        """The slide's ingest record was given up (dead-lettered after repeated failures)."""
        slide_failed(self.bus, reason, slide_id=msg.slide_id, path=msg.path, run_id=msg.run_id)


def main() -> None:
    settings = configure(NAME, TilingSettings)
    k = settings.kafka
    work = KafkaWork(
        k,
        consume=k.topic_ingest,
        produce=[k.topic_tasks, k.topic_status, k.topic_shards],
        group_id=settings.group_id,
        msg_type=pb.SlideIngest,
        handler=lambda bus: TilingService(settings, bus),
    )
    run_service(ServiceRuntime(NAME, settings.runtime), work)


if __name__ == "__main__":
    main()
