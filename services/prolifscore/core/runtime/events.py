"""Slide status events that consumers can de-duplicate.

Delivery is at-least-once, so a crash between publishing and committing repeats events: a batch
redone reports its progress again, a slide may be reported FILTERED twice. Every event therefore
carries an id that is the same on every repetition (`event_id`: slide, run, spec, service, stage
and, for per-batch events, the batch) and its place in the slide's life (`sequence`). A view keeps
the first event of each id and shows, per slide, the event with the highest sequence
(`SlideEvents`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from prolifscore.v1 import pipeline_pb2 as pb

_PER_BATCH = (pb.STAGE_FILTERING, pb.STAGE_FAILED)
_TERMINAL = (pb.STAGE_FILTERED, pb.STAGE_FAILED)


def event_id(status: pb.SlideStatus, spec_hash: str = "") -> str:
    """The id of `status`, stable across redeliveries. FILTERED has no batch: whichever batch
    finishes last (it may differ when batches are redone) reports the same event."""
    batch = str(status.batch_index) if status.stage in _PER_BATCH else "-"
    parts = (
        status.slide_id,
        status.run_id,
        spec_hash,
        status.service,
        pb.Stage.Name(status.stage),
        batch,
    )
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def sequence(status: pb.SlideStatus) -> int:
    """TILED 0 < FILTERING of batch i: i + 1 < FILTERED: n + 1 < FAILED: n + 2."""
    n = status.batch_count
    return {
        pb.STAGE_TILED: 0,
        pb.STAGE_FILTERING: status.batch_index + 1,
        pb.STAGE_FILTERED: n + 1,
        pb.STAGE_FAILED: n + 2,
    }.get(status.stage, 0)


def stamp(status: pb.SlideStatus, spec_hash: str = "") -> pb.SlideStatus:
    """Set `event_id` and `sequence` (after every other field is set); returns `status`."""
    status.event_id = event_id(status, spec_hash)
    status.sequence = sequence(status)
    return status


class SlideEvents:
    """Status events as a view shows them: repeats dropped, the latest state per slide.

    Events from producers that set no id get one computed from their fields (without the spec
    hash, which the event does not carry)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.latest: dict[str, pb.SlideStatus] = {}
        self.duplicates = 0

    def add(self, status: pb.SlideStatus) -> bool:
        """Take one event; False (and ignored) if an event with its id was seen already."""
        key = status.event_id or event_id(status)
        if key in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(key)
        current = self.latest.get(status.slide_id)
        if current is None or _rank(status) >= _rank(current):
            self.latest[status.slide_id] = status
        return True

    def extend(self, events: Iterable[pb.SlideStatus | None]) -> list[pb.SlideStatus]:
        """Take many; the new (non-repeated) ones, in order."""
        return [e for e in events if e is not None and self.add(e)]

    def final(self, slide_id: str) -> pb.SlideStatus | None:
        """The slide's FILTERED or FAILED event once it has one (FAILED wins)."""
        status = self.latest.get(slide_id)
        return status if status is not None and status.stage in _TERMINAL else None


def _rank(status: pb.SlideStatus) -> tuple[int, int]:
    """Terminal events outrank progress whatever their batch count says."""
    return (status.stage in _TERMINAL, status.sequence or sequence(status))
