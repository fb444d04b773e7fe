"""Kill the filtering consumer in the middle of a slide, start it again: no tile lost, none
duplicated, no partial shard visible."""

from __future__ import annotations

import signal

import pytest

from prolifscore.core.runtime.settings import to_env
from prolifscore.v1 import pipeline_pb2 as pb
from tests.e2e.test_pipeline_e2e import library_tiles, shard_tiles
from tests.harness import ServiceProcess, Watcher, all_final, final_status, isolated_bus
from tests.slides import CMU, SLIDES

pytestmark = pytest.mark.slow


def test_filtering_killed_mid_slide_loses_and_duplicates_nothing(broker, ray_head, tmp_path):
    bus = isolated_bus(broker.bootstrap, "crash")
    k = bus.settings
    env = {
        **to_env(k),
        "PROLIF_RAY_ADDRESS": ray_head.address,
        "PROLIF_SLIDE_ROOTS": str(SLIDES),
        "PROLIF_TILES_ROOT": str(tmp_path / "tiles"),
        "PROLIF_BATCH_SIZE": "8",  # must match library_tiles' batch size (it is in the spec hash)
        "PROLIF_KAFKA_MAX_POLL_RECORDS": "1",  # commit batch by batch: the kill lands mid-slide
        "PROLIF_FILTER_WORKERS": "1",
    }
    status = Watcher(bus, k.topic_status, pb.SlideStatus, f"{k.client_id}-watch")
    tiling = ServiceProcess("prolifscore.tiling.server", env, tmp_path / "tiling.log").start()
    first = ServiceProcess("prolifscore.filtering.server", env, tmp_path / "filtering1.log").start()
    second = None
    try:
        # Seed mode checks every grid tile (~13 tiles/s here): 11 batches take several seconds.
        spec = pb.TilingSpec(tissue_mode=pb.TISSUE_MODE_SEED)
        bus.publish(
            k.topic_ingest, "crash", pb.SlideIngest(slide_id="crash", path=str(CMU), spec=spec)
        )
        bus.flush()

        def progress(events: list) -> bool:
            done = [
                e for e in events if e and e.slide_id == "crash" and e.stage == pb.STAGE_FILTERING
            ]
            return len(done) >= 2

        status.wait_for(progress, timeout=120)
        first.kill(signal.SIGKILL)
        assert final_status(status.items, "crash") is None, "killed too late: slide already done"
        second = ServiceProcess(
            "prolifscore.filtering.server", env, tmp_path / "filtering2.log"
        ).start()
        final = final_status(status.wait_for(all_final(["crash"]), timeout=180), "crash")
    finally:
        status.close()
        for svc in (tiling, first, second):
            if svc:
                svc.stop()
        bus.close()
    assert final.stage == pb.STAGE_FILTERED, final.reason
    stored = shard_tiles(final.manifest_path)  # raises if any tile is stored twice
    expected = library_tiles(CMU, "crash", spec)
    assert stored.keys() == expected.keys() and final.kept_tiles == len(expected) > 0
    slide_dir = tmp_path / "tiles" / "crash"
    shards = sorted(p.name for p in slide_dir.glob("*.tfrecord"))
    assert len(shards) == final.batch_count - sum(
        1 for p in slide_dir.glob("*.done.json") if '"tile_count": 0' in p.read_text()
    )
