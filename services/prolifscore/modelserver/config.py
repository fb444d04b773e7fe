"""Model server settings (environment variables, documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prolifscore.core.runtime.settings import RuntimeSettings, env, nested

NAME = "modelserver"  # the service's name in logs and metrics


@dataclass(frozen=True)
class ModelServerSettings:
    """The model server's own port replaces PROLIF_GRPC_PORT: it serves PredictionService,
    ModelService, health and reflection on one port, TF Serving's 8500 by default."""

    runtime: RuntimeSettings = nested(RuntimeSettings)
    model_root: Path = env(
        "PROLIF_MODEL_ROOT", Path("data/models"), "Model root: <model>/<version>/saved_model.pb"
    )
    model_config: Path | None = env(
        "PROLIF_MODEL_CONFIG",
        None,
        "TF Serving model config file (text ModelServerConfig; relative base_path = under the "
        "model root). Empty: serve every folder under the root, latest version",
    )
    port: int = env(
        "PROLIF_MODEL_SERVER_PORT", 8500, "Model server gRPC port (TF Serving's; 0 = any free)"
    )
    rest_port: int = env(
        "PROLIF_MODEL_SERVER_REST_PORT",
        8501,
        "Model server REST API port (TF Serving's --rest_api_port; 0 = any free, -1 = no REST)",
    )
    poll_s: float = env(
        "PROLIF_MODEL_SERVER_POLL_S",
        2.0,
        "Seconds between scans for new/removed versions and config changes",
    )
    max_message_mb: int = env(
        "PROLIF_MODEL_SERVER_MAX_MESSAGE_MB", 256, "Largest gRPC message received or sent"
    )
    workers: int = env("PROLIF_MODEL_SERVER_WORKERS", 8, "gRPC worker threads")
    warmup: bool = env(
        "PROLIF_MODEL_SERVER_WARMUP",
        True,
        "Replay each version's assets.extra/tf_serving_warmup_requests before it serves "
        "(TF Serving's --enable_model_warmup)",
    )
    warmup_iterations: int = env(
        "PROLIF_MODEL_SERVER_WARMUP_ITERATIONS",
        1,
        "Times each warm-up record is replayed (TF Serving's --num_request_iterations_for_warmup)",
    )
    batching: bool = env(
        "PROLIF_MODEL_SERVER_BATCHING",
        False,
        "Server-side batching: concurrent Predicts on one model version share model calls "
        "(TF Serving's --enable_batching)",
    )
    batching_config: Path | None = env(
        "PROLIF_MODEL_SERVER_BATCHING_CONFIG",
        None,
        "TF Serving BatchingParameters file (--batching_parameters_file, e.g. "
        "k8s/base/config/batching.config; needs PROLIF_MODEL_SERVER_BATCHING); empty: TF "
        "Serving's defaults",
    )
    precision: str = env(
        "PROLIF_MODEL_PRECISION",
        "fp32",
        "Model execution precision on CPU: fp32, or bf16 (oneDNN auto mixed precision on "
        "AVX-512 BF16 / AMX CPUs; TF Serving's --mixed_precision=bfloat16)",
    )
