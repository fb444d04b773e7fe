"""Handing polled records to a service's handler with bounded retries, so that no record can stop
a consumer for good.

A batch whose handler raises is not simply redone: it may hold one bad record among good ones.
Its records are then tried one by one, each counted under (topic, partition, offset); a record
that fails `max_attempts` times goes to the dead-letter topic with the reason and the count, the
service reports the item as failed (`abandon`), and the consumer commits past it. Failures that
are not the record's fault (the broker or a dependency unreachable: `transient`) are retried with
backoff, without limit and without counting, so an outage never dead-letters good work.

Attempts are counted in memory: a record that kills the consuming process itself (not a Ray
worker) starts again from zero at each restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from kafka.errors import KafkaError

from prolifscore.core.runtime import metrics
from prolifscore.core.runtime.bus import BrokerUnavailable, Bus, PublishError
from prolifscore.core.runtime.codec import DecodeError, decode
from prolifscore.core.runtime.consumer import Consumer

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
Key = tuple[str, int, int]
Items = list[tuple[Any, M]]
_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 10.0
_MAX_TRACKED = 10_000  # records with failed attempts remembered (a rebalance can orphan some)


class Transient(Exception):
    """Raised by a handler when the work cannot be done now for a reason outside the record (a
    dependency is unreachable): retried with backoff, never dead-lettered."""


def transient(exc: BaseException) -> bool:
    """Whether `exc` says "not now" rather than "not this record": the broker or a dependency
    unreachable, a retriable Kafka error (a record too large to publish is not)."""
    if isinstance(exc, (Transient, BrokerUnavailable)):
        return True
    if isinstance(exc, PublishError):
        return exc.__cause__ is None or transient(exc.__cause__)
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    return False


def _key(record: Any) -> Key:
    return (record.topic, record.partition, record.offset)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Delivery(Generic[M]):
    """Decode, handle, flush and commit polled records; see the module docstring."""

    def __init__(
        self,
        service: str,
        bus: Bus,
        consumer: Consumer,
        msg_type: type[M],
        handle: Callable[[Items[M]], None],
        abandon: Callable[[Any, M, str], None] | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.service = service
        self.bus = bus
        self.consumer = consumer
        self.msg_type = msg_type
        self.handle = handle
        self.abandon = abandon
        self.max_attempts = max(1, bus.settings.max_attempts)
        self.fail_key = bus.settings.test_fail_key.encode() if bus.settings.test_fail_key else b""
        self.stopping = stopping or threading.Event()
        self.attempts: dict[Key, tuple[int, str]] = {}  # failed attempts, last reason
        self._backoff = _BACKOFF_START_S

    def process(self, records: Sequence[Any]) -> None:
        """One poll's records: all handled (or given up) and committed, or rewound to retry."""
        items = self._decode(records)
        if any(_key(r) in self.attempts for r, _ in items):
            self._one_by_one(records, items, {})  # holds a record that failed before
            return
        error = self._run(items)
        if error is None:
            self._commit(records)
            self._backoff = _BACKOFF_START_S
        elif transient(error):
            self._retry_later(records, error)
        elif len(items) == 1:  # the culprit is known: count it without running it again
            self._one_by_one(records, items, {id(items[0][0]): error})
        else:
            log.warning(
                "batch of %d failed (%s); trying its records one by one",
                len(items),
                _describe(error),
            )
            self._one_by_one(records, items, {})

    def _decode(self, records: Sequence[Any]) -> Items[M]:
        """Decoded records; an undecodable one is dead-lettered here (and committed with the
        batch): retrying cannot fix its bytes."""
        items: Items[M] = []
        for record in records:
            try:
                items.append((record, decode(record.value, record.headers, self.msg_type)))
            except DecodeError as exc:
                log.warning(
                    "undecodable message",
                    extra={"topic": record.topic, "offset": record.offset, "error": str(exc)},
                )
                self.bus.dead_letter(record, f"undecodable message: {exc}", self.service)
        return items

    def _run(self, items: Items[M]) -> BaseException | None:
        """Handle `items` and flush what the handler published; the exception, if any."""
        try:
            if self.fail_key and any(r.key == self.fail_key for r, _ in items):
                raise RuntimeError("injected fault (PROLIF_TEST_FAIL_KEY)")
            if items:
                self.handle(items)
            self.bus.flush()
        except Exception as exc:  # the handler's failure is data here: counted or retried
            return exc
        return None

    def _one_by_one(
        self, records: Sequence[Any], items: Items[M], known: dict[int, BaseException]
    ) -> None:
        """Each decoded record alone, in partition order (`known`: failures already seen, by
        record id). A record that fails stops its partition there (the consumer seeks back to
        it, so the rest of that partition comes again); other partitions go on."""
        decoded = {id(item[0]): item for item in items}
        blocked: set[tuple[str, int]] = set()
        done: list[Any] = []
        for i, record in enumerate(records):
            if done:  # progress was made: pauses start short again
                self._backoff = _BACKOFF_START_S
            if (record.topic, record.partition) in blocked:
                continue
            item = decoded.get(id(record))
            if item is None:  # undecodable: already dead-lettered
                done.append(record)
                continue
            count, _ = self.attempts.get(_key(record), (0, ""))
            if count >= self.max_attempts:  # given up before, but that was not delivered
                outcome = self._give_up(item)
            else:
                error = known.get(id(record)) or self._run([item])
                if error is not None and transient(error):
                    rest = [r for r in records[i:] if (r.topic, r.partition) not in blocked]
                    self._commit(done)
                    self._retry_later(rest, error)
                    return
                outcome = error is None or self._count(item, error)
            if outcome:
                done.append(record)
            else:
                blocked.add((record.topic, record.partition))
                self.consumer.rewind([record])
        self._commit(done)
        if blocked:
            self._pause()
        else:
            self._backoff = _BACKOFF_START_S

    def _count(self, item: tuple[Any, M], error: BaseException) -> bool:
        """One more failed attempt at a record: below the limit False (retry it), at the limit
        whether it was given up (dead-lettered and reported)."""
        record, _ = item
        key = _key(record)
        count = self.attempts.get(key, (0, ""))[0] + 1
        self.attempts[key] = (count, _describe(error))
        if len(self.attempts) > _MAX_TRACKED:
            self.attempts.pop(next(iter(self.attempts)))
        if count >= self.max_attempts:
            return self._give_up(item)
        metrics.RETRIES.labels(self.service, "error").inc()
        log.warning(
            "record failed (attempt %d of %d): %s",
            count,
            self.max_attempts,
            _describe(error),
            extra={"topic": record.topic, "partition": record.partition, "offset": key[2]},
            exc_info=error,
        )
        return False

    def _give_up(self, item: tuple[Any, M]) -> bool:
        """Dead-letter the record with its reason and count, let the service report the item
        failed, flush both; whether that was delivered (if not, it is given up next time)."""
        record, msg = item
        key = _key(record)
        count, last = self.attempts[key]
        reason = f"gave up after {count} attempts: {last}"
        log.error(reason, extra={"topic": record.topic, "partition": record.partition})
        self.bus.dead_letter(record, reason, self.service, attempts=count)
        metrics.FAILURES.labels(self.service, "poison").inc()
        if self.abandon is not None:
            try:
                self.abandon(record, msg, reason)
            except Exception:  # the dead letter holds the record; reporting is best effort
                log.exception("could not report the abandoned record", extra={"offset": key[2]})
        try:
            self.bus.flush()
        except Exception as exc:
            log.warning("dead letter not delivered: %s", _describe(exc))
            return False
        self.attempts.pop(key, None)
        return True

    def _commit(self, records: Sequence[Any]) -> None:
        if not records:
            return
        try:
            self.consumer.commit(records)
        except KafkaError as exc:  # e.g. evicted after a slow batch: the group rebalances,
            # the new owner redoes these records (effects are idempotent); keep serving.
            log.warning("offset commit failed; the batch will be redone", extra={"error": str(exc)})

    def _retry_later(self, records: Sequence[Any], error: BaseException) -> None:
        """Not the records' fault: seek back, wait, and try them again, uncounted."""
        metrics.RETRIES.labels(self.service, "transient").inc()
        log.warning(
            "records will be retried in %.1f s: %s",
            self._backoff,
            _describe(error),
            extra={"records": len(records)},
        )
        self.consumer.rewind(records)
        self._pause()

    def _pause(self) -> None:
        """Wait, then double the next wait, up to 10 s and a quarter of the poll interval (a
        longer pause between polls would get the consumer evicted from its group)."""
        self.stopping.wait(self._backoff)
        limit = min(_BACKOFF_MAX_S, self.bus.settings.max_poll_interval_ms / 4000)
        self._backoff = max(_BACKOFF_START_S, min(self._backoff * 2, limit))
