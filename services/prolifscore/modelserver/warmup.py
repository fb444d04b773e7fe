"""Warm-up as TF Serving does it (`--enable_model_warmup`, `saved_model_warmup_util.cc`): when a
version loads, replay the PredictionLog records its export ships in
`assets.extra/tf_serving_warmup_requests` (a TFRecord file), each `num_request_iterations`
times (default 1), before the version serves, so the first client does not pay for graph
set-up. No file: no warm-up. An unreadable file or a failing record fails the load, with TF
Serving's messages; more than 1000 records is an error too."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.python.lib.io.tf_record import tf_record_iterator
from tensorflow.python.util import deprecation
from tensorflow_serving.apis import prediction_log_pb2

from prolifscore.core.models.export import WARMUP_FILE
from prolifscore.modelserver.errors import ServingError
from prolifscore.modelserver.servable import DEFAULT_SIGNATURE, Servable

log = logging.getLogger(__name__)
MAX_RECORDS = 1000  # TF Serving's WarmupConsts::kMaxNumRecords


def warmup_path(version_dir: Path) -> Path:
    return version_dir / WARMUP_FILE


def replay_warmup(servable: Servable, iterations: int = 1) -> int:
    """Replay the version's warm-up records; returns how many records were read."""
    path = warmup_path(servable.path)
    if not path.is_file():
        log.info("no warm-up data file", extra={"model": servable.name, "path": str(path)})
        return 0
    started = time.perf_counter()
    count = 0
    try:
        for record in _records(path):
            entry = prediction_log_pb2.PredictionLog()
            try:
                entry.ParseFromString(record)
            except DecodeError as exc:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Failed to parse warmup record: {record!r} from {path}",
                ) from exc
            for _ in range(max(iterations, 1)):
                _run(servable, entry)
            count += 1
            if count > MAX_RECORDS:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}",
                )
    except tf.errors.DataLossError as exc:
        raise ServingError(
            grpc.StatusCode.DATA_LOSS,
            f"{exc.message}. Please verify your warmup data is in TFRecord format.",
        ) from exc
    log.info(
        "warm-up replayed",
        extra={
            "model": servable.name,
            "version": servable.version,
            "records": count,
            "warmup_s": round(time.perf_counter() - started, 3),
        },
    )
    return count


def _records(path: Path) -> Iterator[bytes]:
    """TensorFlow's own TFRecord reader (TF Serving's errors); it is deprecated for training
    input pipelines only."""
    with deprecation.silence():
        yield from tf_record_iterator(str(path))


def _run(servable: Servable, entry: prediction_log_pb2.PredictionLog) -> None:
    """One record: Predict logs run through the servable's Predict path (our signatures are
    predict signatures); the other kinds cannot be replayed here."""
    kind = entry.WhichOneof("log_type")
    if kind == "predict_log":
        request = entry.predict_log.request
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        servable.predict(request, signature, batched=False)  # no wait for a batch timeout
        return
    if kind is None:  # TF Serving skips a record without a log
        return
    raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}")
