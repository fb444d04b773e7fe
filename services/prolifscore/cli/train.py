"""`prolifscore train` and `prolifscore evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

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
    e = sub.add_parser("evaluate", help="TUPAC16 metrics of predictions against ground truth")
    e.add_argument("--predictions", type=Path, required=True)
    e.add_argument("--ground-truth", type=Path, required=True)
    e.set_defaults(func=run_evaluate)


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
    from prolifscore.core.grading.evaluation import evaluate_predictions

    try:
        result = evaluate_predictions(args.predictions, args.ground_truth)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=float))
    return 0
