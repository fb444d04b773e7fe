"""Shared fixtures: one embedded Kafka broker per test session, fresh topic names per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prolifscore.core.runtime.settings import KafkaSettings
from prolifscore.localstack.broker import EmbeddedBroker, free_port
from prolifscore.localstack.rayhead import RayHead
from tests.harness import isolated_kafka


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A Tansu broker on 127.0.0.1 (in-memory: nothing survives the session)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def kafka_settings(broker: EmbeddedBroker) -> KafkaSettings:
    """Settings for `broker` with topic names unique to this test; a broker that is gone is
    given up on after 20 s."""
    return isolated_kafka(broker.bootstrap, connect_timeout_s=20.0)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One local Ray cluster (loopback only) that the service processes under test join."""
    head = RayHead(free_port(), num_cpus=2, log_path=tmp_path_factory.mktemp("ray") / "head.log")
    head.start()
    yield head
    head.stop()
