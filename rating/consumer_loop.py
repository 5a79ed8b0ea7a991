"""What every consuming worker of this package does the same way: the poll loops, the
consumed offsets of a poll, and dead letters for records it cannot decode.

``RatingWorker`` (usage samples) and ``SpansWorker`` (lifecycle events) differ only in
``process``: what one poll's records become in the store.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from aggregation.ports import ConsumedOffset
from rating.kafka_source import DeadLetter, DeadLetterProducer, UsageConsumer
from rating.record_codec import RawRecord

MAX_ERROR_HEADER_CHARS = 2000


class Stats(Protocol):
    def plus(self, other: Self) -> Self: ...


StatsT = TypeVar("StatsT", bound=Stats)


class ConsumerLoop(ABC, Generic[StatsT]):
    """Poll, ``process``, repeat. A context manager: ``close()`` leaves the consumer group
    cleanly and flushes nothing that was not confirmed (dead letters are sent synchronously)."""

    def __init__(
        self,
        consumer: UsageConsumer,
        deadletters: DeadLetterProducer,
        stats: StatsT,
        max_records_per_poll: int,
        poll_timeout_s: float,
    ) -> None:
        self.stats = stats
        self._consumer = consumer
        self._deadletters = deadletters
        self._max_records_per_poll = max_records_per_poll
        self._poll_timeout_s = poll_timeout_s

    @abstractmethod
    def process(self, records: Sequence[RawRecord]) -> StatsT:
        """Turn one poll's records into their effect in the store, then commit them."""

    def close(self) -> None:
        try:
            self._consumer.close()
        finally:
            self._deadletters.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, stop: threading.Event) -> StatsT:
        """Process until ``stop`` is set."""
        while not stop.is_set():
            self.poll_once()
        return self.stats

    def run_until_idle(self, idle_s: float, max_seconds: float) -> StatsT:
        """Process until no record arrived for ``idle_s`` seconds after the consumer got its
        partitions, or ``max_seconds`` passed in all (the demo and tests use this)."""
        deadline = time.monotonic() + max_seconds
        last_activity: float | None = None
        while (now := time.monotonic()) < deadline:
            timeout = min(self._poll_timeout_s, deadline - now)
            if self.poll_once(timeout):
                last_activity = time.monotonic()
            elif self._consumer.assignment is not None:
                if last_activity is None:
                    last_activity = time.monotonic()
                elif time.monotonic() - last_activity >= idle_s:
                    break
        return self.stats

    def poll_once(self, timeout_s: float | None = None) -> int:
        """Consume and process one poll's worth of records; return how many there were."""
        records = self._consumer.poll(
            self._max_records_per_poll,
            self._poll_timeout_s if timeout_s is None else timeout_s,
        )
        if records:
            self.stats = self.stats.plus(self.process(records))
        return len(records)


def next_offsets(records: Sequence[RawRecord]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset after the last record of the poll."""
    offsets: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        offsets[key] = max(offsets.get(key, 0), r.offset + 1)
    return offsets


def consumed_offsets(group_id: str, offsets: dict[tuple[str, int], int]) -> list[ConsumedOffset]:
    """The offsets to store with the poll's effects, in a deterministic order."""
    return [
        ConsumedOffset(group_id, topic, partition, offset)
        for (topic, partition), offset in sorted(offsets.items())
    ]


def letter_headers(
    record: RawRecord, stage: str, kind: str, error: str, extra: Sequence[tuple[str, bytes]] = ()
) -> tuple[tuple[str, bytes], ...]:
    """The record's own headers plus what went wrong, where, and where it came from."""
    return (
        *record.headers,
        ("meterline.error", _bounded(error).encode()),
        ("meterline.error.kind", kind.encode()),
        ("meterline.stage", stage.encode()),
        ("meterline.source.topic", record.topic.encode()),
        ("meterline.source.partition", str(record.partition).encode()),
        ("meterline.source.offset", str(record.offset).encode()),
        *extra,
    )


def undecodable_letter(record: RawRecord, error: str, stage: str) -> DeadLetter:
    """The record exactly as consumed, with headers naming the error."""
    return DeadLetter(record.key, record.value, letter_headers(record, stage, "undecodable", error))


def _bounded(text: str) -> str:
    if len(text) <= MAX_ERROR_HEADER_CHARS:
        return text
    return text[: MAX_ERROR_HEADER_CHARS - 20] + f" ... ({len(text)} chars)"
