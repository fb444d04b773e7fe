"""Training service: starts a run per `prolif.train.requests` message and announces each new
model version on `prolif.models`. Entry point: `prolifscore-training`.

A run takes minutes to hours, so this consumer takes one request per poll and tolerates long
gaps between polls; a redelivered request finds its run's result on disk and republishes it
instead of training again.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from prolifscore.core.runtime import metrics, tracing
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.failures import give_up
from prolifscore.core.runtime.service import KafkaWork, ServiceRuntime, configure, run_service
from prolifscore.core.runtime.validation import InvalidInput, carried_id, check_id, clip
from prolifscore.core.wsi.tfrecord import write_atomic
from prolifscore.training.config import TrainingSettings
from prolifscore.training.runner import TrainingFailed, run_training
from prolifscore.v1 import training_pb2 as tpb

log = logging.getLogger(__name__)
NAME = "training"
LONG_POLL_MS = 6 * 3600 * 1000


class TrainingService:
    def __init__(self, settings: TrainingSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus

    def result_path(self, request_id: str) -> Path:
        return Path(self.settings.runs_root) / request_id / "published.json"

    def handle(self, items: list[tuple[Any, tpb.TrainRequest]]) -> None:
        for record, request in items:
            if not request.request_id:
                request.request_id = f"{record.topic}-{record.partition}-{record.offset}"
            with tracing.current(tracing.start_consumer("train model", record)):
                published = self._handle_one(record, request)
                self.bus.publish(self.settings.topic_models, published.model, published)

    def _handle_one(self, record: Any, request: tpb.TrainRequest) -> tpb.ModelPublished:
        """The request's announcement: stored from an earlier delivery, or of a new run."""
        try:
            check_id("request_id", request.request_id)  # it names the run's folder
        except InvalidInput as exc:
            return self._failed(record, request, str(exc))
        path = self.result_path(request.request_id)
        if path.exists():
            return json_format.Parse(path.read_text(), tpb.ModelPublished())
        published = self._run(record, request)
        write_atomic(path, json_format.MessageToJson(published).encode())
        return published

    def _run(self, record: Any, request: tpb.TrainRequest) -> tpb.ModelPublished:
        try:
            with metrics.DURATION.labels(NAME, "run").time():
                published = run_training(request, self.settings)
            metrics.SLIDES.labels(NAME, "trained").inc()
            return published
        except Exception as exc:
            # Reported and dead-lettered, never retried in a loop: a run that failed once (bad
            # request, bug, lost worker) is resubmitted under a new id.
            if isinstance(exc, (TrainingFailed, InvalidInput)):
                error = clip(str(exc))
                log.warning(
                    "training failed", extra={"request_id": request.request_id, "error": error}
                )
            else:
                error = clip(f"internal error: {type(exc).__name__}: {exc}")
                log.exception("training crashed", extra={"request_id": request.request_id})
            return self._failed(record, request, error)

    def _failed(self, record: Any, request: tpb.TrainRequest, error: str) -> tpb.ModelPublished:
        """The run's error announcement and dead letter, repeating only fields that are valid
        ids (a rejected request id is not repeated, and nothing is stored under it)."""
        published = tpb.ModelPublished(
            model=carried_id(request.model), request_id=carried_id(request.request_id), error=error
        )
        published.time.GetCurrentTime()
        give_up(self.bus, record, error, "run")
        return published


def main() -> None:
    settings = configure(NAME, TrainingSettings)
    kafka = dataclasses.replace(  # one run per poll, and hours allowed between polls
        settings.kafka,
        max_poll_records=1,
        max_poll_interval_ms=max(settings.kafka.max_poll_interval_ms, LONG_POLL_MS),
    )
    work = KafkaWork(
        kafka,
        consume=settings.topic_requests,
        produce=[settings.topic_models],
        group_id=settings.group_id,
        msg_type=tpb.TrainRequest,
        handler=lambda bus: TrainingService(settings, bus).handle,
    )
    run_service(ServiceRuntime(NAME, settings.runtime), work)


if __name__ == "__main__":
    main()
