"""Talking to the model server through the TensorFlow Serving API (so the production
`tensorflow/serving` container and the local stand-in are interchangeable), plus an
in-process variant for `prolifscore score --local`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from prolifscore.core.models.contract import INPUT, SIGNATURE
from prolifscore.core.models.export import complete_versions
from prolifscore.core.models.tensors import (
    from_tensor_proto,
    grpc_message_options,
    to_tensor_proto,
)
from prolifscore.core.runtime.tls import TLSFiles, open_channel

log = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class ModelUnavailable(Exception):
    """The model server cannot be reached (after retries)."""


class ModelError(Exception):
    """The model server answered with an error (unknown model, bad input, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Models(Protocol):
    def predict(
        self,
        model: str,
        tiles: np.ndarray,
        output: str,
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[np.ndarray, int]:
        """(output array, model version that produced it); `label` names a version label
        (ModelSpec.version_label), empty for the newest version."""
        ...

    def predict_many(
        self,
        model: str,
        tiles: np.ndarray,
        outputs: Sequence[str],
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[dict[str, np.ndarray], int]:
        """Several outputs of one call: {output: array}, and the version."""
        ...

    def close(self) -> None: ...


class _OneOutput:
    """`predict` as the one-output case of the subclass's `predict_many`."""

    def predict_many(
        self,
        model: str,
        tiles: np.ndarray,
        outputs: Sequence[str],
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[dict[str, np.ndarray], int]:
        raise NotImplementedError

    def predict(
        self,
        model: str,
        tiles: np.ndarray,
        output: str,
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[np.ndarray, int]:
        outputs, version = self.predict_many(model, tiles, (output,), timeout, label)
        return outputs[output], version


class PredictionClient(_OneOutput):
    """PredictionService client with retries and backoff on UNAVAILABLE."""

    def __init__(
        self,
        address: str,
        *,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_message_mb: int = 256,
        tls: TLSFiles | None = None,
    ) -> None:
        """`tls`: the PROLIF_TLS_* settings (`RuntimeSettings`); with a CA the channel is TLS,
        mutual when they name a certificate (`core.runtime.tls`). None = plaintext."""
        self.address = address
        self.retries = retries
        self.backoff_s = backoff_s
        self._channel = open_channel(address, tls, grpc_message_options(max_message_mb))
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def predict_many(
        self,
        model: str,
        tiles: np.ndarray,
        outputs: Sequence[str],
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[dict[str, np.ndarray], int]:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = SIGNATURE
        if label:
            request.model_spec.version_label = label
        request.inputs[INPUT].CopyFrom(to_tensor_proto(tiles))
        request.output_filter.extend(outputs)
        delay = self.backoff_s
        # `timeout` is what is left of the caller's deadline: it bounds every attempt and the
        # backoff between them, so retrying never outlives the request it serves.
        end = None if timeout is None else time.monotonic() + timeout
        for attempt in range(self.retries + 1):
            remaining = None if end is None else max(end - time.monotonic(), 0.001)
            try:
                response = self._stub.Predict(request, timeout=remaining)
                arrays = {name: from_tensor_proto(response.outputs[name]) for name in outputs}
                return arrays, response.model_spec.version.value
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code not in _RETRYABLE:
                    raise ModelError(code, f"model server {self.address}: {exc.details()}") from exc  # type: ignore[attr-defined]
                out_of_time = end is not None and end - time.monotonic() <= delay
                if attempt == self.retries or out_of_time:
                    why = ", the deadline leaves no time to retry" if out_of_time else ""
                    raise ModelUnavailable(
                        f"model server {self.address} unavailable after {attempt + 1} "
                        f"attempts{why}: {exc.details()}"  # type: ignore[attr-defined]
                    ) from exc
                log.warning(
                    "model server unavailable, retrying",
                    extra={"address": self.address, "in_s": delay},
                )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()


class InProcessModels(_OneOutput):
    """Loads the newest version of each model from a TF Serving model root and calls its
    serving signature directly: the same contract, without any server."""

    def __init__(self, model_root: Path) -> None:
        self.model_root = Path(model_root)
        self._loaded: dict[str, tuple[int, object]] = {}

    def _signature(self, model: str) -> tuple[int, object]:
        if model not in self._loaded:
            import tensorflow as tf

            versions = complete_versions(self.model_root / model)
            if not versions:
                raise ModelError(
                    grpc.StatusCode.NOT_FOUND, f"no version of {model} under {self.model_root}"
                )
            loaded = tf.saved_model.load(str(self.model_root / model / str(versions[-1])))
            self._loaded[model] = (versions[-1], loaded.signatures[SIGNATURE])
        return self._loaded[model]

    def predict_many(
        self,
        model: str,
        tiles: np.ndarray,
        outputs: Sequence[str],
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[dict[str, np.ndarray], int]:
        import tensorflow as tf

        if label:
            raise ModelError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"version label {label!r} of {model}: labels need a model server (the model "
                "config maps them); in-process scoring loads the newest version",
            )
        version, fn = self._signature(model)
        out = fn(**{INPUT: tf.constant(tiles)})  # type: ignore[operator]
        return {name: out[name].numpy() for name in outputs}, version

    def close(self) -> None:
        self._loaded.clear()
