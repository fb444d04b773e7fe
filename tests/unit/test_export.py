"""Results that travel: QuPath GeoJSON (the format's rules and the properties QuPath reads) and
the predictions CSV, read back by `prolifscore evaluate`'s own reader; `prolifscore export`."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import pytest
from google.protobuf import json_format

from prolifscore.cli.main import main as cli_main
from prolifscore.core.grading.submission import evaluate_predictions
from prolifscore.core.results import ResultStore, predictions_csv, to_geojson
from prolifscore.v1 import scoring_pb2 as spb

SIDE = 512


def result(slide_id: str = "TUPAC-TR-001", tumor: int = 2) -> spb.SlideScore:
    s = spb.SlideScore(request_id=f"req-{slide_id}", slide_id=slide_id, tumor_score=tumor)
    s.probabilities.extend([0.2, 0.5, 0.3])
    for col, row, probs in ((3, 4, [0.1, 0.3, 0.6]), (4, 4, [0.7, 0.2, 0.1])):
        s.tiles.add(
            col=col, row=row, x=col * SIDE, y=row * SIDE, probabilities=probs,
            mitosis_max=0.8, mitoses=1,
        )  # fmt: skip
    s.mitoses.add(x=1700, y=2100, probability=0.93)
    s.mitoses.add(x=2200, y=2300, probability=0.51)
    s.mitoses_per_10hpf = 2
    s.densest_region.CopyFrom(spb.Region(x=1600, y=2000, width=2800, height=2800))
    return s


def shoelace(ring: list[list[float]]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring)) / 2


def check_qupath_feature(f: dict) -> None:
    assert f["type"] == "Feature"
    uuid.UUID(f["id"])  # QuPath 0.4+ reads a UUID id
    props = f["properties"]
    assert props["objectType"] in {"detection", "tile", "annotation"}
    cls = props["classification"]
    assert isinstance(cls["name"], str) and cls["name"]
    assert len(cls["color"]) == 3 and all(
        isinstance(c, int) and 0 <= c <= 255 for c in cls["color"]
    )
    measurements = props["measurements"]  # QuPath 0.4+: a name -> number map
    assert isinstance(measurements, dict)
    assert all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in measurements.items())


def test_geojson_follows_the_format_and_qupaths_conventions() -> None:
    s = result()
    collection = json.loads(json.dumps(to_geojson(s, SIDE)))  # plain JSON, round-trips
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len({f["id"] for f in features}) == len(features)
    for f in features:
        check_qupath_feature(f)
        geometry = f["geometry"]
        if geometry["type"] == "Polygon":
            for ring in geometry["coordinates"]:
                assert len(ring) >= 4 and ring[0] == ring[-1]  # a closed linear ring
                assert shoelace(ring) > 0  # RFC 7946 right-hand rule (x right, y up)
    points = [f for f in features if f["geometry"]["type"] == "Point"]
    assert [p["geometry"]["coordinates"] for p in points] == [[1700, 2100], [2200, 2300]]
    assert {p["properties"]["objectType"] for p in points} == {"detection"}
    assert points[0]["properties"]["classification"]["name"] == "Mitosis"
    assert points[0]["properties"]["measurements"]["Confidence"] == pytest.approx(0.93, abs=1e-6)
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == 2
    first = tiles[0]
    # level-0 pixels: the tile's own x, y and side, as QuPath's full-resolution image
    xs = [p[0] for p in first["geometry"]["coordinates"][0]]
    ys = [p[1] for p in first["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (3 * SIDE, 4 * SIDE, 4 * SIDE, 5 * SIDE)
    m = first["properties"]["measurements"]
    assert [m[f"P(tumor score {k})"] for k in (1, 2, 3)] == pytest.approx([0.1, 0.3, 0.6])
    assert m["Mitoses"] == 1 and first["properties"]["classification"]["name"] == "Tumor score 3"
    assert tiles[1]["properties"]["classification"]["name"] == "Tumor score 1"
    (region,) = [f for f in features if f["properties"]["objectType"] == "annotation"]
    assert region["geometry"]["coordinates"][0][0] == [1600, 2000]
    assert region["geometry"]["coordinates"][0][2] == [4400, 4800]
    assert to_geojson(s, SIDE) == to_geojson(s, SIDE)  # stable ids: same export, same file


def test_tiles_are_left_out_when_their_side_is_unknown() -> None:
    kinds = {f["properties"]["objectType"] for f in to_geojson(result(), None)["features"]}
    assert kinds == {"detection", "annotation"}


def test_csv_reads_back_with_evaluate(tmp_path: Path) -> None:
    scores = [result("TUPAC-TR-001", 1), result("TUPAC-TR-002", 3), result("TUPAC-TR-003", 0)]
    predictions = tmp_path / "predictions.csv"
    predictions.write_text(predictions_csv(scores))
    assert predictions.read_text().splitlines()[0] == "slide_id,tumor_score"
    truth = tmp_path / "truth.csv"  # TUPAC style: no header, row i = slide i
    truth.write_text("1,0.1\n2,0.5\n3,0.9\n")
    report = evaluate_predictions(predictions, truth)
    assert report["slides"] == 3
    assert report["task1_slides"] == 2  # TUPAC-TR-003 had no score: unknown, not a miss
    assert report["accuracy"] == 0.5  # 001 right (1), 002 wrong (3 for 2)
    assert report["missing"] == [] and report["unmatched"] == []


def test_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ResultStore(tmp_path / "results")
    store.save(result("TUPAC-TR-001", 1))
    store.save(result("TUPAC-TR-002", 2))
    out = tmp_path / "one.geojson"
    argv = ["export", "--results", str(tmp_path / "results"), "--slide", "TUPAC-TR-002"]
    assert cli_main([*argv, "--geojson", str(out)]) == 0
    assert len(json.loads(out.read_text())["features"]) == 2 + 2 + 1  # tile side from the grid
    csv_path = tmp_path / "all.csv"
    assert cli_main(["export", "--results", str(tmp_path / "results"), "--csv", str(csv_path)]) == 0
    assert csv_path.read_text() == "slide_id,tumor_score\nTUPAC-TR-001,1\nTUPAC-TR-002,2\n"
    # GeoJSON is per slide: a root of two slides needs --slide
    assert cli_main(["export", "--results", str(tmp_path / "results"), "--geojson", str(out)]) == 2
    assert "--slide" in capsys.readouterr().err
    # the demo's result.json, with a tile side given where the tiles cannot tell it
    demo = tmp_path / "demo"
    demo.mkdir()
    lone = result("cmu-1-small-region", 3)
    del lone.tiles[1:]
    lone.tiles[0].col = lone.tiles[0].row = lone.tiles[0].x = lone.tiles[0].y = 0
    (demo / "result.json").write_text(json.dumps(json_format.MessageToDict(lone), indent=2))
    argv = ["export", "--result", str(demo / "result.json"), "--geojson", str(out)]
    assert cli_main(argv) == 0
    assert "tiles left out" in capsys.readouterr().err
    assert cli_main([*argv, "--tile-side", "512"]) == 0
    ring = [
        f for f in json.loads(out.read_text())["features"] if f["geometry"]["type"] == "Polygon"
    ]
    assert ring[0]["geometry"]["coordinates"][0][2] == [512, 512]
    assert cli_main(["export", "--results", str(tmp_path / "none"), "--csv", str(csv_path)]) == 1
