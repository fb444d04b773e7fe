"""Training the mitosis detector (`train_mitosis`): patch epochs and hard-negative rounds, the
threshold chosen on the training cases, the held-out cases scored once at it beside the
darkness baseline, and the export of the padded detector with its threshold."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prolifscore.core.grading.matching import Counts
from prolifscore.core.models.contract import MITOSIS_PATCH
from prolifscore.training.detector.baseline import darkness_baseline
from prolifscore.training.detector.config import MitosisTrainConfig
from prolifscore.training.detector.inference import (
    BORDER_PAD,
    best_threshold,
    detection_maps,
    map_counts,
    padded_detector,
)
from prolifscore.training.detector.patches import (
    HardNegative,
    mine_hard_negatives,
    sample_patches,
)
from prolifscore.training.detector.regions import (
    DatasetError,
    MitosisDataset,
    Region,
    read_mitosis_dataset,
)
from prolifscore.training.schedule import cosine_lr

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


@dataclass
class MitosisTrainResult:
    threshold: float
    metrics: dict[str, Any]  # held out at `threshold`: precision, recall, f1, tp, fp, fn
    train_metrics: dict[str, Any]  # training cases at `threshold`
    baseline: dict[str, Any]  # darkness baseline on the held-out cases
    history: list[dict[str, Any]]
    split: dict[str, list[str]]
    fingerprint: str
    seconds: float
    export_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    detector: Any = field(default=None, repr=False)  # the trained padded_detector (exported)


def _to_unit_float(x: Any, y: Any, w: Any) -> tuple[Any, Any, Any]:
    """uint8 patches -> float32 in [0, 1] (`preprocess_mitosis`), inside tf.data."""
    from prolifscore.core.models.contract import preprocess_mitosis

    return preprocess_mitosis(x), y, w


@dataclass
class _Fit:
    """The detector in training and what its epochs share."""

    config: MitosisTrainConfig
    model: keras.Model  # the patch model that is fitted
    scorer: keras.Model  # `padded_detector` on the same weights: evaluated and exported
    train: list[Region]
    held_out: list[Region]
    rng: np.random.Generator  # draws every epoch's patches
    timings: dict[str, float]  # seconds per phase
    history: list[dict[str, Any]] = field(default_factory=list)
    hard: list[HardNegative] = field(default_factory=list)


def train_mitosis(
    config: MitosisTrainConfig,
    data_dir: Path | str,
    model_root: Path | str | None = None,
    *,
    dataset: MitosisDataset | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> MitosisTrainResult:
    """Train the detector, pick its threshold on the training cases, score the held-out cases
    with the TUPAC rule, and export it (when `model_root` is given) as a trained version.

    Every data problem raises `DatasetError` before the first epoch. `dataset` skips reading
    (tests); `progress` receives each epoch's history entry.
    """
    started = time.perf_counter()
    data = dataset or read_mitosis_dataset(data_dir, mpp=config.data_mpp, target_mpp=config.mpp)
    train, held_out = data.split(config.val_fraction, config.seed)
    n_pos = sum(len(r.centroids) for r in train)
    if n_pos == 0:
        raise DatasetError(f"{data.root}: the training cases hold no mitosis to learn from")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")

    fit = _start(config, train, held_out, started)
    _train_rounds(fit, progress)
    threshold, train_counts, held_counts = _score(fit)
    t0 = time.perf_counter()
    baseline = darkness_baseline(train, held_out, config)
    fit.timings["baseline"] = time.perf_counter() - t0
    metrics = {
        **held_counts.summary(),
        "regions": len(held_out),
        "mitoses": int(sum(len(r.centroids) for r in held_out)),
    }
    result = MitosisTrainResult(
        threshold=threshold,
        metrics=metrics,
        train_metrics=train_counts.summary(),
        baseline=baseline,
        history=fit.history,
        split={
            "train": sorted({r.case for r in train}),
            "held_out": sorted({r.case for r in held_out}),
        },
        fingerprint=data.fingerprint,
        seconds=0.0,
        detector=fit.scorer,
    )
    result.seconds = round(time.perf_counter() - started, 2)
    if model_root is not None:
        t0 = time.perf_counter()
        result.export_dir = _export(result, config, data, model_root)
        fit.timings["export"] = time.perf_counter() - t0
    result.timings = {k: round(v, 2) for k, v in fit.timings.items()}
    return result


def _start(
    config: MitosisTrainConfig, train: list[Region], held_out: list[Region], started: float
) -> _Fit:
    """The seeded detector, its patch model compiled, and the padded scorer sharing them."""
    import keras

    from prolifscore.core.models.architectures import build_mitosis_model, mitosis_patch_model

    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    detector = build_mitosis_model(width=config.width)
    for layer in detector.layers:  # see MitosisTrainConfig.bn_momentum
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = config.bn_momentum
    model = mitosis_patch_model(detector, MITOSIS_PATCH)
    scorer = padded_detector(detector)  # shares the weights: what is evaluated and exported
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
    )
    timings = {"setup": time.perf_counter() - started, "fit": 0.0, "mining": 0.0, "evaluate": 0.0}
    return _Fit(config, model, scorer, train, held_out, rng, timings)


def _train_rounds(fit: _Fit, progress: Callable[[dict[str, Any]], None] | None) -> None:
    """`epochs` epochs, then each hard-negative round: mine, then `hard_negative_epochs`
    epochs; one cosine learning-rate curve over them all."""
    config = fit.config
    epoch = 0
    total_epochs = config.epochs + config.hard_negative_rounds * config.hard_negative_epochs
    for round_ in range(1 + config.hard_negative_rounds):
        if round_:
            t0 = time.perf_counter()
            maps = detection_maps(fit.scorer, [r.image for r in fit.train])
            mined = mine_hard_negatives(maps, fit.train, config)
            fit.hard.extend(mined)
            fit.timings["mining"] += time.perf_counter() - t0
            log.info("hard-negative round %d: %d new, %d in all", round_, len(mined), len(fit.hard))
        for _ in range(config.epochs if round_ == 0 else config.hard_negative_epochs):
            entry = _fit_epoch(fit, round_, epoch, total_epochs)
            epoch += 1
            fit.history.append(entry)
            log.info("mitosis epoch %s", entry)
            if progress:
                progress(entry)


def _fit_epoch(fit: _Fit, round_: int, epoch: int, total_epochs: int) -> dict[str, Any]:
    """One epoch on freshly drawn patches at 0-based `epoch`'s rate: its history entry."""
    import tensorflow as tf

    config = fit.config
    t0 = time.perf_counter()
    lr = cosine_lr(config.learning_rate, epoch, total_epochs, config.final_lr_fraction)
    fit.model.optimizer.learning_rate.assign(lr)
    x, y, w = sample_patches(fit.train, config, fit.rng, fit.hard)
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y, w))
        .batch(config.batch_size)
        .map(_to_unit_float)
        .prefetch(2)
    )
    history = fit.model.fit(ds, epochs=1, verbose=0, shuffle=False)  # shuffled when sampled
    fit.timings["fit"] += time.perf_counter() - t0
    entry: dict[str, Any] = {
        "epoch": epoch + 1,
        "round": round_,
        "loss": round(float(history.history["loss"][-1]), 5),
        "learning_rate": round(lr, 7),
        "patches": len(y),
        "positives": int(y.sum()),
        "hard_negatives": len(fit.hard),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if config.eval_every_epoch and fit.held_out:
        t1 = time.perf_counter()
        maps = detection_maps(fit.scorer, [r.image for r in fit.held_out])
        counts = map_counts(
            maps,
            [r.centroids for r in fit.held_out],
            0.5,
            config.match_radius_px,
            config.nms_radius_px,
        )
        entry["held_out_f1_at_0.5"] = round(counts.f1, 4)
        fit.timings["evaluate"] += time.perf_counter() - t1
    return entry


def _score(fit: _Fit) -> tuple[float, Counts, Counts]:
    """The threshold (`config.threshold`, else the best F1 on the training cases) and the
    training and held-out counts at it."""
    config = fit.config
    radius, nms = config.match_radius_px, config.nms_radius_px
    t0 = time.perf_counter()
    train_maps = detection_maps(fit.scorer, [r.image for r in fit.train])
    train_truth = [r.centroids for r in fit.train]
    if config.threshold is None:
        threshold, train_counts = best_threshold(train_maps, train_truth, radius, nms)
    else:
        threshold = config.threshold
        train_counts = map_counts(train_maps, train_truth, threshold, radius, nms)
    held_maps = detection_maps(fit.scorer, [r.image for r in fit.held_out])
    held_truth = [r.centroids for r in fit.held_out]
    held_counts = map_counts(held_maps, held_truth, threshold, radius, nms)
    fit.timings["evaluate"] += time.perf_counter() - t0
    return threshold, train_counts, held_counts


def _export(
    result: MitosisTrainResult,
    config: MitosisTrainConfig,
    data: MitosisDataset,
    model_root: Path | str,
) -> Path:
    """The padded detector as a trained version, its threshold and figures in the metadata."""
    from prolifscore.core.models.export import export_model

    return export_model(
        result.detector,
        "mitosis",
        model_root,
        metadata={
            "trained": True,
            "threshold": result.threshold,
            "border": f"input mirrored by {BORDER_PAD} px inside the model, map cropped back",
            "width": config.width,
            "nms_radius_um": config.nms_radius_um,
            "mpp": config.mpp,
            "metrics": {"held_out": result.metrics, "train": result.train_metrics},
            "baseline": result.baseline,
            "config": asdict(config),
            "data": {
                "fingerprint": data.fingerprint,
                "root": str(data.root),
                "mpp": data.mpp,
                "synthetic": data.synthetic,
                "regions": len(data.regions),
                "split": result.split,
            },
            "history": result.history,
            "train_seconds": result.seconds,
        },
    )
