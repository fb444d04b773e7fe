"""Scoring streams: the slide's aggregation and heatmap are built batch by batch, and what a
run keeps does not grow with the number of tiles (a whole slide has ~10,000 of them)."""

from __future__ import annotations

import gc
import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from prolifscore.core.runtime.settings import PreprocessSettings
from prolifscore.core.wsi.preprocess import plan_slide
from prolifscore.core.wsi.slide import open_slide
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from tests.slides import CMU

pytest.importorskip("tensorflow")  # the scorer's model client speaks TF Serving's protos

from prolifscore.scoring import heatmap
from prolifscore.scoring.scorer import ScoringOptions, _assemble, _SlideRun

BATCH = 32


@pytest.fixture(scope="module")
def plan():
    with open_slide(CMU) as slide:
        return plan_slide(slide, "cmu", pb.TilingSpec(), PreprocessSettings())


def _batch(rng: np.random.Generator, i: int) -> tuple[list[pb.Tile], np.ndarray, list[float]]:
    tiles = [pb.Tile(col=i, row=j, x=256 * (j % 8), y=256 * (j // 8)) for j in range(BATCH)]
    probs = rng.dirichlet((1.0, 2.0, 1.5), BATCH).astype(np.float32)
    return tiles, probs, rng.random(BATCH).tolist()


def _run(plan, request: spb.ScoreRequest, batches: int, seed: int = 0) -> _SlideRun:
    rng = np.random.default_rng(seed)
    run = _SlideRun(request, "cmu", plan, ScoringOptions(), 0.0)
    for i in range(batches):
        run.add(*_batch(rng, i))
    return run


def _retained(plan, request: spb.ScoreRequest, batches: int) -> int:
    """Bytes still allocated by a run after `batches` batches went through it."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run = _run(plan, request, batches)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert run.count == batches * BATCH
    return held


def test_aggregation_state_does_not_grow_with_the_tiles(plan):
    """Without the per-tile list, 100x the tiles leaves the run's memory where it was (the
    heatmap canvas is the thumbnail's size, the sums are a few numbers); with it, it grows."""
    streamed = spb.ScoreRequest(path="x", skip_mitosis=True, include_heatmap=True)
    small, large = _retained(plan, streamed, 3), _retained(plan, streamed, 300)
    assert large - small < 64 * 1024, (small, large)
    listed = spb.ScoreRequest(path="x", skip_mitosis=True, include_tiles=True)
    assert _retained(plan, listed, 300) - _retained(plan, listed, 3) > 300 * BATCH * 100


@pytest.mark.parametrize(
    "rule", [spb.SCORE_RULE_ARGMAX, spb.SCORE_RULE_ROUNDED_MEAN, spb.SCORE_RULE_UNSPECIFIED]
)
def test_streamed_aggregation_equals_the_whole_slide_arrays(plan, rule):
    from prolifscore.core.grading.evaluation import slide_decision

    request = spb.ScoreRequest(path="x", skip_mitosis=True, include_tiles=True, score_rule=rule)
    run = _run(plan, request, 40, seed=3)
    result = _assemble(run)
    rng = np.random.default_rng(3)
    probs = np.concatenate([_batch(rng, i)[1] for i in range(40)])
    mean = probs.astype(np.float64).mean(axis=0)
    assert np.allclose(result.probabilities, mean / mean.sum(), atol=1e-9)
    expected = slide_decision(mean / mean.sum(), probs.argmax(axis=1) + 1, rule)
    assert (result.tumor_score, result.score_rule) == expected[:2]
    assert result.tiles_scored == len(result.tiles) == 40 * BATCH
    assert np.allclose([t.probabilities for t in result.tiles], probs)


def test_heatmap_canvas_draws_every_class_and_shows_the_predicted_one():
    thumbnail = np.full((100, 100, 3), 255, np.uint8)
    tiles = [pb.Tile(x=0, y=0), pb.Tile(x=400, y=400), pb.Tile(x=500, y=400)]  # 2 overlap
    values = [(0.9, 0.1, 0.0), (0.2, 0.7, 0.1), (0.0, 0.3, 0.7)]
    canvas = heatmap.Canvas(thumbnail, 10.0, 200, 3)
    for tile, v in zip(tiles, values, strict=True):
        canvas.add(tile, v)
    for k in range(3):
        pairs = [(t, v[k]) for t, v in zip(tiles, values, strict=True)]
        whole = heatmap.render(thumbnail, 10.0, pairs, 200)
        assert canvas.png(k) == whole
    red = np.asarray(Image.open(io.BytesIO(canvas.png(0))).convert("RGB")).astype(int)[80, 80]
    blue = np.asarray(Image.open(io.BytesIO(canvas.png(2))).convert("RGB")).astype(int)[80, 80]
    assert red[0] > red[2] + 60 and blue[2] > blue[0] + 60


def test_a_region_heatmap_is_the_window_of_the_whole_slide_heatmap():
    """With regions of interest the map covers their window only (`CoverageMap.offset`): the
    heatmap drawn on it is the same picture as the whole slide's, cut to that window."""
    rng = np.random.default_rng(3)
    thumbnail = rng.integers(0, 256, (1600, 1700, 3), np.uint8)
    tiles = [pb.Tile(x=4000, y=3000), pb.Tile(x=4200, y=3400), pb.Tile(x=4700, y=3100)]
    values = [(0.9, 0.1), (0.4, 0.6), (0.1, 0.9)]
    mitoses = [(4100.0, 3100.0), (4800.0, 3300.0)]
    (ox, oy), (w, h) = (300, 250), (800, 780)  # >= MIN_SIDE: no zoom on either canvas
    whole = heatmap.Canvas(thumbnail, 10.0, 200, 2)
    part = heatmap.Canvas(thumbnail[oy : oy + h, ox : ox + w], 10.0, 200, 2, offset=(ox, oy))
    for tile, v in zip(tiles, values, strict=True):
        whole.add(tile, v)
        part.add(tile, v)
    for k in range(2):
        big = np.asarray(Image.open(io.BytesIO(whole.png(k, mitoses))))
        small = np.asarray(Image.open(io.BytesIO(part.png(k, mitoses))))
        assert part.zoom == whole.zoom == 1
        np.testing.assert_array_equal(small, big[oy : oy + h, ox : ox + w])
