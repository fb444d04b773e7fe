"""The Kafka bus every service uses: producer, topics, dead letters, and the consumers it makes.

Delivery is at-least-once: a service publishes its outputs, `flush()`es (which raises if any send
failed), and only then commits the explicit offsets of the records it processed (`Consumer`).
The embedded broker (Tansu) auto-creates an unknown topic with ONE partition on any metadata
request (even with `allow_auto_create_topics=False`; docs/architecture.md, section 7), so the
bus creates every topic it touches with `settings.partitions` partitions before its first
produce or subscribe.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from google.protobuf import message as pb_message
from google.protobuf import timestamp_pb2
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.consumer.fetcher import ConsumerRecord
from kafka.producer.future import FutureRecordMetadata

from prolifscore.core.runtime import metrics, tracing
from prolifscore.core.runtime.codec import CONTENT_TYPE, PROTOBUF, Headers, encode, header
from prolifscore.core.runtime.consumer import Consumer
from prolifscore.core.runtime.kafka_security import kafka_client_kwargs
from prolifscore.core.runtime.settings import KafkaSettings
from prolifscore.v1 import pipeline_pb2

log = logging.getLogger(__name__)

C = TypeVar("C")

# What kafka-python raises while it cannot reach any bootstrap server (3.x: KafkaTimeoutError
# "Unable to bootstrap from ..."; older releases: NoBrokersAvailable).
_UNREACHABLE: tuple[type[BaseException], ...] = tuple(
    e
    for e in (
        getattr(kafka_errors, "NoBrokersAvailable", None),
        kafka_errors.KafkaTimeoutError,
        kafka_errors.KafkaConnectionError,
        kafka_errors.NodeNotReadyError,
    )
    if e is not None
)
_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 5.0
_ATTEMPT_S = 2.0  # one bootstrap attempt; kafka-python retries the connection inside it
_LINGER_MS = 5  # small: a few ms of batching, no visible latency
_TOPIC_EXISTS = kafka_errors.TopicAlreadyExistsError.errno


class PublishError(RuntimeError):
    """At least one published record was not acknowledged: do not commit the inputs."""


class BrokerUnavailable(ConnectionError):
    """The broker stayed unreachable for `connect_timeout_s`."""


def connect_with_backoff(what: str, settings: KafkaSettings, factory: Callable[[int], C]) -> C:
    """Call `factory(bootstrap_timeout_ms)` until the broker answers or `connect_timeout_s` ends.

    Services may start before the broker (compose, Kubernetes), so unreachable is retried with
    exponential backoff (0.5 s doubling to 5 s) and logged; configuration errors are not retried.
    """
    start = time.monotonic()
    deadline = start + settings.connect_timeout_s
    delay = _BACKOFF_START_S
    attempt = 0
    while True:
        attempt += 1
        window = min(_ATTEMPT_S, max(0.1, deadline - time.monotonic()))
        try:
            client = factory(int(window * 1000))
        except _UNREACHABLE as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(
                    f"Kafka {what}: broker {settings.bootstrap_servers} unreachable after "
                    f"{attempt} attempts in {time.monotonic() - start:.1f} s "
                    f"(PROLIF_KAFKA_BOOTSTRAP / connect_timeout_s={settings.connect_timeout_s}): "
                    f"{exc}"
                ) from exc
            pause = min(delay, remaining)
            log.warning(
                "Kafka %s: broker %s unreachable (attempt %d: %s); retrying in %.1f s",
                what,
                settings.bootstrap_servers,
                attempt,
                exc,
                pause,
                extra={"bootstrap": settings.bootstrap_servers, "attempt": attempt},
            )
            time.sleep(pause)
            delay = min(delay * 2, _BACKOFF_MAX_S)
            continue
        if attempt > 1:
            log.info("Kafka %s connected to %s", what, settings.bootstrap_servers)
        return client


def _connect(what: str, s: KafkaSettings, client: Callable[..., C], **config: Any) -> C:
    """`client(**config)` on `s`'s brokers with their TLS/SASL options, through
    `connect_with_backoff`."""
    security = kafka_client_kwargs(s)
    return connect_with_backoff(
        what,
        s,
        lambda bootstrap_ms: client(
            bootstrap_servers=s.bootstrap_servers,
            reconnect_backoff_max_ms=int(_BACKOFF_MAX_S * 1000),
            bootstrap_timeout_ms=bootstrap_ms,
            **security,
            **config,
        ),
    )


def _connect_producer(s: KafkaSettings, client_id: str) -> KafkaProducer:
    return _connect(
        "producer",
        s,
        KafkaProducer,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,  # retries (until delivery_timeout_ms), no dups
        linger_ms=_LINGER_MS,
        max_request_size=s.max_request_size,
        delivery_timeout_ms=s.delivery_timeout_ms,
        # kafka-python demands delivery >= linger + request timeout
        request_timeout_ms=max(1, min(30_000, s.delivery_timeout_ms - _LINGER_MS)),
    )


def _connect_consumer(s: KafkaSettings, client_id: str, group_id: str) -> KafkaConsumer:
    """Auto-commit off: `Consumer.commit` names the offsets the service has finished."""
    return _connect(
        f"consumer {group_id}",
        s,
        KafkaConsumer,
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=s.max_poll_records,
        max_poll_interval_ms=s.max_poll_interval_ms,
        session_timeout_ms=s.session_timeout_ms,
        # must be below the session timeout; Kafka's advice is a third of it
        heartbeat_interval_ms=max(100, s.session_timeout_ms // 3),
    )


class Bus:
    """One service's connection to Kafka: publish, dead-letter, create topics, make consumers."""

    def __init__(self, settings: KafkaSettings, service: str) -> None:
        kafka_client_kwargs(settings)  # bad TLS/SASL settings stop the service now, named
        self.settings = settings
        self.service = service
        self.client_id = f"{settings.client_id}-{service}"
        self._lock = threading.RLock()
        self._producer: KafkaProducer | None = None
        self._admin: KafkaAdminClient | None = None
        self._pending: list[FutureRecordMetadata] = []
        self._known_topics: set[str] = set()
        self._consumers: weakref.WeakSet[Consumer] = weakref.WeakSet()
        self._probe: KafkaAdminClient | None = None

    # -- clients, created on first use so importing or building a Bus never blocks -------------

    @property
    def producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = _connect_producer(self.settings, self.client_id)
            return self._producer

    @property
    def admin(self) -> KafkaAdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = _connect(
                    "admin", self.settings, KafkaAdminClient, client_id=f"{self.client_id}-admin"
                )
            return self._admin

    def reachable(self, timeout: float = 2.0) -> bool:
        """Whether the broker answers a metadata request (all topics: naming one would make
        Tansu create it) within about `timeout` seconds.

        On a client of its own, so a probe never waits behind a topic creation, and with a single
        connection attempt, so an unreachable broker is reported at once instead of retried.
        """
        try:
            if self._probe is None:
                once = dataclasses.replace(self.settings, connect_timeout_s=timeout)
                self._probe = _connect(
                    "probe",
                    once,
                    KafkaAdminClient,
                    client_id=f"{self.client_id}-probe",
                    request_timeout_ms=max(500, int(timeout * 1000)),
                )
            self._probe.list_topics()
            return True
        except Exception:  # any failure means: not reachable now; the next probe tries again
            return False

    def topic_ids(self, names: Iterable[str], timeout: float = 2.0) -> dict[str, str]:
        """The broker's id of each existing topic among `names` (a topic deleted and created
        again gets a new id; so does every topic of a broker that restarted empty). Raises
        BrokerUnavailable if the broker does not answer."""
        if not self.reachable(timeout):
            raise BrokerUnavailable(f"Kafka broker {self.settings.bootstrap_servers} unreachable")
        assert self._probe is not None
        wanted = set(names)
        try:
            described = self._probe.describe_topics()  # all topics: naming one creates it
        except Exception as exc:
            broker = self.settings.bootstrap_servers
            raise BrokerUnavailable(f"Kafka broker {broker}: {exc}") from exc
        return {t["name"]: str(t.get("topic_id")) for t in described if t["name"] in wanted}

    # -- producing --------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        key: str | None,
        msg: pb_message.Message,
        content_type: str = PROTOBUF,
    ) -> FutureRecordMetadata:
        """Queue `msg` keyed by slide id (one slide's events stay ordered); see `flush()`.
        Published inside a span (`core/runtime/tracing.py`), the record carries its trace
        context in its headers."""
        value, headers = encode(msg, content_type)
        return self._send(topic, None if key is None else key.encode("utf-8"), value, headers)

    def publish_bytes(
        self, topic: str, key: str | None, value: bytes, content_type: str = PROTOBUF
    ) -> FutureRecordMetadata:
        """Like `publish` for a payload already serialized (e.g. by a Ray worker)."""
        headers = [(CONTENT_TYPE, content_type.encode("utf-8"))]
        return self._send(topic, None if key is None else key.encode("utf-8"), value, headers)

    def _send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> FutureRecordMetadata:
        self._ensure_known(topic)
        headers = [*headers, *tracing.kafka_headers()]  # the current span's, if any
        future = self.producer.send(topic, value=value, key=key, headers=headers)
        with self._lock:
            if len(self._pending) >= 10_000:  # never flushed: keep only what flush must report
                self._pending = [f for f in self._pending if not f.is_done or f.failed()]
            self._pending.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every record published since the last flush; raise if any was not acked.

        A service commits its input offsets only after this returns: then its outputs are
        durable, and at-least-once holds even if the process dies right after.
        """
        with self._lock:
            pending, self._pending = self._pending, []
        if self._producer is None:
            return
        try:
            self._producer.flush(timeout=timeout)
        except kafka_errors.KafkaTimeoutError as exc:
            with self._lock:
                self._pending[:0] = [f for f in pending if not f.is_done or f.failed()]
            raise PublishError(f"flush did not complete within {timeout} s") from exc
        failed = [f for f in pending if f.is_done and f.failed()]
        if failed:
            first = failed[0].exception
            raise PublishError(
                f"{len(failed)} of {len(pending)} records were not delivered: {first!r}"
            ) from first

    def dead_letter(
        self,
        record: ConsumerRecord,
        error: str | BaseException,
        service: str | None = None,
        attempts: int = 0,
    ) -> FutureRecordMetadata:
        """Park a record the service cannot handle on the DLQ, keyed like the original, with the
        reason and how many times its handler was tried, and count it
        (`prolif_dead_letters_total`).

        The raw payload is kept so it can be inspected and replayed; it is cut to fit
        `max_request_size` so that a poison record can never block the consumer.
        """
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        payload = bytes(record.value or b"")
        room = max(0, self.settings.max_request_size - 64 * 1024)
        if len(payload) > room:
            error = f"{error} [payload truncated from {len(payload)} to {room} bytes]"
            payload = payload[:room]
        when = timestamp_pb2.Timestamp()
        when.GetCurrentTime()
        letter = pipeline_pb2.DeadLetter(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=bytes(record.key or b""),
            payload=payload,
            content_type=header(record.headers, CONTENT_TYPE) or PROTOBUF,
            error=error,
            service=service or self.service,
            time=when,
            attempts=attempts,
        )
        value, headers = encode(letter)
        log.warning(
            "dead-lettered %s[%d]@%d: %s",
            record.topic,
            record.partition,
            record.offset,
            error,
            extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
        )
        future = self._send(self.settings.topic_dlq, record.key, value, headers)
        metrics.DEAD_LETTERS.labels(letter.service).inc()
        return future

    # -- topics -----------------------------------------------------------------------------

    def ensure_topics(self, names: Iterable[str]) -> list[str]:
        """Create the missing topics with `settings.partitions` partitions; the names created.

        Idempotent and safe against another service creating the same topic at the same time.
        Replication is the broker's default (-1). An existing topic with fewer partitions is
        logged, not changed (its keys would move).
        """
        wanted = sorted(set(names))
        if not wanted:
            return []
        with self._lock:
            admin = self.admin
            existing = set(admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            created: list[str] = []
            if missing:
                spec = {n: {"num_partitions": self.settings.partitions} for n in missing}
                result = admin.create_topics(spec, raise_errors=False)
                for topic in result["topics"]:
                    code = topic["error_code"]
                    if code == 0:
                        created.append(topic["name"])
                    elif code != _TOPIC_EXISTS:
                        err = kafka_errors.for_code(code)
                        raise err(f"creating topic {topic['name']!r}: {topic['error_message']}")
                if created:
                    admin.wait_for_topics(created)
                    log.info("created topics %s", created, extra={"topics": created})
            self._warn_small(admin, [n for n in wanted if n not in created])
            self._known_topics.update(wanted)
            return created

    def _warn_small(self, admin: KafkaAdminClient, names: list[str]) -> None:
        if not names:
            return
        for t in admin.describe_topics(names):
            n = len(t.get("partitions") or [])
            if t.get("error_code") == 0 and n < self.settings.partitions:
                log.warning(
                    "topic %s has %d partitions, fewer than %d: less parallelism",
                    t["name"],
                    n,
                    self.settings.partitions,
                )

    def _ensure_known(self, *topics: str) -> None:
        unknown = [t for t in topics if t not in self._known_topics]
        if unknown:
            self.ensure_topics(unknown)

    # -- consuming --------------------------------------------------------------------------

    def consumer(self, topics: Sequence[str], group_id: str) -> Consumer:
        """A consumer subscribed to `topics` in `group_id`, created (with retries) now.

        Its topics are created first so that subscribing cannot auto-create them with a
        single partition. Tansu's group join takes about session_timeout_ms / 2 (measured).
        """
        topics = list(topics)
        self._ensure_known(*topics)
        raw = _connect_consumer(self.settings, self.client_id, group_id)
        raw.subscribe(topics)
        consumer = Consumer(raw, group_id, topics)
        self._consumers.add(consumer)
        return consumer

    # -- lifecycle --------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Close consumers, then the producer (sending what is queued) and the admin client."""
        for consumer in list(self._consumers):
            consumer.close()
        with self._lock:
            producer, self._producer = self._producer, None
            admin, self._admin = self._admin, None
            probe, self._probe = self._probe, None
        if producer is not None:
            producer.close(timeout=timeout)
        for client in (admin, probe):
            if client is not None:
                client.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
