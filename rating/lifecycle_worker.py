"""The spans worker: lifecycle records from Kafka -> resource spans in the store, exactly once.

Per poll (at most ``max_records_per_poll`` records of ``resource.events.v1``):

1. decode the records (``rating.lifecycle``); dead-letter the undecodable ones and wait
   until Kafka confirmed them (raise otherwise);
2. ``store.write_lifecycle_events(events, next offsets, derive, now)`` in ONE transaction:
   the new events are stored (by ``(resource_id, event_id)``: a replay stores nothing), the
   spans of every resource that got a new event are derived again from all its events and
   replace its spans, and the consumed offsets are stored (bounded retries with backoff);
3. only then commit the offsets to Kafka.

On every partition assignment the consumer seeks to the offsets the store holds for its
group (``consumer_offsets``, keyed by group/topic/partition like rating's), so the store
decides where it resumes; a crash anywhere replays at most one poll, and replayed events
change nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from aggregation.ports import LifecycleOutcome, Store
from rating.catalog import Catalog
from rating.consumer_loop import (
    ConsumerLoop,
    consumed_offsets,
    next_offsets,
    undecodable_letter,
)
from rating.lifecycle import decode_lifecycle_records, derive_spans
from rating.record_codec import RawRecord

log = logging.getLogger(__name__)

STAGE = "spans"


@dataclass(frozen=True, slots=True)
class SpansConfig:
    bootstrap: str
    topic: str = "resource.events.v1"
    group_id: str = "meterline-spans"
    deadletter_topic: str = "resource.events.deadletter.v1"
    max_records_per_poll: int = 500
    poll_timeout_s: float = 0.5
    store_attempts: int = 5
    store_backoff_s: float = 0.2
    store_backoff_max_s: float = 5.0
    deadletter_timeout_s: float = 30.0
    consumer_config: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    producer_config: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        limits: list[tuple[str, float, float, float]] = [
            ("max_records_per_poll", self.max_records_per_poll, 1, 100_000),
            ("poll_timeout_s", self.poll_timeout_s, 0.001, 60),
            ("store_attempts", self.store_attempts, 1, 100),
            ("store_backoff_s", self.store_backoff_s, 0, 60),
            ("store_backoff_max_s", self.store_backoff_max_s, 0, 600),
            ("deadletter_timeout_s", self.deadletter_timeout_s, 0.001, 600),
        ]
        for name, value, low, high in limits:
            if not low <= value <= high:
                raise ValueError(f"SpansConfig.{name} = {value} is outside [{low}, {high}]")
        for name in ("bootstrap", "topic", "group_id", "deadletter_topic"):
            if not getattr(self, name):
                raise ValueError(f"SpansConfig.{name} must not be empty")


@dataclass(frozen=True, slots=True)
class SpansStats:
    polls: int = 0  # polls that returned records
    records: int = 0  # Kafka records consumed
    events: int = 0  # events decoded
    new_events: int = 0  # events stored now
    duplicate_events: int = 0  # events already stored (replays, resends)
    resources: int = 0  # resources whose spans were derived again
    spans: int = 0  # spans those resources have after the poll
    unresolved_spans: int = 0  # spans left out: no subscription could be resolved
    undecodable: int = 0  # records dead-lettered

    def plus(self, other: SpansStats) -> SpansStats:
        return SpansStats(
            *(getattr(self, f) + getattr(other, f) for f in SpansStats.__dataclass_fields__)
        )


class SpansWorker(ConsumerLoop[SpansStats]):
    """Consumes the lifecycle topic and keeps the store's resource spans. A context
    manager (``close()`` leaves the consumer group cleanly)."""

    def __init__(
        self,
        config: SpansConfig,
        store: Store,
        catalog: Catalog,
        clock: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._subscriptions = {r.id: r.subscription_id for r in catalog.resources.values()}
        self._clock = clock
        super().__init__(config, store, SpansStats(), sleep)

    def process(self, records: Sequence[RawRecord]) -> SpansStats:
        decoded = decode_lifecycle_records(records)
        letters = [undecodable_letter(u.record, u.error, STAGE) for u in decoded.undecodable]
        if letters:
            self._deadletters.send(letters, self.config.deadletter_timeout_s)

        offsets = next_offsets(records)
        consumed = consumed_offsets(self.config.group_id, offsets)
        unresolved = 0

        def derive(events: pl.DataFrame) -> pl.DataFrame:
            nonlocal unresolved
            derivation = derive_spans(events, self._subscriptions)
            unresolved = derivation.unresolved.height
            if unresolved:
                log.warning(
                    "%d span(s) left out, no subscription for their resource: %s",
                    unresolved,
                    derivation.unresolved.select("resource_id", "span_start").head(5).rows(),
                )
            return derivation.spans

        now = self._clock()
        outcome: LifecycleOutcome = self._retrying(
            "store.write_lifecycle_events",
            lambda: self._store.write_lifecycle_events(decoded.events, consumed, derive, now),
        )
        self._consumer.commit(offsets)
        return SpansStats(
            polls=1,
            records=len(records),
            events=decoded.events.height,
            new_events=outcome.new_events,
            duplicate_events=outcome.duplicate_events,
            resources=outcome.resources,
            spans=outcome.spans,
            unresolved_spans=unresolved,
            undecodable=len(decoded.undecodable),
        )
