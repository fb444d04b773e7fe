"""Status events carry ids that repeat exactly when the event repeats, and views built on them
count each event once and show the slide's latest state."""

from __future__ import annotations

from prolifscore.core.runtime.events import SlideEvents, event_id, sequence, stamp
from prolifscore.v1 import pipeline_pb2 as pb


def status(stage: int, batch: int = 0, **fields: object) -> pb.SlideStatus:
    s = pb.SlideStatus(
        slide_id="s1", run_id="r1", stage=stage, batch_index=batch, batch_count=3, **fields
    )
    s.service = {pb.STAGE_TILED: "tiling"}.get(stage, "filtering")
    return stamp(s, "spec1")


def test_ids_repeat_with_the_event_and_only_then() -> None:
    again = status(pb.STAGE_FILTERING, 1, kept_tiles=7)
    again.time.GetCurrentTime()  # a redelivery differs in time (and timings), not in id
    assert again.event_id == status(pb.STAGE_FILTERING, 1).event_id
    ids = {
        status(pb.STAGE_TILED).event_id,
        status(pb.STAGE_FILTERING, 0).event_id,
        status(pb.STAGE_FILTERING, 1).event_id,
        status(pb.STAGE_FILTERED, 2).event_id,
        status(pb.STAGE_FAILED, 1).event_id,
        stamp(pb.SlideStatus(slide_id="s1", run_id="r2", stage=pb.STAGE_TILED), "spec1").event_id,
        stamp(pb.SlideStatus(slide_id="s1", run_id="r1", stage=pb.STAGE_TILED), "spec2").event_id,
    }
    assert len(ids) == 7
    # whichever batch finishes last reports the one FILTERED event of the slide
    assert status(pb.STAGE_FILTERED, 0).event_id == status(pb.STAGE_FILTERED, 2).event_id


def test_sequence_orders_a_slides_life() -> None:
    order = [
        status(pb.STAGE_TILED),
        status(pb.STAGE_FILTERING, 0),
        status(pb.STAGE_FILTERING, 2),
        status(pb.STAGE_FILTERED, 1),
        status(pb.STAGE_FAILED, 0),
    ]
    assert [s.sequence for s in order] == [0, 1, 3, 4, 5] == [sequence(s) for s in order]


def test_view_counts_repeats_once_and_keeps_the_latest_state() -> None:
    delivered = [
        status(pb.STAGE_TILED),
        status(pb.STAGE_FILTERING, 0),
        status(pb.STAGE_FILTERING, 1),
        # the filtering worker died before committing: batch 1 redone, its progress repeated,
        # then the slide reported FILTERED twice (two batches saw every marker)
        status(pb.STAGE_FILTERING, 1),
        status(pb.STAGE_FILTERED, 2),
        status(pb.STAGE_FILTERED, 1),
        status(pb.STAGE_TILED),  # the ingest record redone as well
    ]
    view = SlideEvents()
    fresh = view.extend(delivered)
    assert [pb.Stage.Name(s.stage) for s in fresh] == [
        "STAGE_TILED",
        "STAGE_FILTERING",
        "STAGE_FILTERING",
        "STAGE_FILTERED",
    ]
    assert view.duplicates == 3
    final = view.final("s1")
    assert final is not None and final.stage == pb.STAGE_FILTERED
    assert view.latest["s1"].stage == pb.STAGE_FILTERED  # a late repeated TILED does not win


def test_events_without_ids_are_deduplicated_from_their_fields() -> None:
    old = pb.SlideStatus(slide_id="s", run_id="r", stage=pb.STAGE_FILTERING, batch_index=4)
    view = SlideEvents()
    assert view.add(old) and not view.add(pb.SlideStatus().FromString(old.SerializeToString()))
    assert event_id(old) == event_id(pb.SlideStatus.FromString(old.SerializeToString()))
    assert view.final("s") is None
