"""Regions of interest through planning, tiling, shards and scoring on a real slide (CMU): only
tiles centred in a region become candidates, tile tasks and shards hold only those, each set of
regions has its own spec hash (its shards never overwrite another set's), and scoring scores
only those tiles. Requests carry them as protobuf or as the JSON a Kafka tool sends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prolifscore.core.runtime.codec import decode
from prolifscore.core.runtime.settings import PreprocessSettings, load
from prolifscore.core.wsi import roi
from prolifscore.core.wsi.preprocess import SlidePlan, iter_kept_tiles, plan_slide, tile_tasks
from prolifscore.core.wsi.shards import completed_markers
from prolifscore.core.wsi.slide import open_slide
from prolifscore.core.wsi.tfrecord import parse_tile_example, read_records
from prolifscore.filtering.worker import BatchFilter
from prolifscore.scoring.scorer import InvalidRequest, ScoringOptions, score_slide
from prolifscore.tiling.worker import tile_slide
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from tests.slides import CMU, SLIDES, TCGA

DEFAULTS = load(PreprocessSettings, environ={}, batch_size=4)
# CMU's grid: 256 px tiles (level-0 footprint 256), tissue in columns 2-6 of rows 2-10. This
# rectangle holds the centres of columns 4-5, rows 2-6.
BAND = roi.rectangle(1024, 512, 512, 1280)
# A concave L over the bottom rows: columns 2-6 of rows 9-10, plus column 2-3 of rows 7-8.
ELL = pb.Polygon(
    rings=[pb.Ring(xy=[512, 1792, 1024, 1792, 1024, 2304, 1792, 2304, 1792, 2816, 512, 2816])]
)


def _plan(*rois: pb.Polygon, spec: pb.TilingSpec | None = None) -> SlidePlan:
    with open_slide(CMU) as slide:
        return plan_slide(slide, "cmu", spec or pb.TilingSpec(), DEFAULTS, rois)


def _centre_in(tile: pb.Tile, x0: float, y0: float, x1: float, y1: float) -> bool:
    return x0 <= tile.x + 128 < x1 and y0 <= tile.y + 128 < y1


def test_planning_keeps_only_tiles_centred_in_the_regions():
    full, band, ell = _plan(), _plan(BAND), _plan(ELL)
    expected = [t for t in full.candidates if _centre_in(t, 1024, 512, 1536, 1792)]
    assert band.candidates == expected and len(expected) == 9
    # the tissue map covers the region's tiles, not the slide (a 50k slide's map is large)
    assert band.coverage.fraction.size < full.coverage.fraction.size / 4
    # the concave region: the L's two arms, not the notch between them
    in_ell = [
        t
        for t in full.candidates
        if _centre_in(t, 512, 2304, 1792, 2816) or _centre_in(t, 512, 1792, 1024, 2304)
    ]
    assert ell.candidates == in_ell and {(t.col, t.row) for t in in_ell} >= {(2, 10), (3, 8)}
    assert not any(_centre_in(t, 1024, 1792, 1792, 2304) for t in ell.candidates)
    both = _plan(BAND, ELL)
    assert both.candidates == [t for t in full.candidates if t in expected or t in in_ell]


def test_regions_name_their_own_spec():
    full, band, ell = _plan(), _plan(BAND), _plan(ELL)
    assert full.spec.roi_digest == "" and band.spec.roi_digest and ell.spec.roi_digest
    hashes = {
        full.spec.spec_hash,
        band.spec.spec_hash,
        ell.spec.spec_hash,
        _plan(BAND, ELL).spec.spec_hash,
    }
    assert len(hashes) == 4
    assert _plan(ELL, BAND).spec.spec_hash == _plan(BAND, ELL).spec.spec_hash
    # the whole slide as a region: the same tiles as none, under another name
    everything = _plan(roi.rectangle(0, 0, 2220, 2967))
    assert everything.candidates == full.candidates
    assert everything.spec.spec_hash != full.spec.spec_hash


def test_regions_apply_before_the_seed_mode_and_the_tile_cap():
    seed = _plan(BAND, spec=pb.TilingSpec(tissue_mode=pb.TISSUE_MODE_SEED))
    assert [(t.col, t.row) for t in seed.candidates] == [
        (c, r) for r in range(2, 7) for c in (4, 5)
    ]
    capped = _plan(BAND, spec=pb.TilingSpec(max_tiles=3))
    assert len(capped.candidates) == 3 and set(map(str, capped.candidates)) <= set(
        map(str, _plan(BAND).candidates)
    )


def test_a_region_without_a_tile_centre_plans_nothing_and_says_so():
    tiny = _plan(roi.rectangle(0, 0, 100, 100))
    assert tiny.candidates == []
    assert any("no tile of the slide's grid" in w for w in tiny.warnings)
    with pytest.raises(ValueError, match="regions of interest: region 0 ring 0: odd number"):
        _plan(pb.Polygon(rings=[pb.Ring(xy=[1, 2, 3])]))


def test_tiling_publishes_tasks_of_the_region_tiles_only():
    ingest = pb.SlideIngest(slide_id="cmu", path=str(CMU), rois=[BAND])
    outcome = tile_slide(ingest.SerializeToString(), (str(SLIDES),), DEFAULTS)
    tasks = [pb.TileTask.FromString(t) for t in outcome.tasks]
    assert not outcome.error and outcome.candidates == 9 and len(tasks) == 3
    assert [t for task in tasks for t in task.tiles] == _plan(BAND).candidates
    assert {task.spec.spec_hash for task in tasks} == {_plan(BAND).spec.spec_hash}
    assert all(task.candidate_tiles == 9 for task in tasks)
    bad = pb.SlideIngest(slide_id="cmu", path=str(CMU), rois=[pb.Polygon()])
    failed = tile_slide(bad.SerializeToString(), (str(SLIDES),), DEFAULTS)
    assert failed.error == "regions of interest: region 0: no ring" and not failed.tasks


def test_shards_of_different_regions_live_side_by_side(tmp_path):
    worker = BatchFilter(str(tmp_path), (str(SLIDES),))
    runs = {}
    for name, plan in {"full": _plan(), "band": _plan(BAND), "ell": _plan(ELL)}.items():
        tasks = tile_tasks(plan, "cmu", CMU, DEFAULTS.batch_size)
        assert all("error" not in worker.process(t.SerializeToString()) for t in tasks)
        runs[name] = (plan, len(tasks))
    for _name, (plan, count) in runs.items():
        markers = completed_markers(tmp_path, "cmu", plan.spec.spec_hash, count)
        assert markers is not None, "another region's run replaced this one's shards"
        stored = {
            (int(ex["col"]), int(ex["row"]))
            for path in sorted(tmp_path.rglob(f"cmu-{plan.spec.spec_hash}-*.tfrecord"))
            for ex in map(parse_tile_example, read_records(path))
        }
        with open_slide(CMU) as slide:
            kept = {(t.col, t.row) for t, _, _ in iter_kept_tiles(slide, plan)}
        assert stored == kept and sum(m["tile_count"] for m in markers) == len(kept) > 0
    assert len(list(tmp_path.rglob("*.tfrecord"))) == sum(
        len(list(tmp_path.rglob(f"cmu-{p.spec.spec_hash}-*.tfrecord"))) for p, _ in runs.values()
    )


def test_kafka_json_producers_send_regions_as_plain_numbers():
    """The protobuf JSON mapping a Kafka tool publishes (content-type: application/json)."""
    body = {
        "slideId": "cmu",
        "path": str(CMU),
        "rois": [
            {"rings": [{"xy": [1024, 512, 1536, 512, 1536, 1792, 1024, 1792]}]},
            {"rings": [{"xy": list(ELL.rings[0].xy)}]},
        ],
    }
    headers = [("content-type", b"application/json")]
    msg = decode(json.dumps(body).encode(), headers, pb.SlideIngest)
    assert list(msg.rois) == [BAND, ELL]
    request = decode(
        json.dumps({"path": str(CMU), "rois": body["rois"][:1]}).encode(),
        headers,
        spb.ScoreRequest,
    )
    assert list(request.rois) == [BAND]


class _ConstantModels:
    """The served models as the scorer calls them: class probabilities per tile."""

    def predict(
        self,
        model: str,
        tiles: np.ndarray,
        output: str,
        timeout: float | None = None,
        label: str = "",
    ):
        return np.tile(np.float32([0.1, 0.3, 0.6]), (len(tiles), 1)), 1

    def close(self) -> None:
        pass


def _score(*rois: pb.Polygon, path: Path = CMU) -> spb.SlideScore:
    request = spb.ScoreRequest(path=str(path), rois=rois, include_tiles=True, skip_mitosis=True)
    options = ScoringOptions(preprocess=DEFAULTS, pipelined=False)
    return score_slide(
        request, slide_roots=(str(SLIDES),), options=options, models=_ConstantModels()
    )


def test_scoring_scores_only_the_tiles_in_the_regions():
    whole, band = _score(), _score(BAND)
    with open_slide(CMU) as slide:
        kept = [(t.col, t.row) for t, _, _ in iter_kept_tiles(slide, _plan(BAND))]
    assert [(t.col, t.row) for t in band.tiles] == kept and band.tiles_scored == len(kept) > 0
    assert all(_centre_in(t, 1024, 512, 1536, 1792) for t in band.tiles)
    assert whole.tiles_scored > band.tiles_scored
    assert band.spec_hash == _plan(BAND).spec.spec_hash != whole.spec_hash
    assert band.tumor_score == 3
    empty = _score(roi.rectangle(0, 0, 100, 100))
    assert empty.tiles_scored == 0 and empty.tumor_score == 0
    assert any("no tile of the slide's grid" in w for w in empty.warnings)
    with pytest.raises(InvalidRequest, match="regions of interest"):
        _score(roi.rectangle(0, 0, 1, 1), pb.Polygon(rings=[pb.Ring(xy=[0, 0, 1, 1, 2, 2])]))


def test_ingest_cli_takes_one_file_or_a_folder_of_tupac_roi_files(tmp_path):
    from prolifscore.cli.ingest import build_messages

    folder = tmp_path / "rois"
    folder.mkdir()
    (folder / f"{CMU.stem}-ROI.csv").write_text("1024,512,512,1280\n")
    msgs = build_messages([CMU, TCGA], "run", roi_path=folder)
    assert [list(m.rois) for m in msgs] == [[BAND], []]
    single = tmp_path / "cmu.geojson"
    single.write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9]]]}))
    (msg,) = build_messages([CMU], "run", roi_path=single)
    assert list(msg.rois[0].rings[0].xy) == [0, 0, 9, 0, 9, 9]
    with pytest.raises(roi.RoiError, match="one file for 2 slides"):
        build_messages([CMU, TCGA], "run", roi_path=single)


def test_score_cli_sends_the_regions_of_its_file(tmp_path, capsys):
    from prolifscore.cli.main import main
    from prolifscore.cli.score import build_request

    region = tmp_path / "band.csv"
    region.write_text("1024,512,512,1280\n")
    assert list(build_request(str(CMU), roi_file=region).rois) == [BAND]
    assert not build_request(str(CMU)).rois
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,-3,4\n")
    # refused before any connection is made (no server listens on port 9)
    assert main(["score", str(CMU), "--server", "127.0.0.1:9", "--roi", str(bad)]) == 2
    assert "regions of interest: " in capsys.readouterr().err


def test_grpc_scoring_service_scores_and_stores_only_the_region(tmp_path):
    pytest.importorskip("tensorflow")  # the service's model client speaks TF Serving's protos
    import grpc

    from prolifscore.core.results import ResultStore
    from prolifscore.core.runtime.settings import RuntimeSettings
    from prolifscore.scoring.config import ScoringSettings
    from prolifscore.scoring.server import build
    from prolifscore.v1 import scoring_pb2_grpc

    runtime_settings = load(
        RuntimeSettings, environ={}, slide_roots=(SLIDES,), results_root=tmp_path
    )
    settings = load(ScoringSettings, environ={}, runtime=runtime_settings, port=0, ray_readers=0)
    runtime, _ = build(settings, _ConstantModels())
    runtime.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            request = spb.ScoreRequest(path=str(CMU), rois=[BAND], skip_mitosis=True)
            result = stub.ScoreSlide(request, timeout=60)
            with pytest.raises(grpc.RpcError) as err:
                stub.ScoreSlide(spb.ScoreRequest(path=str(CMU), rois=[pb.Polygon()]), timeout=60)
    finally:
        runtime.stop()
    assert result.tiles_scored == _score(BAND).tiles_scored and result.spec_hash
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regions of interest" in err.value.details()
    (stored,) = ResultStore(tmp_path).history(result.slide_id)
    assert [(t.col, t.row) for t in stored.score.tiles] == [
        (t.col, t.row) for t in _score(BAND).tiles
    ]
