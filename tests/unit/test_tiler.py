"""Level / scale selection, the tile grid, and the tile tasks cut from a plan."""

import pytest

from prolifscore.core.runtime.settings import PreprocessSettings, load
from prolifscore.core.wsi.geometry import resolve_geometry, target_mpp_from
from prolifscore.core.wsi.preprocess import plan_slide, tile_tasks
from prolifscore.core.wsi.slide import open_slide
from prolifscore.tiling.worker import tile_slide
from prolifscore.v1 import pipeline_pb2 as pb
from tests.slides import CMU, SLIDES


def test_20x_slide_reads_level0_without_resize():
    g = resolve_geometry((2220, 2967), [1.0], 0.499, target_mpp=0.5, tile_size=256)
    assert (g.level, g.read_size, g.footprint0, g.stride0) == (0, 256, 256, 256)
    assert not g.needs_resize
    assert (g.cols, g.rows) == (8, 11)  # partial edge tiles dropped: 2220 // 256, 2967 // 256


def test_40x_pyramid_picks_level_with_matching_downsample():
    g = resolve_geometry((40000, 30000), [1.0, 4.0, 16.0], 0.25, target_mpp=0.5, tile_size=256)
    # 2x is needed; level 1 (4x) is too coarse, so read 512 px at level 0 and shrink.
    assert (g.level, g.read_size, g.footprint0) == (0, 512, 512)
    g = resolve_geometry((40000, 30000), [1.0, 2.0, 8.0], 0.25, target_mpp=0.5, tile_size=256)
    assert (g.level, g.read_size, g.footprint0) == (1, 256, 512)
    assert not g.needs_resize


def test_nearly_matching_downsample_is_not_resized():
    g = resolve_geometry((4443, 3567), [1.0, 2.0005], 0.25, target_mpp=0.5, tile_size=256)
    assert (g.level, g.read_size) == (1, 256)


def test_missing_metadata_uses_assumed_mpp():
    g = resolve_geometry((1000, 1000), [1.0], None, target_mpp=0.5, tile_size=256, assumed_mpp=0.5)
    assert g.base_mpp_assumed and g.base_mpp == 0.5 and g.read_size == 256


def test_overlap_shrinks_stride_and_adds_tiles():
    plain = resolve_geometry((1024, 512), [1.0], 0.5, target_mpp=0.5, tile_size=256)
    over = resolve_geometry((1024, 512), [1.0], 0.5, target_mpp=0.5, tile_size=256, overlap=64)
    assert over.stride0 == 192 and over.cols == 5 and plain.cols == 4
    assert list(over.grid())[1] == (1, 0, 192, 0)


def test_slide_smaller_than_a_tile_has_empty_grid():
    g = resolve_geometry((100, 100), [1.0], 0.5, target_mpp=0.5, tile_size=256)
    assert g.tile_count == 0 and list(g.grid()) == []


def test_magnification_and_mpp_targets():
    assert target_mpp_from(20, None, 0.25) == 0.5
    assert target_mpp_from(20, 0.3, 0.25) == 0.3
    assert target_mpp_from(None, None, 0.25) == 0.25


@pytest.mark.parametrize("size,overlap", [(0, 0), (256, 256), (256, -1)])
def test_bad_spec_rejected(size, overlap):
    with pytest.raises(ValueError):
        resolve_geometry((1000, 1000), [1.0], 0.5, target_mpp=0.5, tile_size=size, overlap=overlap)


def test_tiling_cuts_the_plan_into_tile_tasks():
    """The tiling worker's tasks: the plan's candidates in grid order, in batches, each with the
    slide's labels, split, run and spec; `tile_tasks` also cuts a subset (benchmark bands)."""
    defaults = load(PreprocessSettings, environ={}, batch_size=4)
    ingest = pb.SlideIngest(
        slide_id="cmu",
        path=str(CMU),
        labels=pb.Labels(tumor_score=2),
        split=pb.SPLIT_VALIDATION,
        run_id="run-1",
    )
    outcome = tile_slide(ingest.SerializeToString(), (str(SLIDES),), defaults)
    tasks = [pb.TileTask.FromString(t) for t in outcome.tasks]
    with open_slide(CMU) as slide:
        plan = plan_slide(slide, "cmu", pb.TilingSpec(), defaults)
    assert len(plan.candidates) > 8 and not outcome.error
    assert [t for task in tasks for t in task.tiles] == plan.candidates
    assert [len(task.tiles) for task in tasks[:-1]] == [4] * (len(tasks) - 1)
    assert [task.batch_index for task in tasks] == list(range(len(tasks)))
    for task in tasks:
        assert (task.batch_count, task.candidate_tiles) == (len(tasks), len(plan.candidates))
        assert (task.slide_id, task.path, task.run_id) == ("cmu", str(CMU), "run-1")
        assert task.labels.tumor_score == 2 and task.split == pb.SPLIT_VALIDATION
        assert task.spec == plan.spec and task.stain == plan.stain
    assert pb.SlideStatus.FromString(outcome.status).batch_count == len(tasks)
    band = tile_tasks(plan, "band", CMU, 4, tiles=plan.candidates[:5])
    assert [len(task.tiles) for task in band] == [4, 1]
    assert {(task.candidate_tiles, task.batch_count) for task in band} == {(5, 2)}
    assert not band[0].HasField("labels") and band[0].split == pb.SPLIT_UNSPECIFIED
