"""One training run from a `TrainRequest`: the code path shared by `prolifscore train` and the
training service, so both validate, train, export and describe a run the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prolifscore.core.models.architectures import WeightsError
from prolifscore.core.models.contract import MITOSIS_MODEL, TUMOR_MODEL
from prolifscore.core.runtime.validation import WEIGHTS_KEYWORDS, confine, validate_train_request
from prolifscore.training.config import TrainingSettings
from prolifscore.v1 import training_pb2 as tpb

# The "quick" profile: what `make demo` trains (minutes on 2 cores; the machinery, not accuracy).
QUICK_TUMOR: dict[str, Any] = {
    "head_epochs": 0,
    "finetune_epochs": 2,
    "unfreeze": "all",
    "steps_per_epoch": 12,
    "early_stopping_patience": 0,
    "restore_best": False,
    "max_eval_tiles_per_slide": 16,
}
QUICK_MITOSIS: dict[str, Any] = {"epochs": 3, "hard_negative_rounds": 0}


class TrainingFailed(Exception):
    """The request cannot train (bad data set, weights, options) or the run failed; nothing
    was exported."""


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def labelled_shards(dataset: str) -> list[Any]:
    """The labelled slides of a tiles root: a root shared with unlabelled slides (ingested
    for scoring) is normal, so those are left out rather than failing the run."""
    from prolifscore.training.data.shards import DatasetError, find_shards

    shards = find_shards(dataset, require_labels=False)
    labelled = [s for s in shards if s.tumor_score is not None]
    if shards and not labelled:
        raise DatasetError(f"no slide in {dataset} has a tumor score: nothing to train on")
    return labelled or shards


def check_request(request: tpb.TrainRequest, settings: TrainingSettings) -> tpb.TrainRequest:
    """The request with its fields validated and its dataset and weights paths resolved inside
    their roots (raises InvalidInput): the data set under the tiles root or PROLIF_DATA_ROOTS,
    a weights file under PROLIF_WEIGHTS_ROOTS or the runs root (earlier runs' checkpoints)."""
    validate_train_request(request, (TUMOR_MODEL, MITOSIS_MODEL))
    checked = tpb.TrainRequest()
    checked.CopyFrom(request)
    data_roots = (settings.runtime.tiles_root, *settings.data_roots)
    checked.dataset = str(
        confine("dataset", request.dataset, data_roots, "PROLIF_TILES_ROOT, PROLIF_DATA_ROOTS")
    )
    if request.weights.strip().lower() not in WEIGHTS_KEYWORDS:
        weights_roots = (*settings.weights_roots, settings.runs_root)
        where = "PROLIF_WEIGHTS_ROOTS, PROLIF_RUNS_ROOT"
        checked.weights = str(confine("weights", request.weights, weights_roots, where))
    return checked


def run_training(request: tpb.TrainRequest, settings: TrainingSettings) -> tpb.ModelPublished:
    """One run (raises InvalidInput for a request that breaks an input rule, TrainingFailed for
    one that cannot train)."""
    from prolifscore.training.data.shards import DatasetError
    from prolifscore.training.detector.config import MitosisTrainConfig
    from prolifscore.training.detector.regions import DatasetError as MitosisDatasetError
    from prolifscore.training.detector.train import train_mitosis
    from prolifscore.training.tumor.config import TrainingError, TumorTrainConfig
    from prolifscore.training.tumor.train import train_tumor

    request = check_request(request, settings)
    run_dir = Path(settings.runs_root) / (request.request_id or request.model)
    model_root = Path(settings.model_root)
    try:
        quick = request.profile == "quick"
        if request.model == TUMOR_MODEL:
            config = TumorTrainConfig(
                input_size=request.input_size or (64 if quick else 224),
                weights=request.weights or settings.weights,
                workers=request.workers or settings.workers,
                cpus_per_worker=settings.cpus_per_worker,
                **{
                    **(QUICK_TUMOR if quick else {}),
                    **({"finetune_epochs": request.epochs} if request.epochs else {}),
                },
            )
            result = train_tumor(
                config,
                labelled_shards(request.dataset),
                model_root,
                run_dir,
                ray_address=settings.runtime.ray_address,
            )
            path, metrics, fingerprint = (
                result.export_path,
                result.metrics,
                result.dataset_fingerprint,
            )
        elif request.model == MITOSIS_MODEL:
            mconfig = MitosisTrainConfig(
                **{
                    **(QUICK_MITOSIS if quick else {}),
                    **({"epochs": request.epochs} if request.epochs else {}),
                }
            )
            mresult = train_mitosis(mconfig, request.dataset, model_root)
            path, metrics, fingerprint = mresult.export_dir, mresult.metrics, mresult.fingerprint
        else:
            raise TrainingFailed(
                f"model must be {TUMOR_MODEL!r} or {MITOSIS_MODEL!r}, got {request.model!r}"
            )
    except (
        DatasetError,
        MitosisDatasetError,
        WeightsError,
        TrainingError,
        ValueError,
        FileNotFoundError,
    ) as exc:
        raise TrainingFailed(f"{type(exc).__name__}: {exc}") from exc
    if path is None:
        raise TrainingFailed("the run finished without an export")
    published = tpb.ModelPublished(
        model=request.model,
        version=int(Path(path).name),
        path=str(path),
        metrics=_numbers(metrics),
        dataset_fingerprint=fingerprint,
        trained=True,
        request_id=request.request_id,
    )
    published.time.GetCurrentTime()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(
        json.dumps({"path": str(path), "metrics": metrics}, default=str, indent=2)
    )
    return published
