"""What every consuming worker of this package does the same way: the consumer and the
dead-letter producer built from its settings, the poll loops, store calls retried with
backoff (the stored offsets each assignment starts from among them), the consumed offsets
of a poll, and dead letters for records it cannot decode.

``RatingWorker`` (usage samples) and ``SpansWorker`` (lifecycle events) differ only in
``process``: what one poll's records become in the store.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from aggregation.ports import ConsumedOffset, Store
from rating.kafka_source import DeadLetter, DeadLetterProducer, UsageConsumer
from rating.record_codec import RawRecord

log = logging.getLogger(__name__)

MAX_ERROR_HEADER_CHARS = 2000

_T = TypeVar("_T")


class Stats(Protocol):
    def plus(self, other: Self) -> Self: ...


StatsT = TypeVar("StatsT", bound=Stats)


class LoopConfig(Protocol):
    """The settings every worker's config has (``WorkerConfig``, ``SpansConfig``)."""

    @property
    def bootstrap(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def group_id(self) -> str: ...
    @property
    def deadletter_topic(self) -> str: ...
    @property
    def max_records_per_poll(self) -> int: ...
    @property
    def poll_timeout_s(self) -> float: ...
    @property
    def store_attempts(self) -> int: ...
    @property
    def store_backoff_s(self) -> float: ...
    @property
    def store_backoff_max_s(self) -> float: ...
    @property
    def consumer_config(self) -> Mapping[str, str | int | float | bool]: ...
    @property
    def producer_config(self) -> Mapping[str, str | int | float | bool]: ...


def call_with_retries(
    what: str,
    call: Callable[[], _T],
    *,
    attempts: int,
    backoff_s: float,
    backoff_max_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> _T:
    """Call, retrying on any exception up to ``attempts`` tries in all, waiting
    ``backoff_s`` doubled each time (at most ``backoff_max_s``); re-raise the last error."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if attempt >= attempts:
                raise
            log.warning(
                "%s failed (try %d of %d), retrying in %.2f s: %r",
                what,
                attempt,
                attempts,
                delay,
                exc,
            )
        sleep(delay)
        delay = min(delay * 2, backoff_max_s)
    raise AssertionError("unreachable")  # pragma: no cover


class ConsumerLoop(ABC, Generic[StatsT]):
    """Poll, ``process``, repeat. A context manager: ``close()`` leaves the consumer group
    cleanly and flushes nothing that was not confirmed (dead letters are sent synchronously)."""

    def __init__(
        self,
        settings: LoopConfig,
        store: Store,
        stats: StatsT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.stats = stats
        self._settings = settings
        self._store = store
        self._sleep = sleep
        self._consumer = UsageConsumer(
            settings.bootstrap,
            settings.group_id,
            settings.topic,
            self._stored_offsets,
            settings.consumer_config,
            prefetch_records=settings.max_records_per_poll,
        )
        self._deadletters = DeadLetterProducer(
            settings.bootstrap, settings.deadletter_topic, settings.producer_config
        )
        self._max_records_per_poll = settings.max_records_per_poll
        self._poll_timeout_s = settings.poll_timeout_s

    @abstractmethod
    def process(self, records: Sequence[RawRecord]) -> StatsT:
        """Turn one poll's records into their effect in the store, then commit them."""

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()`` with the store's retries and backoff from the settings."""
        return call_with_retries(
            what,
            call,
            attempts=self._settings.store_attempts,
            backoff_s=self._settings.store_backoff_s,
            backoff_max_s=self._settings.store_backoff_max_s,
            sleep=self._sleep,
        )

    def _stored_offsets(self, topic: str) -> dict[int, int]:
        """Where each assigned partition starts: the offsets the store holds."""
        return self._retrying(
            "store.committed_offsets",
            lambda: self._store.committed_offsets(self._settings.group_id, topic),
        )

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
