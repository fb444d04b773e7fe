"""Predictions of the tumor model on a split and the validation metrics taken from them: per
epoch on every worker, and on the driver for calibration and the benchmark."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from prolifscore.core.grading.evaluation import (
    accuracy,
    apply_cutpoints,
    confusion_matrix,
    fit_cutpoints,
    quadratic_weighted_kappa,
    slide_metrics,
    slide_scores,
    spearman,
)
from prolifscore.training.data.pipeline import eval_dataset
from prolifscore.training.data.shards import ShardRef
from prolifscore.training.tumor.config import TumorTrainConfig

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


def predictor(model: keras.Model, batches: int = 1000) -> Any:
    """Inference for `batches` batches per call site: {"probs": [N, classes], and with the
    molecular head "molecular": [N]}. Traced once for real validation sets; tracing ResNet50
    costs ~10 s on 2 cores, more than a handful of eager batches."""
    import tensorflow as tf

    from prolifscore.core.models.architectures import tumor_outputs

    def predict(x: tf.Tensor) -> dict[str, tf.Tensor]:
        probs, molecular = tumor_outputs(model(x, training=False))
        out = {"probs": tf.cast(probs, tf.float32)}
        if molecular is not None:
            out["molecular"] = tf.cast(molecular, tf.float32)
        return out

    return tf.function(predict, reduce_retracing=True) if batches > 8 else predict


def predict_all(predict: Any, ds: tf.data.Dataset) -> dict[str, np.ndarray]:
    """Every batch of `ds` predicted: probabilities, labels, slide ids, molecular labels, and
    the molecular head's tile values (`molecular_pred`) when the model has it."""
    probs, labels, ids, mol, mol_pred = [], [], [], [], []
    for batch in ds:
        out = predict(batch["image"])
        probs.append(out["probs"].numpy())
        if "molecular" in out:
            mol_pred.append(out["molecular"].numpy())
        labels.append(batch["label"].numpy())
        ids.append(batch["slide_id"].numpy())
        mol.append(batch["molecular_score"].numpy())
    pred = {
        "probs": np.concatenate(probs),
        "labels": np.concatenate(labels),
        "slide_ids": np.array([s.decode() for s in np.concatenate(ids)]),
        "molecular": np.concatenate(mol),
    }
    if mol_pred:
        pred["molecular_pred"] = np.concatenate(mol_pred)
    return pred


def evaluate_tiles(
    pred: Mapping[str, np.ndarray],
    truth: Mapping[str, int],
    molecular: Mapping[str, float],
    aggregation: str = "mean",
) -> dict[str, Any]:
    """Validation metrics from tile predictions: tile loss/accuracy/confusion and the
    slide-level accuracy, kappa, confusion and Spearman the challenge scores; with the
    molecular head, the Spearman of its slide values (mean over tiles) against the molecular
    scores (TUPAC16 task 2) and their mean absolute error."""
    probs, labels = pred["probs"], pred["labels"].astype(np.int64)
    p_true = probs[np.arange(len(labels)), np.clip(labels, 0, probs.shape[1] - 1)]
    tile_pred = probs.argmax(axis=1)
    classes = tuple(range(1, probs.shape[1] + 1))
    scores = slide_scores(probs, pred["slide_ids"], aggregation)
    slides = slide_metrics(scores, dict(truth), dict(molecular))
    out = {
        "val_loss": float(-np.log(np.clip(p_true, 1e-7, 1.0)).mean()),
        "val_tile_accuracy": accuracy(labels, tile_pred),
        "val_tile_confusion": confusion_matrix(labels + 1, tile_pred + 1, classes).tolist(),
        "val_tiles": len(labels),
        "val_slide_accuracy": slides["accuracy"],
        "val_slide_kappa": slides["kappa"],
        "val_slide_confusion": slides["confusion_matrix"],
        "val_slide_spearman": slides["spearman"],
        "val_slides": slides["slides"],
        "val_spearman_slides": slides["spearman_slides"],
    }
    if "molecular_pred" in pred:
        out.update(molecular_metrics(pred["molecular_pred"], pred["slide_ids"], molecular))
    return out


def molecular_metrics(
    tile_values: np.ndarray, slide_ids: np.ndarray, molecular: Mapping[str, float]
) -> dict[str, Any]:
    """The molecular head on validation slides: slide value = mean of its tiles' values (what
    the scorer returns), Spearman against the known molecular scores, and the MAE."""
    values = slide_means(tile_values, slide_ids)
    known = sorted(s for s in values if math.isfinite(molecular.get(s, math.nan)))
    pred = [values[s] for s in known]
    true = [float(molecular[s]) for s in known]
    return {
        "val_molecular_spearman": spearman(pred, true),
        "val_molecular_mae": float(np.mean(np.abs(np.subtract(pred, true)))) if known else math.nan,
        "val_molecular_slides": len(known),
    }


def slide_means(tile_values: np.ndarray, slide_ids: np.ndarray) -> dict[str, float]:
    """Mean tile value per slide id."""
    out: dict[str, list[float]] = {}
    for value, slide in zip(np.asarray(tile_values).ravel().tolist(), slide_ids, strict=True):
        out.setdefault(str(slide), []).append(float(value))
    return {s: float(np.mean(v)) for s, v in sorted(out.items())}


def tiles_per_slide(shards: Sequence[ShardRef], split: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in shards:
        if split is None or s.split == split:
            out[s.slide_id] = out.get(s.slide_id, 0) + s.tile_count
    return out


def capped_tiles(shards: Sequence[ShardRef], split: str | None, cap: int | None) -> int:
    """Tiles of `split` (None: all) that an evaluation reading at most `cap` per slide sees."""
    return sum(min(n, cap or n) for n in tiles_per_slide(shards, split).values())


def slide_labels(shards: Sequence[ShardRef]) -> tuple[dict[str, int], dict[str, float]]:
    """Per slide: the tumor score (labelled slides) and the molecular score (where known)."""
    truth = {s.slide_id: int(s.tumor_score) for s in shards if s.tumor_score is not None}
    molecular = {s.slide_id: s.molecular_score for s in shards if s.molecular_score is not None}
    return truth, molecular


def slide_predictions(
    model: keras.Model,
    config: TumorTrainConfig,
    shards: Sequence[ShardRef],
    split: str,
    max_tiles_per_slide: int | None,
    predict: Any = None,
) -> dict[str, np.ndarray]:
    """Tile probabilities (and slide ids, labels) of one split, for driver-side metrics."""
    if predict is None:
        tiles = capped_tiles(shards, split, max_tiles_per_slide)
        predict = predictor(model, math.ceil(tiles / config.eval_batch_size))
    ds = eval_dataset(
        shards,
        input_size=config.input_size,
        batch_size=config.eval_batch_size,
        split=split,
        max_tiles_per_slide=max_tiles_per_slide,
    )
    return predict_all(predict, ds)


def calibrate(
    model: keras.Model, config: TumorTrainConfig, shards: Sequence[ShardRef]
) -> dict[str, Any]:
    """Slide decision cut points on the proliferation index (the expected score), fitted on
    the training slides (`fit_cutpoints`), and the kappas they give, computed with the cut
    points as exported (rounded to 4 decimals), i.e. as the scorer will apply them. The export
    states the rule (`score_rule_metadata`); the argmax figures stay beside them."""
    truth, _ = slide_labels(shards)
    out: dict[str, Any] = {}
    scores = {}
    cap = config.max_eval_tiles_per_slide
    tiles = capped_tiles(shards, None, cap)
    predict = predictor(model, math.ceil(tiles / config.eval_batch_size))
    for split in ("train", "validation"):
        pred = slide_predictions(model, config, shards, split, cap, predict)
        scores[split] = slide_scores(pred["probs"], pred["slide_ids"], config.aggregation)
    train_ids = sorted(scores["train"])
    fitted = fit_cutpoints(
        [scores["train"][s].expected for s in train_ids], [truth[s] for s in train_ids]
    )
    cuts = (round(fitted[0], 4), round(fitted[1], 4))
    out["slide_cutpoints"] = list(cuts)
    out["calibration_slides"] = len(train_ids)
    for split, key in (
        ("train", "train_slide_kappa_calibrated"),
        ("validation", "val_slide_kappa_calibrated"),
    ):
        ids = sorted(scores[split])
        pred_scores = apply_cutpoints([scores[split][s].expected for s in ids], cuts)
        out[key] = quadratic_weighted_kappa([truth[s] for s in ids], pred_scores)
    return out


def score_rule_metadata(
    config: TumorTrainConfig, calibration: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The export's `score_rule`: how the scorer turns mean tile probabilities into the slide
    class by default (core/models/contract.py documents the keys)."""
    rule: dict[str, Any] = {
        "default": "cutpoints" if calibration else "argmax",
        "index": "expected score sum_k k * p_k, k = 1..3, p = normalised mean tile probabilities",
        "cutpoints": None,
    }
    if calibration:
        rule.update(
            cutpoints=list(calibration["slide_cutpoints"]),
            decision="score = 1 + (index >= cutpoints[0]) + (index >= cutpoints[1])",
            fitted_on="training slides",
            slides=calibration["calibration_slides"],
            tiles_per_slide=config.max_eval_tiles_per_slide,
            train_kappa=calibration["train_slide_kappa_calibrated"],
            val_kappa=calibration["val_slide_kappa_calibrated"],
        )
    return rule
