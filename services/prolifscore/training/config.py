"""Training service settings (environment variables, documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prolifscore.core.runtime.settings import KafkaSettings, RuntimeSettings, env, nested


@dataclass(frozen=True)
class TrainingSettings:
    kafka: KafkaSettings = nested(KafkaSettings)
    runtime: RuntimeSettings = nested(RuntimeSettings)
    model_root: Path = env(
        "PROLIF_MODEL_ROOT", Path("data/models"), "Model root: <model>/<version>/saved_model.pb"
    )
    runs_root: Path = env(
        "PROLIF_RUNS_ROOT", Path("data/runs"), "Training runs: checkpoints, TensorBoard logs"
    )
    data_roots: tuple[Path, ...] = env(
        "PROLIF_DATA_ROOTS",
        (Path("data"),),
        "Folders a training request's dataset may lie in, besides PROLIF_TILES_ROOT",
    )
    weights_roots: tuple[Path, ...] = env(
        "PROLIF_WEIGHTS_ROOTS",
        (Path("data/weights"),),
        "Folders a training request's weights file may lie in, besides PROLIF_RUNS_ROOT",
    )
    workers: int = env("PROLIF_TRAIN_WORKERS", 1, "Ray Train workers per run")
    cpus_per_worker: int = env(
        "PROLIF_TRAIN_CPUS_PER_WORKER",
        1,
        "Ray CPUs each training worker reserves (the cluster is shared with the services)",
    )
    weights: str = env(
        "PROLIF_TRAIN_WEIGHTS", "none", "ResNet50 start weights: a file path, none or imagenet"
    )
    topic_requests: str = env(
        "PROLIF_TOPIC_TRAIN_REQUESTS", "prolif.train.requests", "Runs to start"
    )
    topic_models: str = env("PROLIF_TOPIC_MODELS", "prolif.models", "Published model versions")
    group_id: str = env("PROLIF_TRAINING_GROUP", "prolif-training", "Consumer group of training")
