"""TUPAC16 metrics: quadratic weighted kappa (task 1), Spearman (task 2), slide aggregation.

Kept free of TensorFlow so that `prolifscore evaluate` and the training loop's per-epoch
metrics share one implementation and the CLI starts instantly.

CSV formats read by `evaluate_predictions` (commas, optional spaces, UTF-8):

- ground truth, TUPAC style: no header, one row per slide, ``tumor_score,molecular_score``;
  row i (1-based) is slide i (the challenge's ``training_ground_truth.csv``).
- ground truth with a header naming ``slide_id`` and ``tumor_score`` (``molecular_score``
  optional).
- predictions: a header ``slide_id,tumor_score[,molecular_score]`` (what `prolifscore score`
  writes), or TUPAC row style without a header (``tumor_score[,molecular_score]``, row i =
  slide i, the challenge's submission format).

An empty cell, ``nan`` or ``-1`` means "unknown". When one file is keyed by row and the other by
slide id, a slide id is matched by its trailing number (``TUPAC-TE-012`` -> row 12).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TUMOR_LABELS = (1, 2, 3)


class EvaluationError(ValueError):
    """A predictions or ground-truth file that cannot be evaluated (format, no overlap)."""


# --------------------------------------------------------------------------------------------
# Metrics.


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[int] = TUMOR_LABELS,
) -> np.ndarray:
    """Counts `[i, j]` = true `labels[i]` predicted as `labels[j]` (sklearn's convention).

    Values outside `labels` raise: a score of 0 or 4 is a bug upstream, not a miss."""
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    lab = np.asarray(labels, np.int64)
    bad = sorted(set(np.concatenate([t, p]).tolist()) - set(lab.tolist()))
    if bad:
        raise ValueError(f"values {bad} are not among the labels {tuple(labels)}")
    order = np.argsort(lab)
    ti = order[np.searchsorted(lab[order], t)]
    pi = order[np.searchsorted(lab[order], p)]
    k = len(lab)
    return np.bincount(ti * k + pi, minlength=k * k).reshape(k, k).astype(np.int64)


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return float(np.mean(t == p)) if t.size else float("nan")


def quadratic_weighted_kappa(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[int] = TUMOR_LABELS,
) -> float:
    """Cohen's kappa with quadratic weights, as sklearn's ``cohen_kappa_score(...,
    weights="quadratic", labels=labels)`` computes it (the TUPAC16 task 1 metric).

    kappa = 1 - sum(W * O) / sum(W * E), W[i,j] = (i-j)^2 over label positions, O the
    confusion matrix, E the outer product of its marginals / N. NaN (as sklearn) when E puts no
    weight off the diagonal, i.e. both raters used a single category.
    """
    observed = confusion_matrix(y_true, y_pred, labels).astype(np.float64)
    n = observed.sum()
    if n == 0:
        return float("nan")
    k = len(labels)
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / n
    denom = float((weights * expected).sum())
    if denom == 0.0:
        return float("nan")
    return 1.0 - float((weights * observed).sum()) / denom


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (TUPAC16 task 2) over the pairs where both values are known.

    NaN with fewer than 3 such pairs or a constant side (no ranking to compare)."""
    from scipy.stats import spearmanr

    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a and b differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


# --------------------------------------------------------------------------------------------
# Tiles -> slides.


@dataclass(frozen=True)
class SlideScore:
    """One slide's aggregate: the score, the mean tile probabilities, and a continuous
    expected score (sum of p_k * k) that Spearman can rank against the molecular score."""

    score: int
    probabilities: tuple[float, ...]
    expected: float
    tiles: int


def aggregate_slide(probs: np.ndarray, method: str = "mean") -> SlideScore:
    """The scoring service's rule: "mean" = argmax of the mean probability + 1;
    "rounded_mean" = the seed's rounded mean of the tiles' argmax classes."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"need a non-empty [tiles, classes] array, got shape {p.shape}")
    mean = p.mean(axis=0)
    mean = mean / mean.sum() if mean.sum() > 0 else mean
    classes = p.shape[1]
    if method == "mean":
        score = int(mean.argmax()) + 1
    elif method == "rounded_mean":
        score = int(np.clip(np.round((p.argmax(axis=1) + 1).mean()), 1, classes))
    else:
        raise ValueError(f"method must be 'mean' or 'rounded_mean', got {method!r}")
    expected = float((mean * np.arange(1, classes + 1)).sum())
    return SlideScore(score, tuple(float(v) for v in mean), expected, int(p.shape[0]))


def slide_scores(
    tile_probs: np.ndarray,
    slide_ids: Sequence[str] | np.ndarray,
    method: str = "mean",
) -> dict[str, SlideScore]:
    """Aggregate tile probabilities `[N, classes]` to one `SlideScore` per slide id."""
    p = np.asarray(tile_probs)
    ids = [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(slide_ids).ravel()]
    if p.ndim != 2 or p.shape[0] != len(ids):
        raise ValueError(f"tile_probs {p.shape} does not match {len(ids)} slide ids")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(ids):
        groups.setdefault(s, []).append(i)
    return {s: aggregate_slide(p[rows], method) for s, rows in sorted(groups.items())}


def slide_metrics(
    scores: dict[str, SlideScore],
    truth: dict[str, int],
    molecular: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Slide-level accuracy, kappa, confusion matrix and (where molecular scores are known)
    Spearman of the expected score against them — what training reports each epoch."""
    ids = [s for s in scores if s in truth]
    y_true = [truth[s] for s in ids]
    y_pred = [scores[s].score for s in ids]
    out: dict[str, Any] = {
        "slides": len(ids),
        "accuracy": accuracy(y_true, y_pred) if ids else float("nan"),
        "kappa": quadratic_weighted_kappa(y_true, y_pred) if ids else float("nan"),
        "confusion_matrix": confusion_matrix(y_true, y_pred).tolist(),
        "spearman": float("nan"),
        "spearman_slides": 0,
    }
    if molecular:
        known = [s for s in ids if math.isfinite(molecular.get(s, float("nan")))]
        out["spearman_slides"] = len(known)
        out["spearman"] = spearman(
            [scores[s].expected for s in known], [molecular[s] for s in known]
        )
    return out


def fit_cutpoints(
    expected: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[float, float]:
    """Cut points (t1, t2) on the expected score (1-3) that maximise the quadratic weighted
    kappa of `score = 1 + (e >= t1) + (e >= t2)` on labelled (training) slides.

    Why: tiles carry their slide's label, but most tiles of a score-2 slide look like any
    other slide's (few figures per tile), so the argmax of the mean probability leans to the
    classes whose tiles look "empty". Calibrating the slide decision on training slides
    fixes that without touching the tile model. Ties prefer the widest margins (midpoints).
    """
    e = np.asarray(expected, np.float64).ravel()
    y = np.asarray(labels).astype(np.int64).ravel()
    if e.size == 0 or e.shape != y.shape:
        raise ValueError("need as many expected scores as labels (at least one)")
    values = np.unique(e)
    if values.size > 64:  # candidate cuts: midpoints between neighbours, or 64 quantiles
        values = np.unique(np.quantile(e, np.linspace(0, 1, 64)))
    grid = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [4.0]])
    best: tuple[float, float, float, float] | None = None  # (kappa, margin, t1, t2)
    for i, t1 in enumerate(grid):
        for t2 in grid[i:]:
            pred = apply_cutpoints(e, (float(t1), float(t2)))
            k = quadratic_weighted_kappa(y, pred)
            k = -math.inf if math.isnan(k) else k
            margin = float(np.min(np.abs(np.concatenate([e - t1, e - t2]))))
            key = (k, margin, float(t1), float(t2))
            if best is None or key[:2] > best[:2]:
                best = key
    assert best is not None
    return best[2], best[3]


def apply_cutpoints(
    expected: Sequence[float] | np.ndarray, cuts: tuple[float, float]
) -> np.ndarray:
    e = np.asarray(expected, np.float64)
    return 1 + (e >= cuts[0]).astype(np.int64) + (e >= cuts[1]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# `prolifscore evaluate`.


_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+|nan|inf)([eE][-+]?\d+)?\s*$", re.IGNORECASE)
_TRAILING = re.compile(r"(\d+)\D*$")


@dataclass
class _Table:
    rows: dict[str, tuple[int | None, float | None]]
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


def _read_table(path: Path, what: str) -> _Table:
    """Either format (see the module doc) -> {key: (tumor_score, molecular_score)}."""
    if not path.is_file():
        raise EvaluationError(f"{what} file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise EvaluationError(f"{what} file {path} is empty")
    out: dict[str, tuple[int | None, float | None]] = {}
    if _NUMBER.match(rows[0][0]):  # TUPAC row style
        for i, row in enumerate(rows, start=1):
            where = f"{path}:{i}"
            score = _cell_score(row[0], where)
            mol = _cell_float(row[1], where) if len(row) > 1 else None
            out[str(i)] = (score, mol)
        return _Table(out, keyed_by_row=True)
    header = [c.strip().lower() for c in rows[0]]
    if "slide_id" not in header:
        raise EvaluationError(f"{path}: a header must name slide_id (got {rows[0]})")
    col = {name: header.index(name) for name in header}
    if "tumor_score" not in col and "molecular_score" not in col:
        raise EvaluationError(f"{path}: no tumor_score or molecular_score column")
    for i, row in enumerate(rows[1:], start=2):
        where = f"{path}:{i}"
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


def evaluate_predictions(predictions_csv: Path | str, ground_truth_csv: Path | str) -> dict:
    """TUPAC16 metrics of a predictions file against a ground-truth file (formats: module doc).

    Returns ``slides`` (matched), ``kappa`` / ``accuracy`` / ``confusion_matrix`` (task 1, over
    slides with both tumor scores), ``spearman`` / ``spearman_slides`` (task 2, over slides with
    both molecular scores; None when the predictions carry none), and the ids of ground-truth
    slides without a prediction (``missing``) and of predictions without ground truth
    (``unmatched``) so a partial submission is visible, not silently scored on a subset.
    """
    truth = _read_table(Path(ground_truth_csv), "ground truth")
    preds = _read_table(Path(predictions_csv), "predictions")
    pred_rows = preds.rows
    if truth.keyed_by_row != preds.keyed_by_row:
        # Map the slide-id side onto row numbers.
        if truth.keyed_by_row:
            mapped: dict[str, tuple[int | None, float | None]] = {}
            for sid, v in preds.rows.items():
                key = _row_key(sid)
                if key is None or key in mapped:
                    raise EvaluationError(f"prediction slide id {sid!r} maps to no unique row")
                mapped[key] = v
            pred_rows = mapped
        else:
            remapped: dict[str, tuple[int | None, float | None]] = {}
            for sid in truth.rows:
                key = _row_key(sid)
                if key is not None and key in preds.rows:
                    remapped[sid] = preds.rows[key]
            pred_rows = remapped
    common = [s for s in truth.rows if s in pred_rows]
    if not common:
        raise EvaluationError("no slide of the predictions matches the ground truth")
    t1 = [s for s in common if truth.rows[s][0] is not None and pred_rows[s][0] is not None]
    y_true = [truth.rows[s][0] for s in t1]
    y_pred = [pred_rows[s][0] for s in t1]
    has_mol = any(v[1] is not None for v in pred_rows.values())
    t2 = [s for s in common if truth.rows[s][1] is not None and pred_rows[s][1] is not None]
    nan = float("nan")
    return {
        "slides": len(common),
        "task1_slides": len(t1),
        "kappa": quadratic_weighted_kappa(y_true, y_pred) if t1 else nan,
        "accuracy": accuracy(y_true, y_pred) if t1 else nan,
        "confusion_matrix": confusion_matrix(y_true, y_pred).tolist(),
        "spearman": (
            spearman([pred_rows[s][1] for s in t2], [truth.rows[s][1] for s in t2])
            if has_mol
            else None
        ),
        "spearman_slides": len(t2),
        "missing": [s for s in truth.rows if s not in pred_rows],
        "unmatched": sorted(set(pred_rows) - set(truth.rows)),
    }
