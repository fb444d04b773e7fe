"""Tiling service settings (environment variables, documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from prolifscore.core.runtime.settings import (
    KafkaSettings,
    PreprocessSettings,
    RuntimeSettings,
    env,
    nested,
)


@dataclass(frozen=True)
class TilingSettings:
    kafka: KafkaSettings = nested(KafkaSettings)
    runtime: RuntimeSettings = nested(RuntimeSettings)
    preprocess: PreprocessSettings = nested(PreprocessSettings)
    task_cpus: float = env(
        "PROLIF_TILING_TASK_CPUS", 0.5, "Ray CPUs each per-slide tiling task reserves"
    )
    group_id: str = env(
        "PROLIF_TILING_GROUP", "prolif-tiling", "Consumer group of the tiling service"
    )
