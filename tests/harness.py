"""Running real service processes in tests and watching their Kafka events."""

# ServiceProcess is re-exported for the tests: the embedded runtime's own process supervisor.

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prolifscore.core.runtime.bus import Bus, DecodeError, decode
from prolifscore.core.runtime.settings import KafkaSettings
from prolifscore.localstack.stack import ServiceProcess  # noqa: F401
from prolifscore.v1 import pipeline_pb2 as pb


def kafka_env(k: KafkaSettings) -> dict[str, str]:
    return {
        "PROLIF_KAFKA_BOOTSTRAP": k.bootstrap_servers,
        "PROLIF_TOPIC_INGEST": k.topic_ingest,
        "PROLIF_TOPIC_TASKS": k.topic_tasks,
        "PROLIF_TOPIC_SHARDS": k.topic_shards,
        "PROLIF_TOPIC_STATUS": k.topic_status,
        "PROLIF_TOPIC_DLQ": k.topic_dlq,
        "PROLIF_TOPIC_PARTITIONS": str(k.partitions),
        "PROLIF_KAFKA_MAX_POLL_INTERVAL_MS": str(k.max_poll_interval_ms),
        "PROLIF_KAFKA_SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
    }


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
