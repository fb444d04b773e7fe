"""The local model server in tests: started in-process on free ports, and the client any TF
Serving user would write (the standard gRPC stubs, plain HTTP for the REST API)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from prolifscore.core.models.tensors import grpc_message_options
from prolifscore.core.runtime.settings import load
from prolifscore.modelserver.config import ModelServerSettings
from prolifscore.modelserver.server import ModelServer, serve


def tiles(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def predict_request(model: str, pixels: np.ndarray, **spec: object) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = int(value)  # type: ignore[call-overload]
        else:
            setattr(request.model_spec, key, value)
    request.inputs["tiles"].CopyFrom(tf.make_tensor_proto(pixels))
    return request


class Client:
    """The stubs any TF Serving user would write, with large message limits, and the REST API
    on `rest_port`."""

    def __init__(self, port: int, rest_port: int = 0) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_message_options(256))
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.rest_port = rest_port

    def run(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        return self.predict.Predict(request, timeout=60)

    def code(self, call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            call()
        return info.value.code(), info.value.details()  # type: ignore[attr-defined]

    def status(self, name: str) -> dict[int, int]:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        response = self.models.GetModelStatus(request, timeout=10)
        return {s.version: s.state for s in response.model_version_status}

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(HTTP code, parsed JSON body, or the text when it is not JSON)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.rest_port}{path}",
            data=data.encode() if isinstance(data, str) else data,
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                code, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            code, text = exc.code, exc.read().decode()
        try:
            return code, json.loads(text)
        except json.JSONDecodeError:
            return code, text


def start_server(root: Path, **overrides: object) -> tuple[ModelServer, Client]:
    settings = load(
        ModelServerSettings,
        environ={},
        model_root=root,
        port=0,
        rest_port=0,
        poll_s=0.2,
        **overrides,
    )
    server, port = serve(settings)
    return server, Client(port, server.rest_port)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
