"""Regions of interest: which tiles of a slide are tiled and scored.

A region is a polygon in level-0 pixels (`pb.Polygon`: an outline ring, then holes), as QuPath's
GeoJSON gives it; TUPAC16's auxiliary ROI files (`<case>-ROI.csv`, one `x,y,w,h` rectangle per
row, level-0 pixels, no header) become rectangles. A tile belongs to the regions when its centre
lies in one of them: a tile is then in or out, never split, and a region smaller than a tile still
selects the tile it sits in. "Inside" is the even-odd rule with half-open edges (left and top
inside, right and bottom outside), so abutting regions never share a tile and an `x,y,w,h`
rectangle holds exactly the centres in [x, x+w) x [y, y+h).

Requests carry the regions (Kafka JSON or protobuf), so they are validated here with limits that
keep a message and the inside test small; tile tasks carry only `roi_digest`, never the polygons.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prolifscore.v1 import pipeline_pb2 as pb

MAX_REGIONS = 256
MAX_RINGS = 64  # per region: the outline and up to 63 holes
MAX_VERTICES = 20_000  # over every ring of every region (~320 KB as protobuf)
MAX_COORDINATE = 1e7  # level-0 pixels; the largest slides are ~2e5 wide
MAX_FILE_BYTES = 16 << 20

Rings = list[np.ndarray]  # one region: [outline, *holes], each (n, 2) float64, not closed


class RoiError(ValueError):
    """Regions of interest that cannot be used (malformed, degenerate, too large)."""


def _ring(coords: Sequence[float], where: str) -> np.ndarray:
    if len(coords) % 2:
        raise RoiError(f"{where}: odd number of coordinates ({len(coords)}); expected x, y pairs")
    xy = np.asarray(coords, np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all() or np.abs(xy).max(initial=0) > MAX_COORDINATE:
        raise RoiError(f"{where}: coordinates must be finite level-0 pixels within ±1e7")
    if len(xy) > 1 and (xy[0] == xy[-1]).all():
        xy = xy[:-1]  # GeoJSON's closing vertex
    if len(np.unique(xy, axis=0)) < 3:
        raise RoiError(f"{where}: a ring needs at least 3 distinct vertices")
    x, y = xy[:, 0], xy[:, 1]
    if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) == 0:
        raise RoiError(f"{where}: the ring encloses no area")
    return xy


def validate(rois: Sequence[pb.Polygon]) -> list[Rings]:
    """The regions as arrays, checked against the limits; raises RoiError naming the culprit."""
    if len(rois) > MAX_REGIONS:
        raise RoiError(f"{len(rois)} regions of interest; at most {MAX_REGIONS}")
    vertices = sum(len(r.xy) // 2 for roi in rois for r in roi.rings)
    if vertices > MAX_VERTICES:
        raise RoiError(f"{vertices} vertices in the regions of interest; at most {MAX_VERTICES}")
    regions = []
    for i, roi in enumerate(rois):
        if not roi.rings:
            raise RoiError(f"region {i}: no ring")
        if len(roi.rings) > MAX_RINGS:
            raise RoiError(f"region {i}: {len(roi.rings)} rings; at most {MAX_RINGS}")
        regions.append([_ring(r.xy, f"region {i} ring {j}") for j, r in enumerate(roi.rings)])
    return regions


def digest(regions: Sequence[Rings]) -> str:
    """A name for a set of regions (order and closing vertices do not matter): it enters the
    spec hash, so shards of different regions never share names. "" for none."""
    if not regions:
        return ""
    canonical = sorted(json.dumps([ring.tolist() for ring in rings]) for rings in regions)
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()[:16]


def _inside_one(rings: Rings, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd test of points against one region, a horizontal scan line per distinct y: the
    edges crossing the line give sorted x intercepts, and a point is inside when an odd number
    of them lie strictly to its right. O(rows * edges + points * log edges)."""
    starts = np.concatenate(rings)
    ends = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    (x0, y0), (x1, y1) = starts.T, ends.T
    lo, hi = starts.min(axis=0), starts.max(axis=0)
    out = np.zeros(len(x), bool)
    near = np.flatnonzero((x >= lo[0]) & (x < hi[0]) & (y >= lo[1]) & (y < hi[1]))
    if not len(near):
        return out
    order = near[np.argsort(y[near], kind="stable")]
    lines, first = np.unique(y[order], return_index=True)
    for line, group in zip(lines, np.split(order, first[1:]), strict=True):
        crossing = (y0 > line) != (y1 > line)
        ex0, ey0, ex1, ey1 = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
        intercepts = np.sort(ex0 + (line - ey0) * (ex1 - ex0) / (ey1 - ey0))
        right = len(intercepts) - np.searchsorted(intercepts, x[group], side="right")
        out[group] = right % 2 == 1
    return out


def contains(regions: Sequence[Rings], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points (level-0 pixels) lie in any of the regions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    inside = np.zeros(len(x), bool)
    for rings in regions:
        inside |= _inside_one(rings, x, y)
    return inside


# ---------------------------------------------------------------------------------------------
# Files: GeoJSON (QuPath, any GIS tool writing pixel coordinates) and TUPAC16's ROI CSV


def _polygon(coordinates: Any, where: str) -> pb.Polygon:
    if not isinstance(coordinates, list) or not coordinates:
        raise RoiError(f"{where}: coordinates must be a list of rings")
    rings = []
    for j, ring in enumerate(coordinates):
        if not isinstance(ring, list):
            raise RoiError(f"{where} ring {j}: a ring is a list of [x, y] positions")
        xy: list[float] = []
        for position in ring:
            if not (
                isinstance(position, list)
                and len(position) >= 2
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in position[:2]
                )
            ):
                raise RoiError(f"{where} ring {j}: {position!r} is not an [x, y] position")
            xy += position[:2]
        rings.append(pb.Ring(xy=xy))
    return pb.Polygon(rings=rings)


def _geometries(node: Any, where: str) -> Iterable[tuple[dict, str]]:
    if isinstance(node, list):  # QuPath also writes a bare array of features
        for i, item in enumerate(node):
            yield from _geometries(item, f"{where}[{i}]")
        return
    if not isinstance(node, dict):
        raise RoiError(f"{where}: expected a GeoJSON object")
    kind = node.get("type")
    if kind == "FeatureCollection":
        yield from _geometries(node.get("features", []), f"{where}.features")
    elif kind == "Feature":
        if not isinstance(node.get("geometry"), dict):
            raise RoiError(f"{where}: a Feature without a geometry")
        yield from _geometries(node["geometry"], f"{where}.geometry")
    elif kind == "GeometryCollection":
        yield from _geometries(node.get("geometries", []), f"{where}.geometries")
    else:
        yield node, where


def from_geojson(document: Any) -> list[pb.Polygon]:
    """Polygon and MultiPolygon geometries of a GeoJSON object (FeatureCollection, Feature,
    geometry, or a list of them), coordinates in level-0 pixels. Any other geometry type is an
    error: a point or a line selects no area, and silently dropping it would hide a wrong file."""
    polygons = []
    for geometry, where in _geometries(document, "$"):
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        if kind == "Polygon":
            polygons.append(_polygon(coordinates, where))
        elif kind == "MultiPolygon":
            if not isinstance(coordinates, list):
                raise RoiError(f"{where}: MultiPolygon coordinates must be a list of polygons")
            polygons += [_polygon(c, f"{where}[{i}]") for i, c in enumerate(coordinates)]
        else:
            raise RoiError(f"{where}: a {kind} geometry; regions are Polygon or MultiPolygon")
    if not polygons:
        raise RoiError("the GeoJSON holds no Polygon or MultiPolygon")
    return polygons


def rectangle(x: float, y: float, w: float, h: float) -> pb.Polygon:
    return pb.Polygon(rings=[pb.Ring(xy=[x, y, x + w, y, x + w, y + h, x, y + h])])


def from_csv(text: str) -> list[pb.Polygon]:
    """TUPAC16's ROI files: one rectangle `x,y,w,h` (level-0 pixels) per row, no header; a
    header row and further columns are tolerated."""
    polygons = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip():
            continue
        try:
            x, y, w, h = (float(v) for v in row[:4])
        except ValueError:
            if not polygons and number == 1:
                continue  # a header
            raise RoiError(f"row {number}: {row!r} is not x,y,w,h") from None
        if not (w > 0 and h > 0 and all(map(math.isfinite, (x, y, w, h)))):
            raise RoiError(f"row {number}: width and height must be positive, got {w} x {h}")
        polygons.append(rectangle(x, y, w, h))
    if not polygons:
        raise RoiError("no rectangle (x,y,w,h) in the CSV")
    return polygons


def read_file(path: str | Path) -> list[pb.Polygon]:
    """Regions from a `.csv` (TUPAC16 rectangles) or a GeoJSON file (`.geojson`, `.json`)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise RoiError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RoiError(f"{path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".csv":
            polygons = from_csv(text)
        else:
            polygons = from_geojson(json.loads(text))
        validate(polygons)
    except json.JSONDecodeError as exc:
        raise RoiError(f"{path}: not JSON ({exc})") from exc
    except RoiError as exc:
        raise RoiError(f"{path}: {exc}") from exc
    return polygons


ROI_FILE_NAMES = ("{}-ROI.csv", "{}.geojson", "{}.json", "{}.csv")


def file_for(directory: Path, slide_id: str) -> Path | None:
    """A slide's ROI file in a folder of them: TUPAC16's `<case>-ROI.csv`, else
    `<slide>.geojson`, `<slide>.json` or `<slide>.csv`."""
    for pattern in ROI_FILE_NAMES:
        candidate = directory / pattern.format(slide_id)
        if candidate.is_file():
            return candidate
    return None
