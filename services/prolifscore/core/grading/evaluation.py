"""TUPAC16 metrics: quadratic weighted kappa (task 1), Spearman (task 2), slide aggregation,
ordinal cut points and the slide decision rules the scoring service applies (`slide_decision`).

Kept free of TensorFlow so that `prolifscore evaluate`, the scoring service and the training
loop's per-epoch metrics share one implementation and the CLI starts instantly. Reading
submission files is `submission.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prolifscore.v1 import scoring_pb2 as spb

TUMOR_LABELS = (1, 2, 3)


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
# The slide decision the scoring service applies (ScoreRule in protos/prolifscore/v1/scoring.proto).


def proliferation_index(mean_probs: Sequence[float] | np.ndarray) -> float:
    """The expected score sum_k k * p_k (k = 1..K) of the normalised mean tile probabilities:
    the continuous index the cut points apply to and task 2's Spearman ranks."""
    p = np.asarray(mean_probs, np.float64).ravel()
    if p.size == 0 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"mean probabilities must be finite, >= 0 and not all 0: {p.tolist()}")
    p = p / p.sum()
    return float((p * np.arange(1, p.size + 1)).sum())


# The rules by the names settings and the CLI use.
SCORE_RULES = {
    "model": spb.SCORE_RULE_UNSPECIFIED,  # the model's own: cut points when it has them
    "argmax": spb.SCORE_RULE_ARGMAX,
    "cutpoints": spb.SCORE_RULE_CUTPOINTS,
    "rounded_mean": spb.SCORE_RULE_ROUNDED_MEAN,
}


def slide_decision(
    mean_probs: Sequence[float] | np.ndarray,
    tile_classes: Sequence[int] | np.ndarray,
    rule: int = 0,
    cutpoints: Sequence[float] | None = None,
) -> tuple[int, int, float]:
    """A slide's class under a `ScoreRule`: returns (class 1..K, the rule that produced it,
    the proliferation index).

    - SCORE_RULE_ARGMAX: the most probable class of `mean_probs` (ties: the lower class);
    - SCORE_RULE_CUTPOINTS: `1 + sum(index >= c)` over the K-1 ascending `cutpoints` (the
      export's `score_rule.cutpoints`), i.e. 1 + (index >= c1) + (index >= c2) for 3 classes;
    - SCORE_RULE_ROUNDED_MEAN: the seed's rule, the mean of `tile_classes` (each tile's
      predicted class, 1..K) rounded half to even as numpy rounds (1.5 -> 2, 2.5 -> 2);
    - SCORE_RULE_UNSPECIFIED (0): the model's own rule, cut points when given, else argmax.

    Asking for cut points when the model has none falls back to argmax, and the returned rule
    says so (the caller can warn). The index is the same whatever the rule.
    """
    index = proliferation_index(mean_probs)
    k = np.asarray(mean_probs).size
    cuts = None if cutpoints is None else [float(c) for c in cutpoints]
    if cuts is not None and (
        len(cuts) != k - 1 or not all(map(math.isfinite, cuts)) or cuts != sorted(cuts)
    ):
        raise ValueError(f"need {k - 1} finite ascending cut points for {k} classes, got {cuts}")
    if rule not in spb.ScoreRule.values():
        raise ValueError(f"rule {rule} is not a ScoreRule ({spb.ScoreRule.values()})")
    if rule == spb.SCORE_RULE_UNSPECIFIED:
        rule = spb.SCORE_RULE_CUTPOINTS if cuts is not None else spb.SCORE_RULE_ARGMAX
    if rule == spb.SCORE_RULE_CUTPOINTS and cuts is not None:
        return 1 + sum(index >= c for c in cuts), rule, index
    if rule == spb.SCORE_RULE_ROUNDED_MEAN:
        classes = np.asarray(tile_classes, np.float64).ravel()
        if classes.size == 0 or np.any((classes < 1) | (classes > k)):
            raise ValueError(f"tile classes must be non-empty and within 1..{k}")
        return int(np.clip(np.round(classes.mean()), 1, k)), rule, index
    best = int(np.argmax(np.asarray(mean_probs, np.float64).ravel())) + 1
    return best, spb.SCORE_RULE_ARGMAX, index
