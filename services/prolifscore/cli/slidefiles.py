"""Which files `prolifscore ingest` sends: files as named, folders searched for slides, each file
checked readable first, so that a folder is never sent as one "slide" and one unreadable file
is reported by name while the others still go out."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prolifscore.core.runtime.validation import id_from_name

# The whole-slide formats the services open (OpenSlide, plus plain TIFF through tiffslide).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")
DEFAULT_PATTERNS = tuple(f"*{suffix}" for suffix in SLIDE_SUFFIXES)


@dataclass
class SlideFiles:
    """Readable slide files (absolute, in the order found) and every path that was not sent,
    with why."""

    files: list[Path] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Case-insensitive glob match of a file name (`*.svs` takes `X.SVS`)."""
    return any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns)


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be sent as a slide (not found, not a regular file, no permission,
    empty), or None: the file is opened and its first byte read, as the services will."""
    try:
        if not path.is_file():
            return "not a regular file" if path.exists() else "no such file"
        with open(path, "rb") as f:
            if not f.read(1):
                return "empty file"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _walk(folder: Path, patterns: Sequence[str], out: SlideFiles) -> Iterable[Path]:
    """Files under `folder` matching `patterns`, recursively, sorted, skipping hidden entries
    and not following links to folders (no cycles); unreadable folders are reported."""
    errors: list[OSError] = []
    for root, dirs, names in os.walk(folder, onerror=errors.append):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and matches(name, patterns):
                yield Path(root) / name
    for exc in errors:
        out.problems.append((Path(exc.filename or folder), exc.strerror or str(exc)))


def find_slides(paths: Sequence[Path], patterns: Sequence[str] = DEFAULT_PATTERNS) -> SlideFiles:
    """Files named on the command line are taken whatever their name; folders are searched
    recursively for names matching `patterns`. Two files whose slide ids (file name without
    extension) would be the same: the second is reported, not sent."""
    out = SlideFiles()
    owners: dict[str, Path] = {}
    for given in paths:
        if given.is_dir():
            candidates = list(_walk(given, patterns, out))
            if not candidates:
                out.problems.append((given, f"no file matches {', '.join(patterns)}"))
        else:
            candidates = [given]
        for path in candidates:
            why = unreadable(path)
            slide_id = id_from_name(path.stem)
            owner = owners.get(slide_id)
            if why is None and owner is not None:
                if owner.resolve() == path.resolve():
                    continue  # the same file named twice
                why = f"slide id {slide_id} is already taken by {owner}"
            if why is not None:
                out.problems.append((path, why))
                continue
            owners[slide_id] = path
            out.files.append(path.resolve())
    return out
