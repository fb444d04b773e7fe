"""Regions of interest: GeoJSON and TUPAC16 CSV in, validation and its limits, the inside test
(half-open edges, concave outlines, holes, several regions) against a plain reference."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from prolifscore.core.wsi import roi
from prolifscore.v1 import pipeline_pb2 as pb


def _poly(*rings: list[tuple[float, float]]) -> pb.Polygon:
    return pb.Polygon(rings=[pb.Ring(xy=[c for p in r for c in p]) for r in rings])


def _inside(polygons: list[pb.Polygon], points: list[tuple[float, float]]) -> list[bool]:
    xy = np.asarray(points, np.float64)
    return roi.contains(roi.validate(polygons), xy[:, 0], xy[:, 1]).tolist()


def _reference(polygons: list[pb.Polygon], x: float, y: float) -> bool:
    """Crossing number, one point at a time, same half-open convention: the test's oracle."""
    for polygon in polygons:
        crossings = 0
        for ring in polygon.rings:
            pts = list(zip(ring.xy[0::2], ring.xy[1::2], strict=True))
            for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
                if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
                    crossings += 1
        if crossings % 2:
            return True
    return False


SQUARE = [(0, 0), (10, 0), (10, 10), (0, 10)]
# A U: the notch x in [4, 6), y in [0, 8) is outside
U_SHAPE = [(0, 0), (4, 0), (4, 8), (6, 8), (6, 0), (10, 0), (10, 10), (0, 10)]


def test_a_square_holds_its_left_and_top_edges_not_its_right_and_bottom():
    points = [(0, 5), (5, 0), (9.999, 9.999), (10, 5), (5, 10), (-0.001, 5), (5, 5)]
    assert _inside([_poly(SQUARE)], points) == [True, True, True, False, False, False, True]


def test_concave_outline():
    points = [(2, 2), (5, 2), (5, 7.9), (5, 8), (8, 2), (5, 9)]
    assert _inside([_poly(U_SHAPE)], points) == [True, False, False, True, True, True]


def test_holes_are_outside_and_the_ring_around_them_inside():
    with_hole = _poly(SQUARE, [(3, 3), (7, 3), (7, 7), (3, 7)])
    points = [(1, 1), (5, 5), (3, 5), (7, 5), (8, 8)]
    assert _inside([with_hole], points) == [True, False, False, True, True]


def test_several_regions_are_a_union_even_where_they_overlap():
    a = _poly(SQUARE)
    b = _poly([(5, 5), (15, 5), (15, 15), (5, 15)])  # overlaps a in [5, 10) x [5, 10)
    points = [(2, 2), (7, 7), (12, 12), (12, 2)]
    assert _inside([a, b], points) == [True, True, True, False]


def test_abutting_rectangles_share_no_grid_centre():
    left, right = roi.rectangle(0, 0, 512, 1024), roi.rectangle(512, 0, 512, 1024)
    cols, rows = np.meshgrid(np.arange(8), np.arange(8))
    xs, ys = cols.ravel() * 128.0 + 64, rows.ravel() * 128.0 + 64
    a = roi.contains(roi.validate([left]), xs, ys)
    b = roi.contains(roi.validate([right]), xs, ys)
    assert not (a & b).any() and (a | b).all() and a.sum() == b.sum() == 32
    edges = np.array([0.0, 511.5, 512.0, 1023.9, 1024.0])  # centres on the shared edge go right
    assert roi.contains(roi.validate([left]), edges, np.full(5, 10.0)).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_scan_line_test_agrees_with_the_reference_on_random_star_polygons():
    rng = random.Random(7)
    for _ in range(20):
        polygons = []
        for _ in range(rng.randint(1, 3)):
            cx, cy, n = rng.uniform(200, 800), rng.uniform(200, 800), rng.randint(3, 40)
            angles = sorted(rng.uniform(0, 2 * np.pi) for _ in range(n))
            radii = [rng.uniform(20, 300) for _ in range(n)]
            outline = [
                (cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)
            ]
            polygons.append(_poly(outline))
        grid = [(x + 0.5, y + 0.5) for x in range(0, 1000, 37) for y in range(0, 1000, 23)]
        try:
            got = _inside(polygons, grid)
        except roi.RoiError:  # a degenerate random outline (all points collinear): skip it
            continue
        assert got == [_reference(polygons, x, y) for x, y in grid]


def test_digest_names_the_set_of_regions():
    a, b = _poly(SQUARE), _poly(U_SHAPE)
    closed = _poly([*SQUARE, SQUARE[0]])  # GeoJSON's closing vertex
    assert roi.digest([]) == ""
    d = roi.digest(roi.validate([a, b]))
    assert d == roi.digest(roi.validate([b, a])) == roi.digest(roi.validate([closed, b]))
    assert d != roi.digest(roi.validate([a])) != roi.digest(roi.validate([b]))
    moved = _poly([(x + 1, y) for x, y in SQUARE])
    assert roi.digest(roi.validate([moved, b])) != d


@pytest.mark.parametrize(
    "polygons,message",
    [
        ([pb.Polygon()], "no ring"),
        ([pb.Polygon(rings=[pb.Ring(xy=[0, 0, 1, 1, 2])])], "odd number of coordinates"),
        ([_poly([(0, 0), (1, 1), (0, 0)])], "at least 3 distinct vertices"),
        ([_poly([(0, 0), (1, 1), (2, 2), (3, 3)])], "encloses no area"),
        ([_poly([(0, 0), (float("nan"), 1), (2, 0)])], "finite"),
        ([_poly([(0, 0), (1e9, 1), (2, 0)])], "finite level-0 pixels"),
        ([roi.rectangle(0, 0, 1, 1)] * (roi.MAX_REGIONS + 1), "at most 256"),
        ([_poly(*[SQUARE] * (roi.MAX_RINGS + 1))], "65 rings"),
        (
            [_poly([(i, (i % 2) * 5) for i in range(roi.MAX_VERTICES + 1)])],
            "20001 vertices",
        ),
    ],
)
def test_validation_names_what_is_wrong(polygons, message):
    with pytest.raises(roi.RoiError, match=message):
        roi.validate(polygons)


def _feature(geometry: dict) -> dict:
    return {
        "type": "Feature",
        "properties": {"classification": {"name": "Tumor"}},
        "geometry": geometry,
    }


def test_geojson_polygons_and_multipolygons_in_every_wrapping():
    square = [[list(p) for p in [*SQUARE, SQUARE[0]]]]
    hole = [[3, 3], [7, 3], [7, 7], [3, 7], [3, 3]]
    multi = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[40, 40], [50, 40], [50, 50], [40, 50], [40, 40]]],
            [[[20, 0, 5], [30, 0, 5], [30, 10, 5]]],
        ],
    }
    collection = {
        "type": "FeatureCollection",
        "features": [
            _feature({"type": "Polygon", "coordinates": [*square, hole]}),
            _feature(multi),
        ],
    }
    polygons = roi.from_geojson(collection)
    assert [len(p.rings) for p in polygons] == [2, 1, 1]
    assert list(polygons[2].rings[0].xy) == [20, 0, 30, 0, 30, 10]  # altitude dropped
    inside = _inside(polygons, [(5, 5), (1, 1), (28, 2), (15, 5), (45, 45)])
    assert inside == [False, True, True, False, True]
    # the same regions as a bare array of features (QuPath), a Feature, a bare geometry
    assert roi.from_geojson(collection["features"]) == polygons
    assert roi.from_geojson(_feature(multi)) == polygons[1:]
    assert roi.from_geojson(multi) == polygons[1:]


@pytest.mark.parametrize(
    "document,message",
    [
        ({"type": "Point", "coordinates": [1, 2]}, "a Point geometry"),
        (_feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}), "LineString"),
        ({"type": "Feature", "geometry": None}, "without a geometry"),
        ({"type": "FeatureCollection", "features": []}, "no Polygon"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [2, 2]]]}, "not an \\[x, y\\]"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, True], [2, 2]]]}, "not an \\[x, y\\]"),
        ({"type": "Polygon", "coordinates": []}, "list of rings"),
        ("Polygon", "expected a GeoJSON object"),
    ],
)
def test_geojson_that_is_not_regions_is_refused(document, message):
    with pytest.raises(roi.RoiError, match=message):
        roi.from_geojson(document)


def test_tupac_csv_rectangles():
    """TUPAC16's `<case>-ROI.csv`: x,y,w,h per row in level-0 pixels, no header."""
    polygons = roi.from_csv("31000,12000,3000,2500\n\n40000,9000,3000,2500\n")
    assert [list(p.rings[0].xy) for p in polygons] == [
        [31000, 12000, 34000, 12000, 34000, 14500, 31000, 14500],
        [40000, 9000, 43000, 9000, 43000, 11500, 40000, 11500],
    ]
    assert _inside(polygons, [(31000, 12000), (33999, 14499), (34000, 13000)]) == [
        True,
        True,
        False,
    ]
    assert roi.from_csv("x,y,w,h\n1,2,3,4,extra\n") == [roi.rectangle(1, 2, 3, 4)]
    with pytest.raises(roi.RoiError, match="row 2"):
        roi.from_csv("1,2,3,4\n5,6,seven,8\n")
    with pytest.raises(roi.RoiError, match="positive"):
        roi.from_csv("1,2,0,4\n")
    with pytest.raises(roi.RoiError, match="no rectangle"):
        roi.from_csv("x,y,w,h\n")


def test_files_by_suffix_and_per_slide_names(tmp_path):
    (tmp_path / "TUPAC-TR-001-ROI.csv").write_text("10,20,300,400\n")
    (tmp_path / "slide-b.geojson").write_text(
        json.dumps({"type": "Polygon", "coordinates": [[list(p) for p in SQUARE]]})
    )
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    assert roi.file_for(tmp_path, "TUPAC-TR-001") == tmp_path / "TUPAC-TR-001-ROI.csv"
    assert roi.file_for(tmp_path, "slide-b") == tmp_path / "slide-b.geojson"
    assert roi.file_for(tmp_path, "slide-c") is None
    assert roi.read_file(tmp_path / "TUPAC-TR-001-ROI.csv") == [roi.rectangle(10, 20, 300, 400)]
    assert roi.read_file(tmp_path / "slide-b.geojson") == [_poly(SQUARE)]
    with pytest.raises(roi.RoiError, match=r"bad\.json: not JSON"):
        roi.read_file(tmp_path / "bad.json")
    with pytest.raises(roi.RoiError, match=r"points\.geojson: .*Point"):
        roi.read_file(tmp_path / "points.geojson")
    with pytest.raises(roi.RoiError, match=r"missing\.csv"):
        roi.read_file(tmp_path / "missing.csv")
