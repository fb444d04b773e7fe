"""`prolifscore train` and `prolifscore evaluate`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from prolifscore.core.runtime.validation import WEIGHTS_KEYWORDS
from prolifscore.v1 import training_pb2 as tpb

if TYPE_CHECKING:
    from prolifscore.training.config import TrainingSettings


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train and export a model (a Job / RayJob in Kubernetes)")
    p.add_argument("model", choices=["resnet50", "mitosis"])
    p.add_argument("--dataset", required=True, help="tiles root (resnet50) or mitosis data folder")
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers (default: settings)")
    p.add_argument(
        "--epochs", type=int, default=0, help="resnet50: fine-tuning epochs; mitosis: epochs"
    )
    p.add_argument("--input-size", type=int, default=0, help="resnet50 input size (default 224)")
    p.add_argument("--weights", default="", help="resnet50 start weights: path, none or imagenet")
    p.add_argument("--run-id", default="", help="run folder name (reuse it to resume)")
    p.add_argument("--profile", choices=["quick"], help="quick: a minutes-long machinery run")
    p.add_argument(
        "--publish",
        action="store_true",
        help="announce the outcome on the models topic (ModelPublished) like the training service",
    )
    p.set_defaults(func=run_train)
    e = sub.add_parser(
        "evaluate",
        help="TUPAC16 metrics of predictions and detections against ground truth",
        description=(
            "TUPAC16 tasks 1 and 2 (quadratic weighted kappa over classes 1-3, Spearman with "
            "average ranks) from --predictions against --ground-truth, and task 3 (mitosis "
            "F1, a detection within 30 px at 0.25 um/px of an unclaimed centroid) from "
            "--detections against --mitosis-ground-truth. Prints one JSON object (tasks 1-2 "
            "at the top level, task 3 under 'mitosis'). Exit 0 when scored (missing "
            "predictions are listed under 'errors' and on stderr), 1 when a file cannot be "
            "evaluated or --missing fail finds a missing prediction, 2 on usage errors. "
            "File formats: core/grading/submission.py."
        ),
    )
    e.add_argument("--predictions", type=Path, help="tasks 1-2: predictions CSV")
    e.add_argument("--ground-truth", type=Path, help="tasks 1-2: ground-truth CSV")
    e.add_argument(
        "--detections",
        type=Path,
        help="task 3: CSV with case,region,row,col[,confidence] or a <case>/<region>.csv folder",
    )
    e.add_argument(
        "--mitosis-ground-truth", type=Path, help="task 3: folder of <case>/<region>.csv row,col"
    )
    e.add_argument(
        "--threshold", type=float, help="task 3: count detections with confidence above this"
    )
    e.add_argument(
        "--mpp",
        type=float,
        default=0.25,
        help="task 3: um per pixel of the coordinates (the 30 px radius is at 0.25)",
    )
    e.add_argument(
        "--missing",
        choices=["skip", "fail"],
        default="skip",
        help="a slide or region without a prediction: skip = leave out and list it (default), "
        "fail = score nothing and exit 1",
    )
    e.set_defaults(func=run_evaluate, parser=e)


def train_request(
    model: str,
    dataset: Path | str,
    *,
    run_id: str = "",
    workers: int = 0,
    epochs: int = 0,
    input_size: int = 0,
    weights: str = "",
    profile: str = "",
) -> tpb.TrainRequest:
    """A training request as `train` runs it here or the training service runs it from
    prolif.train.requests; 0 or empty means the settings' (or the profile's) value. Paths
    are made absolute here, where they were typed."""
    keyword = weights.strip().lower() in WEIGHTS_KEYWORDS
    return tpb.TrainRequest(
        request_id=run_id or f"{model}-{uuid.uuid4().hex[:8]}",
        model=model,
        dataset=str(Path(dataset).resolve()),
        workers=workers,
        epochs=epochs,
        input_size=input_size,
        weights=weights if keyword else str(Path(weights).resolve()),
        profile=profile,
    )


def run_train(args: argparse.Namespace) -> int:
    from prolifscore.core.runtime.logs import setup_logging
    from prolifscore.core.runtime.ray import init_ray
    from prolifscore.core.runtime.settings import load
    from prolifscore.core.runtime.validation import InvalidInput
    from prolifscore.training.config import TrainingSettings
    from prolifscore.training.runner import TrainingFailed, check_request, run_training

    settings = load(TrainingSettings)
    setup_logging("train", settings.runtime.log_level)
    request = train_request(
        args.model,
        args.dataset,
        run_id=args.run_id,
        workers=args.workers,
        epochs=args.epochs,
        input_size=args.input_size,
        weights=args.weights,
        profile=args.profile or "",
    )
    try:
        request = check_request(request, settings)
    except InvalidInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray(settings.runtime.ray_address, settings.runtime.ray_num_cpus)
    try:
        published = run_training(request, settings)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.publish:
            failed = tpb.ModelPublished(
                model=args.model, request_id=request.request_id, error=str(exc)
            )
            failed.time.GetCurrentTime()
            _publish(failed, settings)
        return 1
    print(json.dumps(json_format.MessageToDict(published)))
    if args.publish:
        _publish(published, settings)
    return 0


def _publish(published: tpb.ModelPublished, settings: TrainingSettings) -> None:
    """Announce a run like the training service does, so that a model trained by a Kubernetes
    Job or RayJob reaches the same listeners as one trained from a TrainRequest."""
    from prolifscore.core.runtime.bus import Bus

    bus = Bus(settings.kafka, "train")
    try:
        bus.publish(settings.topic_models, published.model, published)
        bus.flush()
    finally:
        bus.close()


def run_evaluate(args: argparse.Namespace) -> int:
    from prolifscore.core.grading.matching import match_radius_px
    from prolifscore.core.grading.submission import (
        evaluate_detection_files,
        evaluate_predictions,
    )

    slides = (args.predictions, args.ground_truth)
    regions = (args.detections, args.mitosis_ground_truth)
    if (None in slides and slides != (None, None)) or (None in regions and regions != (None, None)):
        args.parser.error(
            "give --predictions with --ground-truth, --detections with --mitosis-ground-truth"
        )
    if slides == (None, None) and regions == (None, None):
        args.parser.error(
            "nothing to evaluate: give --predictions/--ground-truth and/or "
            "--detections/--mitosis-ground-truth"
        )
    result: dict[str, Any] = {}
    errors: list[str] = []
    try:
        if args.predictions is not None:
            result.update(evaluate_predictions(*slides, missing=args.missing))
            errors += result["errors"]
        if args.detections is not None:
            result["mitosis"] = evaluate_detection_files(
                *regions,
                radius_px=match_radius_px(args.mpp),
                threshold=args.threshold,
                missing=args.missing,
            )
            errors += result["mitosis"]["errors"]
    except (ValueError, OSError) as exc:  # EvaluationError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for message in errors:
        print(f"warning: left out, {message}", file=sys.stderr)
    print(json.dumps(_finite(result), allow_nan=False))
    return 0


def _finite(value: object) -> object:
    """NaN (an undefined metric, e.g. kappa when both sides use one class) -> null: JSON has
    no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
