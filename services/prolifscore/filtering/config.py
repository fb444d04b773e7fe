"""Filtering service settings (environment variables, documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from prolifscore.core.runtime.settings import KafkaSettings, RuntimeSettings, env, nested


@dataclass(frozen=True)
class FilteringSettings:
    kafka: KafkaSettings = nested(KafkaSettings)
    runtime: RuntimeSettings = nested(RuntimeSettings)
    group_id: str = env(
        "PROLIF_FILTERING_GROUP", "prolif-filtering", "Consumer group of the filtering service"
    )
    workers: int = env("PROLIF_FILTER_WORKERS", 0, "Ray filter actors (0 = one per Ray CPU)")
    actor_cpus: float = env(
        "PROLIF_FILTER_ACTOR_CPUS",
        0.5,
        "Ray CPUs each filter actor reserves (fractional so that tiling tasks on a shared "
        "cluster are never starved by long-lived actors)",
    )
    slide_cache: int = env("PROLIF_SLIDE_CACHE", 8, "Open slides each filter worker keeps")
    read_threads: int = env(
        "PROLIF_FILTER_READ_THREADS",
        2,
        "Threads per filter worker decoding tiles ahead of the tissue test and shard writing",
    )
