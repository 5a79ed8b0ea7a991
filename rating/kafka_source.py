"""confluent-kafka adapter for rating: the usage consumer and the dead-letter producer.

The only module of ``rating`` that imports ``confluent_kafka``. It knows nothing of
rating: it hands out ``RawRecord``s, seeks assigned partitions to the offsets the store
holds (the store, not Kafka, is the source of truth for what has been rated), commits
offsets it is given, and produces dead letters, raising when Kafka did not take them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from rating.record_codec import RawRecord

if TYPE_CHECKING:  # a private module of confluent-kafka: types only
    from confluent_kafka._types import HeadersType

log = logging.getLogger(__name__)

# noida-db ignores fetch size limits (ENVIRONMENT.md): a consumer must accept whatever the
# broker returns in one fetch.
RECEIVE_MESSAGE_MAX_BYTES = 1_000_000_000
# librdkafka prefetches records ahead of poll(); this caps that queue (KiB), so the worker's
# memory is bounded by settings, not by the backlog on the topic (librdkafka's default is
# 64 MiB; a poll of 500 records of 1,000 samples is ~7 MiB). A broker that ignores fetch
# size limits (noida-db) can still return more in one fetch response.
QUEUED_MAX_MESSAGES_KBYTES = 32_768
# librdkafka fetches ahead until a partition's local queue holds queued.min.messages
# (default 100,000). The worker asks for about one poll's worth per partition instead
# (``prefetch_records``): enough to overlap fetching with rating, and a broker that answers
# fetches at once rather than waiting for data (noida-db: an idle librdkafka consumer spins
# at ~40 % of a core) is then asked only when that queue runs low.
DEFAULT_PREFETCH_RECORDS = 500
# How often produce() may meet a full local queue before the dead letters count as failed.
MAX_QUEUE_FULL_RETRIES = 100

Config = Mapping[str, str | int | float | bool]


class DeadLetterError(RuntimeError):
    """Kafka did not confirm every dead letter; the batch must not be committed."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class UsageConsumer:
    """A consumer-group member on one topic, reading committed records only.

    ``stored_offsets(topic)`` returns partition -> next offset to read as kept by the
    store; on every assignment the consumer starts there (partitions the store does not
    know start from Kafka's committed offset, else from the earliest record)."""

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        topic: str,
        stored_offsets: Callable[[str], Mapping[int, int]],
        extra_config: Config | None = None,
        *,
        prefetch_records: int = DEFAULT_PREFETCH_RECORDS,
    ) -> None:
        self.topic = topic
        self.assignment: tuple[int, ...] | None = None  # None until the first assignment
        self._stored_offsets = stored_offsets
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "receive.message.max.bytes": RECEIVE_MESSAGE_MAX_BYTES,
            "queued.max.messages.kbytes": QUEUED_MAX_MESSAGES_KBYTES,
            "queued.min.messages": prefetch_records,
            "enable.partition.eof": False,
        }
        config.update(extra_config or {})
        # librdkafka's own log lines go through logging, not straight to stderr.
        self._consumer = Consumer({**config, "logger": log})
        self._consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored = self._stored_offsets(self.topic)
        for tp in partitions:
            if tp.partition in stored:
                tp.offset = stored[tp.partition]
        consumer.assign(partitions)
        self.assignment = tuple(sorted(tp.partition for tp in partitions))
        log.info(
            "assigned %s partitions %s (from stored offsets %s)",
            self.topic,
            self.assignment,
            {p: stored[p] for p in self.assignment if p in stored},
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.unassign()
        self.assignment = ()
        log.info("revoked %s partitions %s", self.topic, [tp.partition for tp in partitions])

    def poll(self, max_records: int, timeout_s: float) -> list[RawRecord]:
        """Up to ``max_records`` records (possibly none when ``timeout_s`` passes)."""
        records: list[RawRecord] = []
        for message in self._consumer.consume(num_messages=max_records, timeout=timeout_s):
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error on %s: %s", self.topic, error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is None or partition is None or offset is None:
                raise KafkaException(
                    f"consumed a message without topic/partition/offset: {message}"
                )
            records.append(
                RawRecord(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    value=message.value(),
                    key=message.key(),
                    headers=_headers(message.headers()),
                )
            )
        return records

    def commit(self, next_offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit (synchronously) the next offset to read per (topic, partition).

        A failed commit is logged, not raised: the offsets are already in the store, which
        the next assignment seeks to, and the dedup ledger absorbs any replay."""
        if not next_offsets:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(next_offsets.items())]
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("Kafka commit failed (the store holds the offsets): %s", exc)
            return
        for tp in result or ():
            if tp.error is not None:
                log.warning("Kafka commit of %s[%d] failed: %s", tp.topic, tp.partition, tp.error)

    def close(self) -> None:
        self._consumer.close()


def _headers(raw: HeadersType | None) -> tuple[tuple[str, bytes], ...]:
    items = raw.items() if isinstance(raw, dict) else (raw or [])
    return tuple(
        (k, v.encode() if isinstance(v, str) else (v if v is not None else b"")) for k, v in items
    )


class DeadLetterProducer:
    """Produces dead letters and waits until Kafka confirmed every one of them."""

    def __init__(self, bootstrap: str, topic: str, extra_config: Config | None = None) -> None:
        self.topic = topic
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
        }
        config.update(extra_config or {})
        self._producer = Producer({**config, "logger": log})

    def send(self, letters: Sequence[DeadLetter], timeout_s: float) -> None:
        failures: list[str] = []

        def on_delivery(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                failures.append(str(error))

        for letter in letters:
            for _ in range(MAX_QUEUE_FULL_RETRIES):
                try:
                    self._producer.produce(
                        self.topic,
                        value=letter.value,
                        key=letter.key,
                        headers=list(letter.headers),
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    self._producer.poll(0.1)
            else:
                raise DeadLetterError(f"the producer queue stayed full; {self.topic} not written")
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise DeadLetterError(
                f"{remaining} dead letters not confirmed by Kafka within {timeout_s} s"
            )
        if failures:
            raise DeadLetterError(
                f"{len(failures)} dead letters not written to {self.topic}: {failures[0]}"
            )

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.flush(timeout_s)
