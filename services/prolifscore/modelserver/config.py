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
        "PROLIF_MODEL_SERVER_WARMUP", True, "Run one tiny request per signature after a load"
    )
