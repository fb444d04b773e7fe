"""Which slides are between TILED and FILTERED or FAILED, kept on disk under the tiles root.

The tiling service records a slide when it has published its tile tasks; the filtering service
removes the record when it reports the slide FILTERED or FAILED. The records live beside the
shards (`<tiles root>/.inflight/<slide>-<spec hash>.json`), not on the broker, so they outlast
whatever the broker loses: after an in-memory broker restarts empty, they name the slides whose
pending tile tasks are gone (the stack reports them FAILED, `localstack/supervisor.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prolifscore.core.wsi.shards import safe_id
from prolifscore.core.wsi.tfrecord import write_atomic

FOLDER = ".inflight"


def _path(root: Path, slide_id: str, spec_hash: str) -> Path:
    return Path(root) / FOLDER / f"{safe_id(slide_id)}-{spec_hash}.json"


def begin(
    root: Path, slide_id: str, spec_hash: str, *, path: str, run_id: str, batch_count: int
) -> None:
    """Record that the slide's tile tasks are out (idempotent: a redelivery rewrites it)."""
    record = {
        "slide_id": slide_id,
        "spec_hash": spec_hash,
        "path": path,
        "run_id": run_id,
        "batch_count": batch_count,
        "tiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(_path(root, slide_id, spec_hash), json.dumps(record, sort_keys=True).encode())


def end(root: Path, slide_id: str, spec_hash: str) -> None:
    """The slide is FILTERED or FAILED: forget it."""
    _path(root, slide_id, spec_hash).unlink(missing_ok=True)


def pending(root: Path) -> list[dict[str, Any]]:
    """Every slide recorded and not finished, oldest first (unreadable records skipped)."""
    folder = Path(root) / FOLDER
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("tiled_at", ""))
