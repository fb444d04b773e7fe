"""Warm-up replays the export's assets.extra/tf_serving_warmup_requests as TF Serving does: each
record `num_request_iterations` times before the version serves; no file, no warm-up; a broken
file or record fails the load with TF Serving's error while the previous version keeps
serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import (  # noqa: E402
    get_model_status_pb2,
    predict_pb2,
    prediction_log_pb2,
)

from prolifscore.core.models.export import WARMUP_FILE, export_untrained  # noqa: E402
from prolifscore.core.models.tensors import to_tensor_proto  # noqa: E402
from prolifscore.core.wsi.tfrecord import frame  # noqa: E402
from tests.modelserving import predict_request, start_server, tiles, wait_for  # noqa: E402

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def _record(pixels: np.ndarray) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mitosis"
    request.inputs["tiles"].CopyFrom(to_tensor_proto(pixels))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return frame(log.SerializeToString())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exported mitosis version (with the export's own warm-up records), copied per test."""
    root = tmp_path_factory.mktemp("export")
    export_untrained(root, "mitosis")
    return root / "mitosis" / "1"


def _root(tmp_path: Path, exported: Path, versions: dict[int, bytes | None]) -> Path:
    """A model root with the exported version at each number, its warm-up file replaced by the
    given bytes (None: no file)."""
    for version, warmup in versions.items():
        target = tmp_path / "mitosis" / str(version)
        shutil.copytree(exported, target)
        (target / WARMUP_FILE).unlink()
        if warmup is not None:
            (target / WARMUP_FILE).write_bytes(warmup)
    return tmp_path


def test_the_exports_records_are_replayed(tmp_path: Path, exported: Path) -> None:
    shutil.copytree(exported, tmp_path / "mitosis" / "1")
    server, _ = start_server(tmp_path)
    try:
        assert server.manager.served["mitosis"][1].model_calls == 1  # export writes one record
    finally:
        server.stop()


def test_each_record_replayed_num_request_iterations_times(tmp_path: Path, exported: Path) -> None:
    records = b"".join(_record(tiles(n, 16 * n, 16)) for n in (1, 2, 3))
    server, client = start_server(_root(tmp_path, exported, {1: records}), warmup_iterations=2)
    try:
        assert server.manager.served["mitosis"][1].model_calls == 6
        assert client.status("mitosis") == {1: AVAILABLE}
    finally:
        server.stop()


def test_no_warmup_file_no_warmup(tmp_path: Path, exported: Path) -> None:
    server, client = start_server(_root(tmp_path, exported, {1: None}))
    try:
        assert server.manager.served["mitosis"][1].model_calls == 0
        assert (
            client.run(predict_request("mitosis", tiles(1, 16, 16))).model_spec.version.value == 1
        )
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("warmup", "code", "message"),
    [
        (
            b"plain text, not a TFRecord file",
            "DATA_LOSS",
            "corrupted record at 0 (Is this even a TFRecord file?). Please verify your warmup "
            "data is in TFRecord format.",
        ),
        (frame(b"\x0a\x05ab"), "INVALID_ARGUMENT", "Failed to parse warmup record: "),
        (
            _record(tiles(1, 8, 8).astype(np.float32)),  # the records really run: dtype checked
            "INVALID_ARGUMENT",
            "Expects arg[0] to be uint8 but float is provided",
        ),
        (
            _record(tiles(1, 8, 8)) * 1001,
            "INVALID_ARGUMENT",
            "Number of warmup records exceeds the maximum (1000) at ",
        ),
    ],
)
def test_a_broken_warmup_fails_the_load(
    tmp_path: Path, exported: Path, warmup: bytes, code: str, message: str
) -> None:
    """Version 2's load fails with TF Serving's status; version 1 keeps serving."""
    server, client = start_server(_root(tmp_path, exported, {1: None, 2: warmup}))
    try:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "mitosis"
        wait_for(lambda: client.status("mitosis").get(2) == END)
        statuses = client.models.GetModelStatus(request, timeout=10).model_version_status
        failed = next(s for s in statuses if s.version == 2)
        assert failed.status.error_message.startswith(
            "Loading servable: {name: mitosis version: 2} failed: "
        )
        assert message in failed.status.error_message
        assert failed.status.error_code == grpc.StatusCode[code].value[0]
        assert (
            client.run(predict_request("mitosis", tiles(1, 16, 16))).model_spec.version.value == 1
        )
    finally:
        server.stop()
