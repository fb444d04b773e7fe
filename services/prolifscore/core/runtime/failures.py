"""Reporting a work item that would fail again if retried, the same way in every service: its
record goes to the dead-letter topic (to inspect and replay) and is counted, and a slide's
failure is also announced on the status topic, where clients follow their slides."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from kafka.consumer.fetcher import ConsumerRecord

from prolifscore.core.runtime import metrics
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.events import stamp
from prolifscore.core.runtime.validation import InvalidInput, carried_id, carried_path, clip
from prolifscore.v1 import pipeline_pb2 as pb

log = logging.getLogger(__name__)


def give_up(bus: Bus, record: ConsumerRecord, reason: str, unit: str) -> None:
    """Dead-letter `record` and count one failed `unit` (slide, batch, run...) of the service.

    The caller still publishes the item's outcome, so the batch can be committed."""
    bus.dead_letter(record, reason)
    metrics.FAILURES.labels(bus.service, unit).inc()


def slide_failed(
    bus: Bus,
    reason: str,
    *,
    slide_id: str,
    path: str,
    run_id: str,
    batch_index: int = 0,
    batch_count: int = 0,
    spec_hash: str = "",
    service: str | None = None,
) -> pb.SlideStatus:
    """Publish a FAILED status for the slide (keyed by slide id, else path) on the bus's status
    topic, with its event id and sequence (`events.stamp`). Returns the status published.

    The status repeats only the ids and path that pass validation (a rejected 5 MB run id or a
    path with a NUL byte is left out: the dead letter keeps the record as it came)."""
    slide_id, path, run_id = carried_id(slide_id), carried_path(path), carried_id(run_id)
    reason = clip(reason)
    extra: dict[str, object] = {"slide_id": slide_id, "reason": reason}
    if batch_count:
        extra["batch"] = batch_index
    log.warning("slide failed", extra=extra)
    status = pb.SlideStatus(
        slide_id=slide_id,
        stage=pb.STAGE_FAILED,
        service=service or bus.service,
        reason=reason,
        path=path,
        run_id=run_id,
        batch_index=batch_index,
        batch_count=batch_count,
    )
    status.time.GetCurrentTime()
    stamp(status, spec_hash)
    bus.publish(bus.settings.topic_status, slide_id or path, status)
    return status


def fail_slide(
    bus: Bus, record: ConsumerRecord, reason: str, unit: str, **where: Any
) -> pb.SlideStatus:
    """`slide_failed` (`where`: its keyword arguments), then `give_up` on the record (one failed
    `unit`). Returns the status published."""
    status = slide_failed(bus, reason, **where)
    give_up(bus, record, reason, unit)
    return status


class SlideMessage(Protocol):
    """A message about one slide (SlideIngest, TileTask)."""

    slide_id: str
    path: str
    run_id: str


S = TypeVar("S", bound=SlideMessage)


def accepted(
    bus: Bus, record: ConsumerRecord, msg: S, validate: Callable[[S], None], unit: str
) -> bool:
    """Whether `msg` passes `validate`; if not, its slide's FAILED status (repeating only the
    fields that pass) and its record's dead letter are published, and nothing else sees it."""
    try:
        validate(msg)
    except InvalidInput as exc:
        fail_slide(
            bus, record, str(exc), unit, slide_id=msg.slide_id, path=msg.path, run_id=msg.run_id
        )
        return False
    return True
