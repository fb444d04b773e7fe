"""Temporaries of atomic writes, and removing the ones whose writer died.

Shards, markers and manifests are written to `.<name>.<random>.tmp` beside their final name and
renamed into place. A writer killed before the rename leaves its temporary behind; redoing the
batch writes a new one, so every crash would leak disk. A writer therefore holds an exclusive
`flock` on its temporary while it writes: the kernel drops the lock when the process dies, however
it dies. To never show an unlocked live file, the writer creates it under a staging name
(`.<name>.<random>.new`), locks it, and only then renames it to its `.tmp` name (the lock stays
with the open file). So a `.tmp` that nobody holds locked is stale, and is removed at once; a
staging file only once unlocked and untouched for `GRACE_S` (its writer may be between creating
and locking it). Another worker still writing the same batch (two owners after a rebalance)
holds its lock, so its temporary is left alone.

Where a file system does not support `flock` (some network file systems), liveness cannot be
seen, and only temporaries untouched for `UNLOCKABLE_GRACE_S` are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

SUFFIX = ".tmp"
STAGING = ".new"
GRACE_S = 2.0
UNLOCKABLE_GRACE_S = 3600.0


def temporary_for(path: Path) -> Path:
    """A fresh temporary name beside `path` (hidden, so globs of final names never see it)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{SUFFIX}")


def open_locked(tmp: Path, buffering: int = -1) -> BinaryIO:
    """Create `tmp` for writing, holding an exclusive lock on it until it is closed; it appears
    under its name only once locked."""
    staging = tmp.with_name(tmp.name[: -len(SUFFIX)] + STAGING)
    f = open(staging, "xb", buffering=buffering)  # noqa: SIM115 - the caller closes it
    with contextlib.suppress(OSError):  # no flock here: the age rule alone protects it
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(staging, tmp)
    return f


def _is_temporary(path: Path, target: str | None = None) -> bool:
    name = path.name
    prefix = f".{target}." if target else "."
    return name.startswith(prefix) and name.endswith((SUFFIX, STAGING))


def _remove_if_stale(path: Path, now: float) -> bool:
    """Unlink `path` if no live writer holds it (see the module docstring)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        age = now - os.fstat(fd).st_mtime
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer holds it
        except OSError:
            if age < UNLOCKABLE_GRACE_S:
                return False
        if path.name.endswith(STAGING) and age < GRACE_S:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _sweep(candidates: Iterable[Path]) -> list[Path]:
    now = time.time()
    removed = [p for p in candidates if _remove_if_stale(p, now)]
    if removed:
        log.info(
            "removed %d temporaries left by writers that died",
            len(removed),
            extra={"files": [str(p) for p in removed[:20]]},
        )
    return removed


def remove_stale_temporaries_of(path: Path) -> list[Path]:
    """Stale temporaries of one final file (before it is written again)."""
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    return _sweep(p for p in entries if _is_temporary(p, path.name))


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Stale temporaries in `root` and its immediate folders (a tiles root: one folder per
    slide), e.g. at the start of a service that writes there."""
    try:
        folders = [Path(root), *(p for p in Path(root).iterdir() if p.is_dir())]
    except FileNotFoundError:
        return []
    candidates: list[Path] = []
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            candidates += [p for p in folder.iterdir() if _is_temporary(p)]
    return _sweep(candidates)
