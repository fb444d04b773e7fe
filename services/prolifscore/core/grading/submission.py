"""TUPAC16 submissions scored as the challenge scores them (`prolifscore evaluate`).

Tasks 1 and 2 (`evaluate_predictions`), CSV files (commas, optional spaces, UTF-8):

- ground truth, TUPAC style: no header, one row per slide, ``tumor_score,molecular_score``;
  row i (1-based) is slide i (the challenge's ``training_ground_truth.csv``).
- ground truth with a header naming ``slide_id`` and ``tumor_score`` (``molecular_score``
  optional).
- predictions: a header ``slide_id,tumor_score[,molecular_score]`` (what `prolifscore score`
  writes), or TUPAC row style without a header (``tumor_score[,molecular_score]``, row i =
  slide i, the challenge's submission format).

A tumor score that is empty, ``nan`` or ``-1`` is unknown. A molecular score that is empty or
``nan`` is unknown; a molecular column holding only ``-1`` is the challenge's "task 2 not
submitted" (a single -1 is a value: molecular scores can be negative). In a row-numbered file a
blank line before the last row is an error (it would shift every later slide). When one file is
keyed by row and the other by slide id, a slide id is matched by its trailing number
(``TUPAC-TE-012`` -> row 12).

Task 1 is the quadratic weighted kappa over classes 1..3, task 2 Spearman's rank correlation
with average ranks for ties (`evaluation.py`).

Task 3 (`evaluate_detection_files`): detections as one CSV with a header naming ``case``,
``region``, ``row``, ``col`` (optional ``confidence``), or the challenge's submission layout,
a folder of ``<case>/<region>.csv`` files of ``row,col[,confidence]`` lines; ground truth is
the auxiliary layout, ``<case>/<region>.csv`` files of ``row,col`` lines (region images beside
them name regions without mitoses). With a threshold only detections whose confidence is above
it count (the challenge's rule for a confidence column). Matching: `matching.py`.

Missing predictions. The challenge scored every test case, so a submission without one has no
defined score. Here a missing prediction (a ground-truth slide without a value for a task the
submission answers, a ground-truth region without a detections file in the folder layout) or a
prediction for an unknown region is an error listed in the output (``errors``). With
``missing="skip"`` (the default) those are left out and counted; with ``missing="fail"``
nothing is scored and `EvaluationError` says why. In the one-CSV layout a region without rows
has no detections (its mitoses are false negatives): the format cannot tell "none" from
"forgotten".
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from prolifscore.core.grading.evaluation import (
    TUMOR_LABELS,
    accuracy,
    confusion_matrix,
    quadratic_weighted_kappa,
    spearman,
)
from prolifscore.core.grading.matching import (
    TUPAC_RADIUS_PX,
    Counts,
    aggregate,
    evaluate_detections,
)

MissingPolicy = Literal["skip", "fail"]
MISSING_POLICIES = ("skip", "fail")
IMAGE_SUFFIXES = (".tif", ".tiff")  # region images of the auxiliary layout


class EvaluationError(ValueError):
    """A predictions or ground-truth file that cannot be evaluated (format, no overlap, or a
    missing prediction under ``missing="fail"``)."""


def _check_policy(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")


def _errors_or_fail(errors: list[str], missing: str) -> list[str]:
    if errors and missing == "fail":
        raise EvaluationError("; ".join(errors))
    return errors


def _listing(ids: list[str], limit: int = 10) -> str:
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


# --------------------------------------------------------------------------------------------
# Tasks 1 and 2.


_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+|nan|inf)([eE][-+]?\d+)?\s*$", re.IGNORECASE)
_TRAILING = re.compile(r"(\d+)\D*$")
Row = tuple[int | None, float | None]  # (tumor score, molecular score), None = unknown


@dataclass
class _Table:
    rows: dict[str, Row]
    keyed_by_row: bool


def _cell_score(text: str, where: str) -> int | None:
    t = text.strip()
    if t == "" or t.lower() == "nan":
        return None
    try:
        value = float(t)
    except ValueError as exc:
        raise EvaluationError(f"{where}: tumor score {t!r} is not a number") from exc
    if value == -1:
        return None
    if value != int(value) or int(value) not in TUMOR_LABELS:
        raise EvaluationError(f"{where}: tumor score {t!r} is not one of {TUMOR_LABELS}")
    return int(value)


def _cell_float(text: str, where: str) -> float | None:
    t = text.strip()
    if t == "":
        return None
    try:
        value = float(t)
    except ValueError as exc:
        raise EvaluationError(f"{where}: molecular score {t!r} is not a number") from exc
    return value if math.isfinite(value) else None


def _read_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the non-blank lines; trailing blank lines are dropped."""
    if not path.is_file():
        raise EvaluationError(f"{what} file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(enumerate(csv.reader(f), start=1))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"{what} file {path} is not a UTF-8 CSV file: {exc}") from exc
    while rows and not any(c.strip() for c in rows[-1][1]):
        rows.pop()
    if not rows:
        raise EvaluationError(f"{what} file {path} is empty")
    return rows


def _read_table(path: Path, what: str) -> _Table:
    """Either format (see the module doc) -> {key: (tumor_score, molecular_score)}."""
    rows = _read_rows(path, what)
    out: dict[str, Row] = {}
    if _NUMBER.match(rows[0][1][0] if rows[0][1] else ""):  # TUPAC row style
        for i, (line, row) in enumerate(rows, start=1):
            where = f"{path}:{line}"
            if not any(c.strip() for c in row):
                raise EvaluationError(
                    f"{where}: blank line in a row-numbered file (row i is slide i); write "
                    "-1,-1 for a slide without a prediction"
                )
            if len(row) > 2:
                raise EvaluationError(f"{where}: expected tumor_score[,molecular_score], got {row}")
            mol = _cell_float(row[1], where) if len(row) > 1 else None
            out[str(i)] = (_cell_score(row[0], where), mol)
        return _Table(out, keyed_by_row=True)
    header = [c.strip().lower() for c in rows[0][1]]
    if "slide_id" not in header:
        raise EvaluationError(f"{path}: a header must name slide_id (got {rows[0][1]})")
    col = {name: header.index(name) for name in header}
    if "tumor_score" not in col and "molecular_score" not in col:
        raise EvaluationError(f"{path}: no tumor_score or molecular_score column")
    for line, row in rows[1:]:
        where = f"{path}:{line}"
        if not any(c.strip() for c in row):
            continue
        if len(row) > len(header):
            raise EvaluationError(f"{where}: {len(row)} cells for {len(header)} header columns")
        cells = row + [""] * (len(header) - len(row))
        sid = cells[col["slide_id"]].strip()
        if not sid:
            raise EvaluationError(f"{where}: empty slide_id")
        if sid in out:
            raise EvaluationError(f"{where}: slide {sid!r} appears twice")
        score = _cell_score(cells[col["tumor_score"]], where) if "tumor_score" in col else None
        mol = (
            _cell_float(cells[col["molecular_score"]], where) if "molecular_score" in col else None
        )
        out[sid] = (score, mol)
    return _Table(out, keyed_by_row=False)


def _row_key(slide_id: str) -> str | None:
    m = _TRAILING.search(slide_id)
    return str(int(m.group(1))) if m else None


def _aligned(truth: _Table, preds: _Table) -> dict[str, Row]:
    """The predictions keyed like the ground truth."""
    if truth.keyed_by_row == preds.keyed_by_row:
        return preds.rows
    if truth.keyed_by_row:  # slide ids onto row numbers
        mapped: dict[str, Row] = {}
        for sid, v in preds.rows.items():
            key = _row_key(sid)
            if key is None or key in mapped:
                raise EvaluationError(f"prediction slide id {sid!r} maps to no unique row")
            mapped[key] = v
        return mapped
    return {
        sid: preds.rows[key]
        for sid in truth.rows
        if (key := _row_key(sid)) is not None and key in preds.rows
    }


def evaluate_predictions(
    predictions_csv: Path | str, ground_truth_csv: Path | str, missing: str = "skip"
) -> dict[str, Any]:
    """TUPAC16 tasks 1 and 2 of a predictions file against a ground-truth file (formats and the
    `missing` policy: module doc).

    Returns ``slides`` (ground-truth slides with a prediction row), ``kappa`` / ``accuracy`` /
    ``confusion_matrix`` / ``task1_slides`` (task 1), ``spearman`` / ``spearman_slides``
    (task 2; ``kappa`` or ``spearman`` is None when the submission does not answer that task),
    ``task1_missing`` / ``task2_missing`` (ground-truth slides of a task without a predicted
    value), ``missing`` (without a prediction row), ``unmatched`` (predictions without ground
    truth), ``errors`` (the missing predictions, described) and ``missing_policy``.
    """
    _check_policy(missing)
    truth = _read_table(Path(ground_truth_csv), "ground truth")
    pred = _aligned(truth, _read_table(Path(predictions_csv), "predictions"))
    if not any(s in pred for s in truth.rows):
        raise EvaluationError("no slide of the predictions matches the ground truth")
    answered = {
        0: any(v[0] is not None for v in pred.values()),
        1: any(v[1] is not None and v[1] != -1 for v in pred.values()),
    }
    scored: dict[int, list[str]] = {}
    lacking: dict[int, list[str]] = {}
    errors = []
    for task in (0, 1):
        known = [s for s in truth.rows if truth.rows[s][task] is not None]
        lacking[task] = [
            s for s in known if answered[task] and (s not in pred or pred[s][task] is None)
        ]
        scored[task] = [s for s in known if s in pred and pred[s][task] is not None]
        if answered[task] and lacking[task]:
            errors.append(
                f"task {task + 1}: {len(lacking[task])} of {len(known)} ground-truth slides "
                f"have no prediction ({_listing(lacking[task])})"
            )
    _errors_or_fail(errors, missing)
    y_true = [truth.rows[s][0] for s in scored[0]]
    y_pred = [pred[s][0] for s in scored[0]]
    task1 = answered[0] and bool(scored[0])
    return {
        "slides": sum(1 for s in truth.rows if s in pred),
        "task1_slides": len(scored[0]),
        "kappa": quadratic_weighted_kappa(y_true, y_pred) if task1 else None,
        "accuracy": accuracy(y_true, y_pred) if task1 else None,
        "confusion_matrix": confusion_matrix(y_true, y_pred).tolist(),
        "spearman": (
            spearman([pred[s][1] for s in scored[1]], [truth.rows[s][1] for s in scored[1]])
            if answered[1]
            else None
        ),
        "spearman_slides": len(scored[1]) if answered[1] else 0,
        "task1_missing": lacking[0],
        "task2_missing": lacking[1],
        "missing": [s for s in truth.rows if s not in pred],
        "unmatched": sorted(set(pred) - set(truth.rows)),
        "errors": errors,
        "missing_policy": missing,
    }


# --------------------------------------------------------------------------------------------
# Task 3.

_CONFIDENCE = ("confidence", "probability", "prob", "score")


def _finite(cells: list[str], message: str) -> list[float]:
    """The cells as finite numbers, else an `EvaluationError(message)`."""
    try:
        values = [float(c) for c in cells]
    except ValueError:
        raise EvaluationError(message) from None
    if not all(math.isfinite(v) for v in values):
        raise EvaluationError(message)
    return values


def read_points(path: Path, *, confidence: bool = False) -> np.ndarray:
    """`row,col` lines (TUPAC16: no header), `[n, 2]` float64; with `confidence`, an optional
    third column (`[n, 3]` when every line has one). A `row,col[,confidence]` header line is
    tolerated, an empty file is no points. Anything else is an `EvaluationError` naming the
    file and line."""
    rows: list[list[float]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"cannot read {path}: {exc}") from exc
    widths = (2, 3) if confidence else (2,)
    expected = (
        "two or three numbers 'row,col[,confidence]'" if confidence else "two numbers 'row,col'"
    )
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        names = [c.lower() for c in cells]
        if lineno == 1 and names[:2] == ["row", "col"] and all(n in _CONFIDENCE for n in names[2:]):
            continue
        message = f"{path}:{lineno}: expected {expected}, got {','.join(row)!r}"
        if len(cells) not in widths:
            raise EvaluationError(message)
        rows.append(_finite(cells, message))
    if len({len(r) for r in rows}) > 1:
        raise EvaluationError(f"{path}: some lines have a confidence and some do not")
    width = len(rows[0]) if rows else 2
    return np.asarray(rows, np.float64).reshape(-1, width)


def read_region_folder(folder: Path, what: str, *, confidence: bool) -> dict[str, np.ndarray]:
    """`<case>/<region>.csv` point files -> {"case/region": points}; region images without a
    CSV (auxiliary layout) are regions without points."""
    if not folder.is_dir():
        raise EvaluationError(f"{what} folder {folder} does not exist")
    out = {
        f"{p.parent.name}/{p.stem}": read_points(p, confidence=confidence)
        for p in sorted(folder.glob("*/*.csv"))
    }
    for p in sorted(folder.glob("*/*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            out.setdefault(f"{p.parent.name}/{p.stem}", np.zeros((0, 2)))
    if not out:
        raise EvaluationError(f"{what} folder {folder} holds no <case>/<region>.csv file")
    return out


def read_detection_table(path: Path) -> dict[str, np.ndarray]:
    """One CSV of detections, header `case,region,row,col[,confidence]` -> {"case/region":
    [n, 2 or 3]}."""
    rows = _read_rows(path, "detections")
    header = [c.strip().lower() for c in rows[0][1]]
    need = ("case", "region", "row", "col")
    absent = [n for n in need if n not in header]
    if absent:
        raise EvaluationError(
            f"{path}: the header must name case, region, row, col (optional confidence); "
            f"missing {absent} in {rows[0][1]}"
        )
    col = {n: header.index(n) for n in need}
    conf = next((header.index(n) for n in _CONFIDENCE if n in header), None)
    out: dict[str, list[list[float]]] = {}
    for line, row in rows[1:]:
        where = f"{path}:{line}"
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise EvaluationError(f"{where}: {len(row)} cells for {len(header)} header columns")
        case, region = row[col["case"]].strip(), row[col["region"]].strip()
        if not case or not region:
            raise EvaluationError(f"{where}: empty case or region")
        cells = [row[col["row"]], row[col["col"]], *([row[conf]] if conf is not None else [])]
        values = _finite(cells, f"{where}: row, col and confidence must be numbers: {row}")
        out.setdefault(f"{case}/{region}", []).append(values)
    width = 3 if conf is not None else 2
    return {k: np.asarray(v, np.float64).reshape(-1, width) for k, v in sorted(out.items())}


def evaluate_detection_files(
    detections: Path | str,
    ground_truth: Path | str,
    *,
    radius_px: float = TUPAC_RADIUS_PX,
    threshold: float | None = None,
    missing: str = "skip",
) -> dict[str, Any]:
    """TUPAC16 task 3: overall precision, recall and F1 (counts summed over regions) of a
    detections CSV or folder against the auxiliary ground-truth folder (module doc)."""
    _check_policy(missing)
    folder_layout = Path(detections).is_dir()
    found = (
        read_region_folder(Path(detections), "detections", confidence=True)
        if folder_layout
        else read_detection_table(Path(detections))
    )
    truth = read_region_folder(Path(ground_truth), "ground truth", confidence=False)
    unknown = sorted(set(found) - set(truth))
    lacking = sorted(set(truth) - set(found)) if folder_layout else []
    errors = []
    if unknown:
        errors.append(
            f"{len(unknown)} detection regions are not in the ground truth ({_listing(unknown)}; "
            "case and region are matched as text)"
        )
    if lacking:
        errors.append(
            f"{len(lacking)} ground-truth regions have no detections file ({_listing(lacking)})"
        )
    _errors_or_fail(errors, missing)
    per_region: dict[str, Counts] = {}
    for key in sorted(set(truth) - set(lacking)):
        points = found.get(key, np.zeros((0, 2)))
        if threshold is not None:
            if len(points) and points.shape[1] < 3:
                raise EvaluationError(f"a threshold needs a confidence for every detection ({key})")
            points = points[points[:, 2] > threshold] if len(points) else points
        per_region[key] = evaluate_detections(points[:, :2], truth[key], radius_px)
    total = aggregate(per_region.values())
    return {
        **total.summary(),
        "regions": len(per_region),
        "mitoses": total.tp + total.fn,
        "detections": total.tp + total.fp,
        "radius_px": radius_px,
        "threshold": threshold,
        "layout": "folder" if folder_layout else "csv",
        "missing_regions": lacking,
        "unknown_regions": unknown,
        "errors": errors,
        "missing_policy": missing,
        "per_region": {k: {"tp": c.tp, "fp": c.fp, "fn": c.fn} for k, c in per_region.items()},
    }
