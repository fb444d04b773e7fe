"""TF Serving's gRPC services over the model manager: PredictionService (Predict,
GetModelMetadata) and ModelService (GetModelStatus, HandleReloadConfigRequest).

The operations are plain functions (request proto in, response proto out, ServingError on
failure) that the REST API calls as well, as TF Serving's REST handler calls its gRPC impls."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from prolifscore.core.runtime import metrics
from prolifscore.modelserver.config import NAME
from prolifscore.modelserver.errors import ServingError
from prolifscore.modelserver.manager import ModelManager
from prolifscore.modelserver.servable import DEFAULT_SIGNATURE

R = TypeVar("R")


def _answers_serving_errors(method: Callable[..., R]) -> Callable[..., R]:
    """A ServingError raised by `method` becomes the call's status (counted as a failure)."""

    @functools.wraps(method)
    def call(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except ServingError as exc:
            metrics.FAILURES.labels(NAME, exc.code.name.lower()).inc()
            context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises

    return call


def _model_spec(request: Any) -> Any:
    """The request's ModelSpec, which every call of these services needs."""
    if not request.HasField("model_spec"):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    return request.model_spec


def predict(
    manager: ModelManager, request: predict_pb2.PredictRequest
) -> predict_pb2.PredictResponse:
    with metrics.DURATION.labels(NAME, "predict").time():
        servable = manager.resolve(_model_spec(request))
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        outputs = servable.predict(request, signature)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for alias, array in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(array))
        return response


def model_metadata(
    manager: ModelManager, request: get_model_metadata_pb2.GetModelMetadataRequest
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    spec = _model_spec(request)
    if not request.metadata_field:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "GetModelMetadataRequest must specify at least one metadata_field",
        )
    for name in request.metadata_field:
        if name != "signature_def":
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {name} is not supported"
            )
    servable = manager.resolve(spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(sig)
    response.metadata["signature_def"].Pack(sig_map)
    return response


def model_status(
    manager: ModelManager, request: get_model_status_pb2.GetModelStatusRequest
) -> get_model_status_pb2.GetModelStatusResponse:
    """Every version's state, or one version's; a version label is ignored (all versions), as
    in TF Serving's GetModelStatusImpl."""
    spec = _model_spec(request)
    version = spec.version.value if spec.HasField("version") else None
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state in manager.states.status(spec.name, version):
        response.model_version_status.add(
            version=number,
            state=state.state,
            status=status_pb2.StatusProto(error_code=state.code, error_message=state.error),
        )
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify / Regress / MultiInference stay UNIMPLEMENTED
    (our signatures are predict signatures)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    @_answers_serving_errors
    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        return predict(self.manager, request)

    @_answers_serving_errors
    def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.ServicerContext,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return model_metadata(self.manager, request)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus (per-version state) and HandleReloadConfigRequest."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    @_answers_serving_errors
    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return model_status(self.manager, request)

    @_answers_serving_errors
    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        try:
            self.manager.reload_config(request.config)
        except ValueError as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())
