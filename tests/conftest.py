"""Shared fixtures: one embedded Kafka broker per test session, fresh topic names per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from prolifscore.core.runtime.settings import KafkaSettings, load
from prolifscore.localstack.broker import EmbeddedBroker, free_port
from prolifscore.localstack.rayhead import RayHead


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A Tansu broker on 127.0.0.1 (in-memory: nothing survives the session)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def kafka_settings(broker: EmbeddedBroker) -> KafkaSettings:
    """Settings for `broker` with topic names unique to this test.

    Tansu's group join takes about session_timeout_ms / 2, hence the low timeouts.
    """
    suffix = uuid.uuid4().hex[:8]
    return load(
        KafkaSettings,
        environ={},
        bootstrap_servers=broker.bootstrap,
        client_id=f"test-{suffix}",
        topic_ingest=f"test.{suffix}.ingest",
        topic_tasks=f"test.{suffix}.tasks",
        topic_shards=f"test.{suffix}.shards",
        topic_status=f"test.{suffix}.status",
        topic_dlq=f"test.{suffix}.dlq",
        partitions=2,
        max_poll_interval_ms=8000,
        session_timeout_ms=6000,
        connect_timeout_s=20.0,
    )


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One local Ray cluster (loopback only) that the service processes under test join."""
    head = RayHead(free_port(), num_cpus=2, log_path=tmp_path_factory.mktemp("ray") / "head.log")
    head.start()
    yield head
    head.stop()
