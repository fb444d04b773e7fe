"""Shared fixtures: one embedded Kafka broker per test session, fresh topic names per test, one
Ray head, and one export of the untrained models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def exported_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root with both models (untrained, small: the tumor model at 64 px), as training
    leaves it; exported once per session (the tumor model takes ~10-20 s, and seven modules
    serve these same two models). Tests and the services they start only read it; a test that
    changes a root copies what it needs."""
    from prolifscore.core.models.export import export_untrained

    root = tmp_path_factory.mktemp("exported")
    export_untrained(root, "tumor", input_size=64)
    export_untrained(root, "mitosis")
    return root
