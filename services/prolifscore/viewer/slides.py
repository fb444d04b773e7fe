"""Which slides the viewer shows, how a URL names one, and what it draws over a slide.

A slide is named in URLs by its path relative to one of the slide roots (`sub/a.svs`). Names are
checked before the file system is touched (no `..`, no absolute path, no NUL or backslash) and
then confined to the roots with symlinks resolved (`confine_path`), so no URL reaches a file
outside the roots. A slide's results are those stored under its slide id: the file name without
its extension, as `prolifscore ingest` and `prolifscore score` name slides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from prolifscore.core.grading.mitoses import MitosisGrading, densest_region
from prolifscore.core.results import StoredResult, tile_stride0
from prolifscore.core.runtime.settings import PreprocessSettings
from prolifscore.core.wsi.geometry import resolve_geometry
from prolifscore.core.wsi.slide import Slide, SlideNotFound, SlidePathDenied, confine_path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".svslide")
MAX_DEPTH = 3  # folders below a root that the slide list looks into


class BadSlideName(ValueError):
    """A slide name that is not a plain relative path (refused before any file access)."""


def check_name(name: str) -> PurePosixPath:
    """`name` as a relative path of plain components, or BadSlideName."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise BadSlideName("a slide is named by its path relative to a slide root")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or len(parts) > MAX_DEPTH + 1:
        raise BadSlideName("a slide name has plain path components only")
    return PurePosixPath(*parts)


def resolve(name: str, roots: Sequence[Path]) -> Path:
    """The file a slide name means: the first root holding it, symlinks resolved and confined
    to the roots (SlidePathDenied otherwise), SlideNotFound when no root has it."""
    rel = check_name(name)
    for root in roots:
        candidate = Path(root).absolute() / rel  # confine_path reads relative paths otherwise
        if os.path.lexists(candidate):
            return confine_path(candidate, roots)
    raise SlideNotFound(f"{name} is in no slide root")


@dataclass(frozen=True)
class SlideFile:
    name: str  # path relative to its root, posix separators: the slide's name in URLs
    path: Path
    slide_id: str


def list_slides(roots: Sequence[Path]) -> list[SlideFile]:
    """Slide files under the roots (a few folders deep, hidden ones skipped), first root wins
    for a name; symlinks that leave the roots are left out."""
    seen: dict[str, SlideFile] = {}
    for root in roots:
        base = Path(root).absolute()
        if not base.is_dir():
            continue
        for folder, dirs, files in os.walk(base):
            depth = len(Path(folder).relative_to(base).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < MAX_DEPTH)
            for f in sorted(files):
                if f.startswith(".") or not f.lower().endswith(SLIDE_SUFFIXES):
                    continue
                name = (Path(folder) / f).relative_to(base).as_posix()
                if name in seen:
                    continue
                try:
                    path = confine_path(Path(folder) / f, roots)
                except (SlidePathDenied, SlideNotFound, OSError):
                    continue
                except Exception:  # SlideUnreadable: a folder named like a slide
                    continue
                seen[name] = SlideFile(name, path, Path(f).stem)
    return sorted(seen.values(), key=lambda s: s.name)


def summary(result: StoredResult) -> dict[str, Any]:
    """What the slide list shows of a result."""
    s = result.score
    return {
        "request_id": result.request_id,
        "tumor_score": s.tumor_score,
        "probabilities": [round(float(p), 4) for p in s.probabilities],
        "mitotic_score": s.mitotic_score,
        "mitosis_count": s.mitosis_count,
        "mitoses_per_10hpf": s.mitoses_per_10hpf,
        "tiles_scored": s.tiles_scored,
        "models": [{"name": m.name, "version": m.version} for m in s.models],
        "warnings": list(s.warnings),
        "has_heatmap": result.heatmap is not None,
    }


def tile_side0(result: StoredResult, slide: Slide, preprocess: PreprocessSettings) -> int:
    """The scored tiles' side in level-0 pixels. Results do not carry it: the grid step read
    off the tiles, or the tiling spec's geometry for this slide where that agrees (it also
    knows the overlap) or where the tiles cannot tell."""
    geometry = resolve_geometry(
        slide.dimensions,
        slide.level_downsamples,
        slide.base_mpp(),
        target_mpp=preprocess.target_mpp,
        tile_size=preprocess.tile_size,
        overlap=preprocess.overlap,
        assumed_mpp=preprocess.default_mpp,
    )
    stride = tile_stride0(result.score)
    return geometry.footprint0 if stride in (None, geometry.stride0) else stride


def overlays(result: StoredResult, slide: Slide, preprocess: PreprocessSettings) -> dict[str, Any]:
    """Everything the slide page draws, compact: tiles as [x, y, p1, p2, p3, mitosis max,
    mitoses], mitoses as [x, y, probability], the densest 10-HPF region (computed here from
    the mitoses, and marked so, when the result predates the field)."""
    s = result.score
    region: dict[str, Any] | None = None
    if s.HasField("densest_region"):
        r = s.densest_region
        region = {"x": r.x, "y": r.y, "width": r.width, "height": r.height, "computed": False}
    elif len(s.mitoses):
        mpp = slide.base_mpp() or PreprocessSettings().default_mpp
        square = densest_region(
            [(m.x, m.y) for m in s.mitoses], MitosisGrading().region_side_um() / mpp
        )
        if square is not None:
            side = round(square.side)
            region = {
                "x": round(square.x),
                "y": round(square.y),
                "width": side,
                "height": side,
                "computed": True,
            }
    if region is not None:
        region["mitoses_per_10hpf"] = s.mitoses_per_10hpf
    return {
        "tile_side": tile_side0(result, slide, preprocess),
        "tiles": [
            [
                t.x,
                t.y,
                *[round(float(p), 4) for p in t.probabilities],
                round(t.mitosis_max, 4),
                t.mitoses,
            ]
            for t in s.tiles
        ],
        "classes": len(s.probabilities) or 3,
        "predicted": s.tumor_score,
        "mitoses": [[m.x, m.y, round(float(m.probability), 4)] for m in s.mitoses],
        "region": region,
    }
