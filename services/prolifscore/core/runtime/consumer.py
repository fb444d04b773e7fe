"""A group consumer that commits explicit offsets: only what the service has finished.

The embedded broker (Tansu) and kafka-python make a bare `KafkaConsumer.commit()` commit what
poll() returned, not what was processed (docs/architecture.md, section 7), so
`Consumer.commit(records)` always names its offsets, and `rewind(records)` retries a batch
without a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition


class Consumer:
    """A group consumer that commits only what the caller says it has finished."""

    def __init__(self, consumer: KafkaConsumer, group_id: str, topics: Sequence[str]) -> None:
        self.raw = consumer
        self.group_id = group_id
        self.topics = tuple(topics)
        self._closed = False

    def poll(self, timeout_ms: int = 1000) -> list[ConsumerRecord]:
        """Up to `max_poll_records` records, flattened in (topic, partition, offset) order."""
        batches = self.raw.poll(timeout_ms=timeout_ms)
        return [r for tp in sorted(batches) for r in batches[tp]]

    def commit(self, records: Iterable[ConsumerRecord]) -> None:
        """Commit offset+1 of the highest given record per partition, and nothing else.

        Never a bare `KafkaConsumer.commit()`: that commits everything poll() returned, so a
        crash after a partial batch loses the rest (docs/architecture.md, section 7: 25 of 200
        lost).
        Raises CommitFailedError if the partition was reassigned meanwhile (records will be
        redelivered to the new owner: effects must be idempotent).
        """
        top: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            top[tp] = max(top.get(tp, -1), r.offset)
        if top:
            self.raw.commit({tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in top.items()})

    def rewind(self, records: Iterable[ConsumerRecord]) -> None:
        """Seek back so the next poll() returns these records again (retry without restart).

        Partitions no longer assigned are skipped: their new owner resumes from the commit.
        """
        low: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            low[tp] = min(low.get(tp, r.offset), r.offset)
        for tp, off in low.items():
            if tp in self.raw.assignment():
                self.raw.seek(tp, off)

    def assignment(self) -> set[TopicPartition]:
        return set(self.raw.assignment())

    def close(self) -> None:
        """Leave the group (no auto commit) so the partitions move on at once."""
        if not self._closed:
            self._closed = True
            self.raw.close(autocommit=False)

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
