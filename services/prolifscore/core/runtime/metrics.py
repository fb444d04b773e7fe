"""Prometheus metrics shared by the services (labelled by service, so one registry serves all)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SLIDES = Counter("prolif_slides_total", "Slides finished by a stage", ["service", "outcome"])
TILES = Counter("prolif_tiles_total", "Tiles handled", ["service", "kind"])
FAILURES = Counter("prolif_failures_total", "Failed work items", ["service", "reason"])
DEAD_LETTERS = Counter(
    "prolif_dead_letters_total", "Records sent to the dead-letter topic", ["service"]
)
RETRIES = Counter(
    "prolif_retries_total",
    "Records redone after their handler raised (cause: transient = broker or dependency "
    "unreachable, not counted as an attempt; error = counted towards PROLIF_MAX_ATTEMPTS)",
    ["service", "cause"],
)
BROKER_UP = Gauge(
    "prolif_broker_up", "1 while the service reaches its Kafka broker, else 0", ["service"]
)
DURATION = Histogram(
    "prolif_work_seconds",
    "Time per unit of work",
    ["service", "unit"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
