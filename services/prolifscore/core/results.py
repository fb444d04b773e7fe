"""Scored results on disk, and the forms they travel in (QuPath GeoJSON, predictions CSV).

Layout: one file per scoring, `<results_root>/<safe slide id>/<safe request id>.json` (the
`SlideScore` in protobuf's JSON mapping) with the heatmap PNG beside it (same name, `.png`).
File names come only from `safe_id`, never from a path in a request or a result. Read back too:
the batch scorer's flat `<results_root>/<request id>.json` (a `ScoreResult`) and the demo's
`result.json` (a `SlideScore`, its `heatmap.png` beside it), so that nothing scored before this
layout existed is lost to the viewer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from prolifscore.core.wsi.tfrecord import write_atomic
from prolifscore.v1 import scoring_pb2 as spb

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
DEMO_RESULT = "result.json"
DEMO_HEATMAP = "heatmap.png"


def is_safe_id(text: str) -> bool:
    """A name that is one file name everywhere: letters, digits, `.`, `_`, `-`, not starting
    with a dot (so never `.` or `..`), at most 100 characters."""
    return bool(_SAFE.fullmatch(text))


def safe_id(text: str) -> str:
    """`text` itself when it is safe, else a deterministic safe form (unsafe runs become `_`,
    plus a hash of the original, so that two ids never share a file)."""
    if is_safe_id(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    stem = _UNSAFE_CHARS.sub("_", text).lstrip("._")[:80]
    return f"{stem}-{digest}" if stem else f"id-{digest}"


def parse_result(text: str) -> spb.SlideScore | None:
    """A `SlideScore` from its JSON mapping or from a `ScoreResult` (the batch scorer's file);
    None for a failed scoring. Raises ValueError for anything else."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        if "score" in data or "error" in data:
            wrapped = json_format.ParseDict(data, spb.ScoreResult())
            return wrapped.score if wrapped.HasField("score") else None
        return json_format.ParseDict(data, spb.SlideScore())
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from exc


def to_json(score: spb.SlideScore) -> str:
    """The stored form: protobuf's JSON mapping, without the heatmap bytes (kept as a PNG)."""
    copy = spb.SlideScore()
    copy.CopyFrom(score)
    copy.heatmap_png = b""
    return json_format.MessageToJson(copy, indent=None)


@dataclass(frozen=True)
class StoredResult:
    score: spb.SlideScore
    path: Path  # the JSON file
    heatmap: Path | None  # the PNG beside it, when there is one
    mtime: float

    @property
    def request_id(self) -> str:
        return self.score.request_id or self.path.stem


class ResultStore:
    """Reads and writes results under one root. Parsed files are cached by (size, mtime), so a
    viewer can list the root on every page view."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._cache: dict[Path, tuple[tuple[int, int], spb.SlideScore | None]] = {}
        self._lock = threading.Lock()

    def save(self, score: spb.SlideScore, heatmap_png: bytes = b"") -> Path:
        """Write `score` (and its heatmap, from `heatmap_png` or `score.heatmap_png`) where
        `latest` finds it; returns the JSON path. Atomic per file: readers never see half."""
        if not score.slide_id:
            raise ValueError("a stored result needs a slide id")
        request_id = score.request_id or uuid.uuid4().hex
        folder = self.root / safe_id(score.slide_id)
        path = folder / f"{safe_id(request_id)}.json"
        png = heatmap_png or score.heatmap_png
        stored = spb.SlideScore()
        stored.CopyFrom(score)
        stored.request_id = request_id
        if png:  # beside the JSON (`to_json` leaves the bytes out)
            write_atomic(path.with_suffix(".png"), png)
        write_atomic(path, to_json(stored).encode())
        return path

    def results(self) -> list[StoredResult]:
        """Every readable result under the root, both layouts, oldest first."""
        flat: list[StoredResult] = []
        per_slide: list[StoredResult] = []
        if not self.root.is_dir():
            return []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.suffix == ".json":
                flat.extend(self._load(entry, folder_id=None))
            elif entry.is_dir() and not entry.is_symlink() and is_safe_id(entry.name):
                for path in sorted(entry.glob("*.json")):
                    if not path.name.startswith(".") and not path.is_symlink():
                        per_slide.extend(self._load(path, folder_id=entry.name))
        # A scoring stored both ways (the batch scorer's redelivery file and the per-slide
        # one) counts once, as its per-slide file.
        seen = {(r.score.slide_id, r.request_id) for r in per_slide}
        found = per_slide + [r for r in flat if (r.score.slide_id, r.request_id) not in seen]
        found.sort(key=lambda r: (r.mtime, r.request_id))
        return found

    def latest_by_slide(self) -> dict[str, StoredResult]:
        """slide id -> its most recent result (by file time, then request id)."""
        out: dict[str, StoredResult] = {}
        for result in self.results():
            out[result.score.slide_id] = result
        return out

    def history(self, slide_id: str) -> list[StoredResult]:
        """Every result of one slide, newest first."""
        return [r for r in reversed(self.results()) if r.score.slide_id == slide_id]

    def latest(self, slide_id: str) -> StoredResult | None:
        found = self.history(slide_id)
        return found[0] if found else None

    def get(self, slide_id: str, request_id: str) -> StoredResult | None:
        return next((r for r in self.history(slide_id) if r.request_id == request_id), None)

    def _load(self, path: Path, folder_id: str | None) -> list[StoredResult]:
        try:
            st = path.stat()
        except OSError:
            return []
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            score = cached[1]
        else:
            try:
                score = parse_result(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.debug("not a result", extra={"path": str(path), "error": str(exc)})
                score = None
            with self._lock:
                self._cache[path] = (key, score)
        if score is None or not score.slide_id:
            return []
        if folder_id is not None and folder_id != safe_id(score.slide_id):
            return []  # a file that strayed into another slide's folder
        return [StoredResult(score, path, _heatmap_beside(path), st.st_mtime)]


def read_result_file(path: Path) -> StoredResult:
    """One result file in any of the three forms; ValueError when it holds none."""
    try:
        score = parse_result(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not a scoring result: {exc}") from exc
    if score is None:
        raise ValueError(f"{path} records a failed scoring (no score)")
    return StoredResult(score, path, _heatmap_beside(path), path.stat().st_mtime)


def _heatmap_beside(path: Path) -> Path | None:
    candidates = [path.with_suffix(".png")]
    if path.name == DEMO_RESULT:
        candidates.append(path.with_name(DEMO_HEATMAP))
    return next((c for c in candidates if c.is_file() and not c.is_symlink()), None)


# --------------------------------------------------------------------------------------------
# Geometry the result implies.


def tile_stride0(score: spb.SlideScore) -> int | None:
    """The tile grid's step in level-0 pixels, read off the tiles (x = col * stride0); None
    when no tile lies beyond the first row and column."""
    for t in score.tiles:
        if t.col > 0 and t.x % t.col == 0:
            return t.x // t.col
        if t.row > 0 and t.y % t.row == 0:
            return t.y // t.row
    return None


# --------------------------------------------------------------------------------------------
# QuPath GeoJSON and the predictions CSV.

MITOSIS_CLASS = {"name": "Mitosis", "color": [255, 0, 255]}
REGION_CLASS = {"name": "Densest 10 HPF", "color": [0, 200, 255]}
SCORE_COLOURS = ([60, 120, 255], [255, 200, 0], [230, 30, 30])  # tumor score 1, 2, 3


def _square(x: float, y: float, w: float, h: float) -> list[list[float]]:
    """A closed ring, counter-clockwise by the shoelace sign (RFC 7946's right-hand rule)."""
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]


def _feature(
    key: str, geometry: dict[str, Any], object_type: str, cls: dict, measurements: dict
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),  # QuPath keeps UUID ids; stable here
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": cls,
            "measurements": measurements,
        },
    }


def to_geojson(score: spb.SlideScore, tile_side0: int | None) -> dict[str, Any]:
    """A FeatureCollection QuPath imports (File > Import objects): mitoses as `detection`
    points (class Mitosis, measurement Confidence), scored tiles as `tile` squares classed by
    their most probable tumor score with every class probability as a measurement, and the
    densest 10-HPF region as an `annotation`. Coordinates are level-0 pixels, origin top-left,
    as QuPath's own. Tiles are left out when their side is unknown (`tile_side0` None)."""
    base = f"prolifscore:{score.slide_id}:{score.request_id}"
    features = []
    for i, m in enumerate(score.mitoses):
        features.append(
            _feature(
                f"{base}:mitosis:{i}",
                {"type": "Point", "coordinates": [m.x, m.y]},
                "detection",
                MITOSIS_CLASS,
                {"Confidence": round(float(m.probability), 6)},
            )
        )
    if tile_side0:
        for t in score.tiles:
            probs = [round(float(p), 6) for p in t.probabilities]
            best = max(range(len(probs)), key=probs.__getitem__) if probs else 0
            measurements = {f"P(tumor score {k + 1})": p for k, p in enumerate(probs)}
            measurements["Mitosis max probability"] = round(float(t.mitosis_max), 6)
            measurements["Mitoses"] = t.mitoses
            cls = {"name": f"Tumor score {best + 1}", "color": SCORE_COLOURS[best % 3]}
            ring = _square(t.x, t.y, tile_side0, tile_side0)
            geometry = {"type": "Polygon", "coordinates": [ring]}
            features.append(
                _feature(f"{base}:tile:{t.col}:{t.row}", geometry, "tile", cls, measurements)
            )
    if score.HasField("densest_region"):
        r = score.densest_region
        geometry = {"type": "Polygon", "coordinates": [_square(r.x, r.y, r.width, r.height)]}
        features.append(
            _feature(
                f"{base}:region",
                geometry,
                "annotation",
                REGION_CLASS,
                {"Mitoses per 10 HPF": float(score.mitoses_per_10hpf)},
            )
        )
    return {"type": "FeatureCollection", "features": features}


def predictions_csv(scores: Iterable[spb.SlideScore]) -> str:
    """`slide_id,tumor_score`, one row per slide: the predictions format `prolifscore evaluate`
    reads. A slide without a score (no tissue tile: tumor score 0) gets an empty cell, which
    evaluate counts as unknown."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "tumor_score"])
    for s in scores:
        writer.writerow([s.slide_id, s.tumor_score if s.tumor_score in (1, 2, 3) else ""])
    return buf.getvalue()
