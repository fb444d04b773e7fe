"""TUPAC16 ground-truth CSV: row i holds slide i's tumor score and molecular score.

The challenge file has no header and numbers slides from 1 (TUPAC-TR-001 is row 1). A file
whose first row names a `slide_id` column is read by id instead.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def read_labels(path: Path) -> dict[str, tuple[int, float | None]]:
    """Map of key -> (tumor score, molecular score); key is the slide id, or the 1-based row
    number as a string for the headerless challenge file."""
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: no labels")
    out: dict[str, tuple[int, float | None]] = {}
    if "slide_id" in [c.strip().lower() for c in rows[0]]:
        header = [c.strip().lower() for c in rows[0]]
        for n, row in enumerate(rows[1:], start=2):
            rec = dict(zip(header, row, strict=False))
            out[rec["slide_id"].strip()] = _scores(
                rec.get("tumor_score", ""), rec.get("molecular_score", ""), path, n
            )
        return out
    for n, row in enumerate(rows, start=1):
        out[str(n)] = _scores(row[0], row[1] if len(row) > 1 else "", path, n)
    return out


def _scores(tumor: str, molecular: str, path: Path, line: int) -> tuple[int, float | None]:
    try:
        score = int(float(tumor))
        mol = float(molecular) if molecular.strip() else None
    except ValueError as exc:
        raise ValueError(f"{path}:{line}: not a score: {tumor!r}, {molecular!r}") from exc
    if score not in (1, 2, 3):
        raise ValueError(f"{path}:{line}: tumor score must be 1, 2 or 3, got {score}")
    return score, mol


def labels_for(
    slide_id: str, labels: dict[str, tuple[int, float | None]]
) -> tuple[int, float | None] | None:
    """By id, else by the last number in the id (TUPAC-TR-007 -> row 7)."""
    if slide_id in labels:
        return labels[slide_id]
    m = _NUMBER.search(slide_id)
    return labels.get(str(int(m.group(1)))) if m else None
