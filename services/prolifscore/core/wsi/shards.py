"""Where tiles land: deterministic shard names, per-batch completion markers, manifests.

Layout under the tiles root, one folder per slide:
    <slide>/<slide>-<spec_hash>-b00003-of-00010.tfrecord   the tiles of batch 3
    <slide>/<slide>-<spec_hash>-b00003-of-00010.done.json  written after the shard is in place
    <slide>/<slide>-<spec_hash>.manifest.json              once every batch has its marker
Re-processing a batch rewrites the same names, so the data set never holds a tile twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from prolifscore.core.wsi.tfrecord import write_atomic

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_id(slide_id: str) -> str:
    """A file-system-safe form of a slide id; ids needing changes get a hash suffix so that
    two different ids never share a folder."""
    cleaned = _SAFE.sub("_", slide_id).strip(".") or "slide"
    if cleaned == slide_id:
        return slide_id
    return f"{cleaned[:80]}-{hashlib.sha256(slide_id.encode()).hexdigest()[:8]}"


def slide_dir(root: Path, slide_id: str) -> Path:
    return root / safe_id(slide_id)


def _stem(slide_id: str, spec_hash: str, batch_index: int, batch_count: int) -> str:
    return f"{safe_id(slide_id)}-{spec_hash}-b{batch_index:05d}-of-{batch_count:05d}"


def shard_path(
    root: Path, slide_id: str, spec_hash: str, batch_index: int, batch_count: int
) -> Path:
    return (
        slide_dir(root, slide_id)
        / f"{_stem(slide_id, spec_hash, batch_index, batch_count)}.tfrecord"
    )


def marker_path(
    root: Path, slide_id: str, spec_hash: str, batch_index: int, batch_count: int
) -> Path:
    return (
        slide_dir(root, slide_id)
        / f"{_stem(slide_id, spec_hash, batch_index, batch_count)}.done.json"
    )


def manifest_path(root: Path, slide_id: str, spec_hash: str) -> Path:
    return slide_dir(root, slide_id) / f"{safe_id(slide_id)}-{spec_hash}.manifest.json"


def write_marker(
    root: Path,
    slide_id: str,
    spec_hash: str,
    batch_index: int,
    batch_count: int,
    info: dict[str, Any],
) -> None:
    write_atomic(
        marker_path(root, slide_id, spec_hash, batch_index, batch_count),
        json.dumps(info, sort_keys=True).encode(),
    )


def completed_markers(
    root: Path, slide_id: str, spec_hash: str, batch_count: int
) -> list[dict[str, Any]] | None:
    """Every batch's marker, or None while any batch is still missing."""
    out = []
    for i in range(batch_count):
        path = marker_path(root, slide_id, spec_hash, i, batch_count)
        try:
            out.append(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
    return out


def write_manifest(
    root: Path,
    slide_id: str,
    spec_hash: str,
    summary: dict[str, Any],
    markers: list[dict[str, Any]],
) -> Path:
    """Per-slide manifest: what was asked for, what was kept, where it is, how long it took."""
    path = manifest_path(root, slide_id, spec_hash)
    manifest = {
        **summary,
        "slide_id": slide_id,
        "spec_hash": spec_hash,
        "batch_count": len(markers),
        "kept_tiles": sum(m["tile_count"] for m in markers),
        "filter_seconds": round(sum(m["seconds"] for m in markers), 4),
        "shards": [
            {k: m[k] for k in ("batch_index", "shard", "tile_count", "size_bytes", "crc32c")}
            for m in markers
            if m["tile_count"]
        ],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return path
