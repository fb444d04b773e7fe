"""Running real service processes in tests and watching their Kafka events."""

# ServiceProcess is re-exported for the tests: the embedded runtime's own process supervisor.

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.codec import DecodeError, decode
from prolifscore.core.runtime.settings import KafkaSettings, load
from prolifscore.localstack.stack import ServiceProcess  # noqa: F401
from prolifscore.v1 import pipeline_pb2 as pb

TOPICS = ("ingest", "tasks", "shards", "status", "dlq")


def isolated_kafka(bootstrap: str, prefix: str = "test", **overrides: Any) -> KafkaSettings:
    """Settings for the test broker with topic names (and client id) of their own, so tests
    sharing the broker never see each other's records; `to_env` hands them to services.

    Tansu's group join takes about session_timeout_ms / 2, hence the low timeouts.
    """
    suffix = uuid.uuid4().hex[:8]
    fields: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": f"{prefix}-{suffix}",
        **{f"topic_{t}": f"{prefix}.{suffix}.{t}" for t in TOPICS},
        "partitions": 2,
        "max_poll_interval_ms": 8000,
        "session_timeout_ms": 6000,
    }
    return load(KafkaSettings, environ={}, **{**fields, **overrides})


def isolated_bus(bootstrap: str, prefix: str) -> Bus:
    """A bus for the test itself on `isolated_kafka` settings (`bus.settings`), every topic
    created first, so no subscription can auto-create one with a single partition."""
    bus = Bus(isolated_kafka(bootstrap, prefix), "test")
    bus.ensure_topics([getattr(bus.settings, f"topic_{t}") for t in TOPICS])
    return bus


class Watcher:
    """Collects every message of a topic (from the beginning) for assertions."""

    def __init__(self, bus: Bus, topic: str, msg_type: type, group: str) -> None:
        self.consumer = bus.consumer([topic], group)
        self.msg_type = msg_type
        self.items: list[Any] = []
        self.records: list[Any] = []

    def pump(self, timeout_ms: int = 300) -> None:
        for record in self.consumer.poll(timeout_ms=timeout_ms):
            self.records.append(record)
            try:
                self.items.append(decode(record.value, record.headers, self.msg_type))
            except DecodeError:
                self.items.append(None)

    def wait_for(self, pred: Callable[[list[Any]], bool], timeout: float = 120.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if pred(self.items):
                return self.items
        raise TimeoutError(f"condition not met after {timeout}s; saw {len(self.items)} messages")

    def close(self) -> None:
        self.consumer.close()


def final_status(events: list[pb.SlideStatus], slide_id: str) -> pb.SlideStatus | None:
    for ev in reversed(events):
        if (
            ev is not None
            and ev.slide_id == slide_id
            and ev.stage in (pb.STAGE_FILTERED, pb.STAGE_FAILED)
        ):
            return ev
    return None


def all_final(slide_ids: list[str]) -> Callable[[list[Any]], bool]:
    return lambda events: all(final_status(events, s) is not None for s in slide_ids)
