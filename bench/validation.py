"""`make bench-training`'s two checks on synthetic data (`bench/validate.py` runs them): train
each model as production does, then score data it never saw.

- `validate_mitosis`: the detector on a synthetic auxiliary set, held-out F1 (TUPAC rule);
- `validate_tumor`: the tumor model on a (synthetic) tiles root, kappa on the held-out slides.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prolifscore.core.grading.matching import Counts
from prolifscore.synthetic.mitosis_set import make_mitosis_dataset
from prolifscore.training.data.shards import find_shards
from prolifscore.training.detector.config import MitosisTrainConfig
from prolifscore.training.detector.inference import detection_maps, map_counts
from prolifscore.training.detector.regions import Region, read_mitosis_dataset
from prolifscore.training.detector.train import train_mitosis
from prolifscore.training.tumor.config import TumorTrainConfig
from prolifscore.training.tumor.train import train_tumor

if TYPE_CHECKING:
    import keras

# --------------------------------------------------------------------------------------------
# Mitosis detector.

# Sized on the shared 2-core machine: ~240 training mitoses, ~60 in the held-out cases and ~90
# in the test cases (new tissue crops). Width 8 and 20 cases, as `MitosisTrainConfig` trains by
# default (the demo's budget), reached test-set F1 0.78-0.83 at any threshold (20 or 40 cases);
# width 16 with 30 cases 0.87 on the test set, 0.91 with the held-out cases, in 368 s of
# training at a load average of ~10.
VALIDATE_DATA: dict[str, Any] = {"cases": 30, "regions_per_case": 4, "region_size": 512, "seed": 7}
VALIDATE_TEST_CASES = 10
VALIDATE_CONFIG = MitosisTrainConfig(width=16, eval_every_epoch=False)


def evaluate_detector(
    detector: keras.Model,
    regions: Sequence[Region],
    threshold: float,
    config: MitosisTrainConfig,
) -> Counts:
    """TUPAC counts of `detector` (a `padded_detector`) on `regions` at `threshold`."""
    maps = detection_maps(detector, [r.image for r in regions])
    return map_counts(
        maps,
        [r.centroids for r in regions],
        threshold,
        config.match_radius_px,
        config.nms_radius_px,
    )


def validate_mitosis(
    work_dir: Path | str,
    *,
    data: dict[str, Any] | None = None,
    test_cases: int = VALIDATE_TEST_CASES,
    config: MitosisTrainConfig | None = None,
    model_root: Path | str | None = None,
) -> dict[str, Any]:
    """`make bench-training`'s detector check: generate the synthetic auxiliary set in `work_dir`,
    train, and return held-out figures (target: `mitosis_f1` >= 0.85).

    Held out = the split's held-out cases plus a fresh test set of `test_cases` cases (another
    seed: new tissue crops and figures), counts summed: ~40 held-out mitoses alone would put
    F1 within +-0.07. A machinery check on synthetic data, not a TUPAC16 result. Timings
    depend on the machine's load, so the 1-minute load average is reported with them.
    """
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    spec = {**VALIDATE_DATA, **(data or {})}
    data_dir = make_mitosis_dataset(Path(work_dir) / "mitosis-data", **spec)
    test_spec = {**spec, "cases": test_cases, "seed": int(spec["seed"]) + 1000}
    test_dir = make_mitosis_dataset(Path(work_dir) / "mitosis-test", **test_spec)
    generated = time.perf_counter() - started
    cfg = config or VALIDATE_CONFIG
    result = train_mitosis(cfg, data_dir, model_root)
    test = read_mitosis_dataset(test_dir, target_mpp=cfg.mpp)
    test_counts = evaluate_detector(result.detector, test.regions, result.threshold, cfg)
    split_counts = Counts(result.metrics["tp"], result.metrics["fp"], result.metrics["fn"])
    total = split_counts + test_counts
    return {
        "mitosis_f1": round(total.f1, 4),
        "precision": round(total.precision, 4),
        "recall": round(total.recall, 4),
        "threshold": result.threshold,
        "held_out_mitoses": total.tp + total.fn,
        "held_out_regions": result.metrics["regions"] + len(test.regions),
        "held_out_cases": {**result.metrics, "cases": result.split["held_out"]},
        "test_set": {
            **test_counts.summary(),
            "regions": len(test.regions),
            "seed": test_spec["seed"],
        },
        "darkness_baseline_f1": result.baseline["f1"],
        "train_f1": result.train_metrics["f1"],
        "data": spec,
        "config": asdict(cfg),
        "generate_seconds": round(generated, 2),
        "train_seconds": result.seconds,
        "timings": result.timings,
        "seconds": round(time.perf_counter() - started, 2),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "export_dir": str(result.export_dir) if result.export_dir else None,
    }


# --------------------------------------------------------------------------------------------
# Tumor model.


def validate_tumor(
    tiles_root: Path | str,
    work_dir: Path | str,
    *,
    model_root: Path | str | None = None,
    input_size: int = 64,
    steps_per_epoch: int = 40,
    epochs: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Train on the train split of a (synthetic) tiles root as production does (Ray Train),
    fit the slide cut points on the training slides and export; returns the run's own figures
    on the held-out validation slides (every tile of a synthetic slide: at most 32).

    Random init (no ImageNet weights offline), so the whole network trains from the first
    epoch with Adam (the seed's frozen-backbone head phase assumes pretrained features),
    cosine-decayed; a fixed number of epochs and no best-epoch selection: the held-out slides
    are only scored, never used to choose. `tumor_model_kappa` here is the argmax rule's,
    `tumor_model_kappa_calibrated` the exported cut points'; `make bench-training` reports the
    figures the scoring service gives (`bench/served.py`). `overrides` set any other
    `TumorTrainConfig` field. Recipes measured are in `bench/validate.py`.
    """
    shards = find_shards(tiles_root)
    config = TumorTrainConfig(
        input_size=input_size,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        head_epochs=0,
        finetune_epochs=epochs,
        unfreeze="all",
        finetune_optimizer="adam",
        finetune_lr=1e-3,
        lr_schedule="cosine",
        bn_momentum=0.9,
        early_stopping_patience=0,
        restore_best=False,
        calibrate=True,  # the export carries the cut points the scorer applies
        max_eval_tiles_per_slide=32,
        seed=seed,
        run_name=f"validate-{uuid.uuid4().hex[:8]}",
    )
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise TypeError(f"unknown TumorTrainConfig field {key!r}")
        setattr(config, key, value)
    result = train_tumor(config, shards, Path(model_root) if model_root else None, Path(work_dir))
    m, history = result.metrics, result.history
    return {
        "tumor_model_kappa": m["val_slide_kappa"],
        "tumor_model_kappa_calibrated": m.get("val_slide_kappa_calibrated"),
        "tumor_model_train_kappa_calibrated": m.get("train_slide_kappa_calibrated"),
        "tumor_model_slide_accuracy": m["val_slide_accuracy"],
        "tumor_model_slide_confusion": m["val_slide_confusion"],
        "tumor_model_spearman": m["val_slide_spearman"],
        "molecular_spearman": m.get("val_molecular_spearman"),
        "tumor_model_tile_accuracy": m["val_tile_accuracy"],
        "tumor_model_slides": m["val_slides"],
        "tumor_model_tiles": m["val_tiles"],
        "tumor_model_slide_cutpoints": m.get("slide_cutpoints"),
        "tumor_model_seconds": result.seconds,
        "tumor_model_train_seconds": round(sum(h["train_s"] for h in history), 1),
        "tumor_model_eval_seconds": round(sum(h["eval_s"] for h in history), 1),
        # The training worker's own CPU seconds (Ray Train runs it in another process).
        "tumor_model_worker_cpu_seconds": round(
            sum(h.get("train_cpu_s", 0.0) + h.get("eval_cpu_s", 0.0) for h in history), 1
        ),
        "tumor_model_train_img_s": history[-1]["steady_img_s"],
        "tumor_model_input_size": config.input_size,
        "tumor_model_epochs": len(history),
        "tumor_model_steps": config.steps_per_epoch * len(history),
        "tumor_model_batch_size": config.batch_size,
        "tumor_model_history": [_epoch_summary(h) for h in history],
        "tumor_model_export": str(result.export_path) if result.export_path else None,
        "tumor_model_skipped_shards": len(result.skipped_shards),
        "tumor_model_backend": result.backend,
    }


EPOCH_KEYS = (
    "epoch",
    "lr",
    "loss",
    "val_slide_kappa",
    "val_molecular_spearman",
    "train_s",
    "train_cpu_s",
    "steady_img_s",
    "eval_s",
)


def _epoch_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """One epoch's report, the learning curve and speed figures only."""
    return {
        k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k in EPOCH_KEYS
    }
