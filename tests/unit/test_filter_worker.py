"""The filter worker: one slide open per worker, shards complete or absent, markers last."""

from __future__ import annotations

import pytest

from prolifscore.core.runtime.settings import PreprocessSettings, load
from prolifscore.core.wsi import preprocess
from prolifscore.core.wsi.preprocess import plan_slide, tile_tasks
from prolifscore.core.wsi.shards import completed_markers
from prolifscore.core.wsi.slide import open_slide
from prolifscore.core.wsi.tfrecord import read_records
from prolifscore.filtering.worker import BatchFilter
from prolifscore.v1 import pipeline_pb2 as pb
from tests.slides import CMU, SLIDES


def _tasks(batch_size: int = 4) -> list[pb.TileTask]:
    with open_slide(CMU) as slide:
        plan = plan_slide(slide, "cmu", pb.TilingSpec(), load(PreprocessSettings, environ={}))
    return tile_tasks(plan, "cmu", CMU, batch_size)


def test_each_slide_is_opened_once_per_worker(tmp_path):
    worker = BatchFilter(str(tmp_path), (str(SLIDES),))
    tasks = _tasks()
    results = [worker.process(t.SerializeToString()) for t in tasks]
    assert worker.opens == 1 and len(tasks) > 3
    assert all("error" not in r for r in results)
    markers = completed_markers(tmp_path, "cmu", tasks[0].spec.spec_hash, len(tasks))
    assert markers is not None
    assert sum(m["tile_count"] for m in markers) == sum(
        len(list(read_records(p))) for p in tmp_path.rglob("*.tfrecord")
    )


def test_failure_half_way_leaves_no_partial_shard(tmp_path, monkeypatch):
    task = _tasks(batch_size=16)[0]
    calls = {"n": 0}
    real = preprocess.TileSource.read  # runs in the worker's reader thread

    def flaky(self, tile):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk read error in the middle of a batch")
        return real(self, tile)

    monkeypatch.setattr(preprocess.TileSource, "read", flaky)
    worker = BatchFilter(str(tmp_path), (str(SLIDES),))
    result = worker.process(task.SerializeToString())
    assert "disk read error" in result["error"]
    assert list(tmp_path.rglob("*.tfrecord")) == [] and list(tmp_path.rglob("*.done.json")) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no temp file left either


def test_path_outside_roots_is_refused_by_the_worker_too(tmp_path):
    task = _tasks()[0]
    worker = BatchFilter(str(tmp_path), (str(tmp_path),))
    result = worker.process(task.SerializeToString())
    assert "outside the configured slide roots" in result["error"]


@pytest.mark.parametrize("kind", [pb.STAIN_NORMALIZATION_MACENKO, pb.STAIN_NORMALIZATION_REINHARD])
def test_stain_normalized_tiles_use_one_fit_per_slide(tmp_path, kind):
    with open_slide(CMU) as slide:
        plan = plan_slide(
            slide,
            "cmu",
            pb.TilingSpec(stain_normalization=kind),
            load(PreprocessSettings, environ={}),
        )
        assert plan.stain.stain_matrix or plan.stain.lab_mean
        raw = {(t.col, t.row): px for t, px, _ in preprocess.iter_kept_tiles(slide, plan)}
    assert raw  # normalized tiles come out, same shape, different pixels than the raw read
    with open_slide(CMU) as slide:
        reader = preprocess.TileSource(slide, plan.spec, pb.StainFit())
        (col, row), px = next(iter(raw.items()))
        tile = next(t for t in plan.candidates if (t.col, t.row) == (col, row))
        original = reader.read(tile)
    assert px.shape == original.shape and px.dtype == original.dtype
    assert (px != original).mean() > 0.5


def test_reader_threads_do_not_change_a_shard(tmp_path):
    """Tiles decoded by several threads still come back in grid order: the shards are the
    same bytes whatever PROLIF_FILTER_READ_THREADS is."""
    tasks = [t.SerializeToString() for t in _tasks(batch_size=16)]
    shards = {}
    for threads in (1, 3):
        out = tmp_path / str(threads)
        worker = BatchFilter(str(out), (str(SLIDES),), read_threads=threads)
        assert all("error" not in worker.process(t) for t in tasks)
        assert worker.reader._max_workers == threads
        shards[threads] = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tfrecord")}
    assert shards[1] and shards[1] == shards[3]
