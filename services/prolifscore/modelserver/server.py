"""Local model server: TensorFlow Serving's gRPC API over a TF Serving model root.

The embedded default stands in for the `tensorflow/serving` container, which cannot be
installed here; clients must not be able to tell the two apart. The pieces: `repository` (model
config, version policy and labels, versions on disk), `manager` (polling, load / unload,
resolving a ModelSpec, version status), `servable` (one loaded version: Predict with TF
Serving's checks and messages), `warmup` (replaying the export's warm-up records), `batching`
(server-side batching with TF Serving's parameters), `servicers` (the gRPC services), `rest` and
`json_tensor` (the REST API). Entry point: `prolifscore-modelserver`.
"""

from __future__ import annotations

import dataclasses
import logging

from tensorflow_serving.apis import (
    model_service_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from prolifscore.core.models.precision import apply_precision
from prolifscore.core.models.tensors import grpc_message_options
from prolifscore.core.runtime import tracing
from prolifscore.core.runtime.logs import setup_logging
from prolifscore.core.runtime.service import ServiceRuntime
from prolifscore.core.runtime.settings import load
from prolifscore.modelserver.batching import BatchScheduler, read_batching_parameters
from prolifscore.modelserver.config import NAME, ModelServerSettings
from prolifscore.modelserver.manager import ModelManager
from prolifscore.modelserver.rest import RestServer
from prolifscore.modelserver.servicers import ModelService, PredictionService

log = logging.getLogger(__name__)
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]


def batch_scheduler(settings: ModelServerSettings) -> BatchScheduler | None:
    """TF Serving's --enable_batching / --batching_parameters_file, read at start-up."""
    if not settings.batching:
        if settings.batching_config is not None:
            raise ValueError(
                "PROLIF_MODEL_SERVER_BATCHING_CONFIG is set without setting "
                "PROLIF_MODEL_SERVER_BATCHING to true (TF Serving: --batching_parameters_file "
                "needs --enable_batching)"
            )
        return None
    options = read_batching_parameters(settings.batching_config)
    log.info("batching", extra=dataclasses.asdict(options))
    return BatchScheduler(options)


class ModelServer:
    """The running server: gRPC runtime (one port), REST API (another), model manager with its
    poll thread, and the batch threads when batching is on."""

    def __init__(self, settings: ModelServerSettings) -> None:
        self.settings = settings
        # Before any version loads: the precision is a process-wide TensorFlow option.
        self.bf16 = apply_precision(settings.precision)
        self.batcher = batch_scheduler(settings)
        self.manager = ModelManager(
            settings.model_root,
            settings.model_config,
            warmup=settings.warmup,
            warmup_iterations=settings.warmup_iterations,
            batcher=self.batcher,
        )
        runtime_settings = dataclasses.replace(settings.runtime, grpc_port=settings.port)
        self.runtime = ServiceRuntime(
            NAME,
            runtime_settings,
            grpc_options=grpc_message_options(settings.max_message_mb),
            max_workers=settings.workers,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self.manager), self.runtime.server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self.manager), self.runtime.server
        )
        self.runtime.add_service(PREDICTION_SERVICE.full_name)
        self.runtime.add_service(MODEL_SERVICE.full_name)
        self.port = 0
        self.rest: RestServer | None = None

    @property
    def rest_port(self) -> int:
        return self.rest.port if self.rest is not None else 0

    def start(self) -> ModelServer:
        self.manager.start(self.settings.poll_s)
        self.runtime.start()
        self.port = self.runtime.port
        host = self.settings.runtime.bind_host
        if self.settings.rest_port >= 0:
            self.rest = RestServer(
                self.manager, host, self.settings.rest_port, self.settings.max_message_mb
            ).start()
        self.runtime.set_serving(True)
        log.info(
            "model server ready",
            extra={
                "address": f"{host}:{self.port}",
                "rest": f"{host}:{self.rest_port}" if self.rest else "off",
                "batching": self.batcher is not None,
                "precision": "bf16" if self.bf16 else "fp32",
                "model_root": str(self.settings.model_root),
                "models": {n: sorted(v) for n, v in self.manager.served.items()},
            },
        )
        return self

    def stop(self) -> None:
        self.runtime.set_serving(False)
        if self.rest is not None:
            self.rest.stop()
        self.manager.stop()
        self.runtime.stop()
        if self.batcher is not None:
            self.batcher.stop()


def serve(settings: ModelServerSettings) -> tuple[ModelServer, int]:
    """Load the initial versions, then serve; returns the server and its bound port."""
    server = ModelServer(settings).start()
    return server, server.port


def main() -> None:
    settings = load(ModelServerSettings)
    setup_logging(NAME, settings.runtime.log_level)
    tracing.setup(NAME, settings.runtime.tracing)  # before the runtime: its calls get spans
    server, _ = serve(settings)
    server.runtime.serve_until_stopped()
    server.stop()


if __name__ == "__main__":
    main()
