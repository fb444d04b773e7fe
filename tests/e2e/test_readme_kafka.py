"""The README's Kafka example, run as a user would (confluent-kafka, librdkafka) against the
embedded broker: the records it sends arrive as the messages the services decode, and its reader
gets records back."""

from __future__ import annotations

import uuid

from confluent_kafka import Producer

from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.codec import decode
from prolifscore.core.runtime.settings import KafkaSettings, load
from prolifscore.localstack.broker import EmbeddedBroker
from prolifscore.v1 import pipeline_pb2, scoring_pb2, training_pb2
from tests.harness import isolated_bus
from tests.unit.test_readme import TOPICS, kafka_example


def test_readme_kafka_example_runs_against_the_embedded_broker(broker: EmbeddedBroker) -> None:
    code = kafka_example()
    assert 'BOOTSTRAP = "127.0.0.1:9092"' in code
    # As in a running stack, the topics exist (the services create them), and the reader at
    # the end of the example has something to read: a status already there.
    with Bus(load(KafkaSettings, environ={}, bootstrap_servers=broker.bootstrap), "t") as admin:
        admin.ensure_topics(["prolif.slides.status", "prolif.score.results", "prolif.models"])
    status = pipeline_pb2.SlideStatus(slide_id=f"s-{uuid.uuid4().hex[:6]}", stage=2)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce("prolif.slides.status", key=status.slide_id, value=status.SerializeToString())
    producer.flush(10)

    scope: dict[str, object] = {}
    exec(code.replace("127.0.0.1:9092", broker.bootstrap), scope)  # the block, as written
    record = scope["record"]
    assert record is not None and record.error() is None, "the example's reader got nothing"

    bus = isolated_bus(broker.bootstrap, "readme")
    try:
        got = {topic: [] for topic in TOPICS}
        consumer = bus.consumer(list(TOPICS), f"readme-{uuid.uuid4().hex[:6]}")
        for _ in range(60):
            for r in consumer.poll(timeout_ms=500):
                got[r.topic].append(decode(r.value, r.headers, TOPICS[r.topic]))
            if all(got.values()) and len(got["prolif.train.requests"]) >= 2:
                break
        consumer.close()
    finally:
        bus.close()
    ingest = next(m for m in got["prolif.slides.ingest"] if m.slide_id == "TUPAC-TR-001")
    assert ingest.labels.tumor_score == 2 and ingest.spec.max_tiles == 2000
    score = next(m for m in got["prolif.score.requests"] if m.request_id == "req-001")
    assert isinstance(score, scoring_pb2.ScoreRequest) and score.path == "TUPAC-TR-001.svs"
    runs = {m.request_id: m for m in got["prolif.train.requests"]}
    assert isinstance(runs["mitosis-quick-001"], training_pb2.TrainRequest)
    assert runs["mitosis-quick-001"].profile == "quick" and runs["resnet50-run-001"].workers == 2
