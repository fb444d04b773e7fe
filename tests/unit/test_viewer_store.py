"""The results store: one file per scoring under a safe slide folder, read back in every layout
results exist in (per-slide, the batch scorer's flat files, the demo's result.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from google.protobuf import json_format

from prolifscore.core.results import (
    ResultStore,
    is_safe_id,
    parse_result,
    read_result_file,
    safe_id,
    tile_stride0,
)
from prolifscore.v1 import scoring_pb2 as spb


def score(slide_id: str, request_id: str, tumor: int = 2) -> spb.SlideScore:
    s = spb.SlideScore(
        request_id=request_id,
        slide_id=slide_id,
        tumor_score=tumor,
        probabilities=[0.2, 0.5, 0.3],
        mitosis_count=1,
        models=[spb.ModelVersion(name="resnet50", version=4)],
        warnings=["assumed mpp"],
    )
    s.tiles.add(col=1, row=0, x=512, y=0, probabilities=[0.1, 0.2, 0.7])
    s.mitoses.add(x=700, y=100, probability=0.8)
    s.densest_region.CopyFrom(spb.Region(x=10, y=20, width=2800, height=2800))
    return s


def test_save_writes_one_file_per_scoring_beside_its_heatmap(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    s = score("TUPAC-TR-001", "req-1")
    s.heatmap_png = b"\x89PNG fake"
    path = store.save(s)
    assert path == tmp_path / "TUPAC-TR-001" / "req-1.json"
    assert path.with_suffix(".png").read_bytes() == b"\x89PNG fake"
    stored = json.loads(path.read_text())
    assert "heatmapPng" not in stored  # the bytes live in the PNG, not the JSON
    back = store.latest("TUPAC-TR-001")
    assert back is not None and back.heatmap == path.with_suffix(".png")
    expected = spb.SlideScore()
    expected.CopyFrom(s)
    expected.heatmap_png = b""
    assert back.score == expected
    assert back.score.densest_region.width == 2800


def test_latest_is_the_newest_file_and_history_lists_all(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    old = store.save(score("a", "r-old", tumor=1))
    new = store.save(score("a", "r-new", tumor=3))
    store.save(score("b", "r-b"))
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    assert store.latest("a").score.tumor_score == 3
    assert [r.request_id for r in store.history("a")] == ["r-new", "r-old"]
    assert store.get("a", "r-old").score.tumor_score == 1
    assert store.get("a", "missing") is None
    assert sorted(store.latest_by_slide()) == ["a", "b"]
    os.utime(old, (3_000_000, 3_000_000))  # rewritten later: now the latest
    assert store.latest("a").request_id == "r-old"


def test_ids_never_become_paths(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results")
    path = store.save(score("../../etc/passwd", "../../x"))
    assert path.resolve().is_relative_to((tmp_path / "results").resolve())
    assert path.parent.parent == tmp_path / "results"
    assert all(is_safe_id(p) for p in path.relative_to(tmp_path / "results").with_suffix("").parts)
    assert store.latest("../../etc/passwd").score.slide_id == "../../etc/passwd"
    for unsafe in ("..", ".", ".hidden", "a/b", "a\\b", "x\x00y", "", "é", "a" * 200):
        out = safe_id(unsafe)
        assert is_safe_id(out) and out not in (".", "..") and "/" not in out
    assert safe_id("TUPAC-TR-001") == "TUPAC-TR-001"
    assert safe_id("a/b") != safe_id("a_b")  # distinct ids stay distinct
    assert safe_id("a/b") == safe_id("a/b")


def test_reads_the_batch_scorers_flat_files_and_skips_failures(tmp_path: Path) -> None:
    ok = spb.ScoreResult(request_id="prolif.score.requests-0-7", slide_id="s1")
    ok.score.CopyFrom(score("s1", "prolif.score.requests-0-7"))
    (tmp_path / "prolif.score.requests-0-7.json").write_text(json_format.MessageToJson(ok))
    (tmp_path / "prolif.score.requests-0-7.png").write_bytes(b"png")
    failed = spb.ScoreResult(request_id="r2", slide_id="s2")
    failed.error.code, failed.error.message = "NOT_FOUND", "gone"
    (tmp_path / "r2.json").write_text(json_format.MessageToJson(failed))
    found = ResultStore(tmp_path).latest_by_slide()
    assert list(found) == ["s1"]
    assert found["s1"].heatmap == tmp_path / "prolif.score.requests-0-7.png"
    assert found["s1"].score.tiles[0].x == 512
    # the same scoring also stored per slide (as the scorer will): listed once, per slide
    store = ResultStore(tmp_path)
    per_slide = store.save(ok.score)
    assert [r.path for r in store.history("s1")] == [per_slide]


def test_reads_the_demo_output(tmp_path: Path) -> None:
    s = score("cmu-1-small-region", "abc")
    full = json_format.MessageToDict(s)
    (tmp_path / "result.json").write_text(json.dumps(full, indent=2))
    (tmp_path / "heatmap.png").write_bytes(b"png")
    (tmp_path / "run.json").write_text(json.dumps({"timings": {}, "slides": {}}))
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "ground_truth.json").write_text("[1, 2]")
    found = ResultStore(tmp_path).latest("cmu-1-small-region")
    assert found is not None and found.heatmap == tmp_path / "heatmap.png"
    assert read_result_file(tmp_path / "result.json").score == s
    with pytest.raises(ValueError):
        read_result_file(tmp_path / "run.json")


def test_junk_and_strays_are_skipped(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.save(score("good", "r1"))
    (tmp_path / "good" / "broken.json").write_text("{not json")
    (tmp_path / "good" / "list.json").write_text("[]")
    stray = tmp_path / "other"
    stray.mkdir()
    (stray / "r9.json").write_text(json_format.MessageToJson(score("good", "r9")))
    assert [r.request_id for r in store.history("good")] == ["r1"]
    assert ResultStore(tmp_path / "missing").latest_by_slide() == {}
    with pytest.raises(ValueError):
        parse_result('{"unknownField": 1}')


def test_cache_sees_rewritten_files(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    path = store.save(score("a", "r1", tumor=1))
    assert store.latest("a").score.tumor_score == 1
    path.write_text(json_format.MessageToJson(score("a", "r1", tumor=3)))
    os.utime(path, (5_000_000, 5_000_000))
    assert store.latest("a").score.tumor_score == 3


def test_tile_stride_is_read_off_the_grid() -> None:
    s = spb.SlideScore()
    assert tile_stride0(s) is None
    s.tiles.add(col=0, row=0, x=0, y=0)
    assert tile_stride0(s) is None  # one tile at the origin cannot tell
    s.tiles.add(col=0, row=3, x=0, y=1536)
    assert tile_stride0(s) == 512
