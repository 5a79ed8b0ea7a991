"""The rating worker: Kafka usage records -> rated hourly partials in the store, exactly once.

One poll at a time (at most ``max_records_per_poll`` records):

1. decode the records (``record_codec``) and rate their samples (``engine``);
2. dead-letter what cannot be rated and wait until Kafka confirmed it (raise otherwise):
   an undecodable record as it was, and the unresolved samples of a batch as a copy of
   the batch holding only those samples; with an archive (``archive_dir``), archive the
   poll's decodable records (``rating.archive``), durably, before the store write;
3. ``store.write_rated``: ledger rows, hourly partials and the next offset per partition,
   in one transaction (bounded retries with backoff; after the last attempt it raises);
4. only then commit the offsets to Kafka.

A crash anywhere before 3 replays the poll; after 3, the dedup ledger makes the replay
change nothing. On every partition assignment the consumer seeks to the offsets in the
store, so the store, not Kafka, decides where rating resumes. A dead letter may be
written twice by such a replay; it carries its batch's ``(agent_id, seq)`` for dedup.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl

from aggregation.ports import Store, WriteOutcome
from rating import consumer_loop
from rating.archive import RawArchive, archive_frame
from rating.catalog import Catalog
from rating.consumer_loop import (
    ConsumerLoop,
    consumed_offsets,
    letter_headers,
    next_offsets,
)
from rating.engine import MAX_DURATION_S, CatalogFrames, rate
from rating.kafka_source import DeadLetter
from rating.parquet_archive import ParquetArchive
from rating.record_codec import RawRecord, decode_records, parse_record, subset_record

log = logging.getLogger(__name__)

STAGE = "rating"
# Longest meterline.error header, in characters; the rest is summarised.


# Fault injection for the crash tests (tests/integration/test_exactly_once_failures.py):
# METERLINE_RATING_CRASH_AT="<point>:<n>" makes the worker's process kill itself with
# SIGKILL (no cleanup, as a crash) the n-th time one poll reaches <point>. Unset (the
# default) it is inert and costs one ``is None`` check per poll.
CRASH_ENV = "METERLINE_RATING_CRASH_AT"
CRASH_POINTS = ("before_store_write", "after_store_write")


class CrashHook:
    """Kills this process at a named point of a poll (see ``CRASH_ENV``)."""

    def __init__(self, point: str, nth: int) -> None:
        if point not in CRASH_POINTS or nth < 1:
            raise ValueError(
                f"{CRASH_ENV}: want '<point>:<n>' with point in {CRASH_POINTS} and n >= 1, "
                f"got point={point!r} n={nth}"
            )
        self.point = point
        self._remaining = nth

    @classmethod
    def from_env(cls, value: str | None) -> CrashHook | None:
        if not value:
            return None
        point, _, nth = value.partition(":")
        try:
            count = int(nth or "1")
        except ValueError:
            raise ValueError(f"{CRASH_ENV}={value!r}: n must be an integer") from None
        return cls(point, count)

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self._remaining -= 1
        if self._remaining == 0:
            log.warning("%s: killing this process at %s", CRASH_ENV, point)
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    bootstrap: str
    topic: str = "usage.samples.v1"
    group_id: str = "meterline-rating"
    deadletter_topic: str = "usage.deadletter.v1"
    max_records_per_poll: int = 500  # records (batches) per store transaction
    poll_timeout_s: float = 0.5  # longest wait for records in one poll
    store_attempts: int = 5  # tries of one store call before the worker gives up
    store_backoff_s: float = 0.2  # first wait between tries; doubles each time
    store_backoff_max_s: float = 5.0
    deadletter_timeout_s: float = 30.0  # longest wait for Kafka to confirm dead letters
    max_sample_duration_s: int = MAX_DURATION_S
    archive_dir: Path | None = None  # raw-batch archive (Parquet); None: no archive
    # Extra librdkafka settings, e.g. {"session.timeout.ms": 6000}.
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
            ("max_sample_duration_s", self.max_sample_duration_s, 0, MAX_DURATION_S),
        ]
        for name, value, low, high in limits:
            if not low <= value <= high:
                raise ValueError(f"WorkerConfig.{name} = {value} is outside [{low}, {high}]")
        for name in ("bootstrap", "topic", "group_id", "deadletter_topic"):
            if not getattr(self, name):
                raise ValueError(f"WorkerConfig.{name} must not be empty")


@dataclass(frozen=True, slots=True)
class WorkerStats:
    polls: int = 0  # polls that returned records
    records: int = 0  # Kafka records consumed
    batches_new: int = 0  # batches counted now
    batches_duplicate: int = 0  # records of batches already counted (before or in this poll)
    samples: int = 0  # samples decoded (a batch repeated within one poll counts once)
    unresolved_samples: int = 0  # samples dead-lettered as unresolvable
    undecodable: int = 0  # records dead-lettered as undecodable
    dead_lettered: int = 0  # dead letters written (records)

    def plus(self, other: WorkerStats) -> WorkerStats:
        return WorkerStats(
            *(getattr(self, f) + getattr(other, f) for f in WorkerStats.__dataclass_fields__)
        )


class RatingWorker(ConsumerLoop[WorkerStats]):
    """Consumes the usage topic and writes rated usage to the store.

    Use as a context manager (``close()`` leaves the consumer group cleanly)."""

    def __init__(
        self,
        config: WorkerConfig,
        store: Store,
        catalog: Catalog,
        clock: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
        *,
        archive: RawArchive | None = None,
    ) -> None:
        """``archive``: where to archive each poll (default: a ``ParquetArchive`` in
        ``config.archive_dir`` when set, else none)."""
        self.config = config
        if archive is None and config.archive_dir is not None:
            archive = ParquetArchive(config.archive_dir)
        self._archive = archive
        self._frames = CatalogFrames.from_catalog(catalog)
        self._clock = clock
        self._crash = CrashHook.from_env(os.environ.get(CRASH_ENV))
        super().__init__(config, store, WorkerStats(), sleep)

    # -- one poll ------------------------------------------------------------------------

    def process(self, records: Sequence[RawRecord]) -> WorkerStats:
        """Decode, rate, dead-letter, write, then commit one poll's records."""
        decoded = decode_records(records)
        rated = rate(decoded.samples, self._frames, self.config.max_sample_duration_s)

        letters = [undecodable_letter(u.record, u.error) for u in decoded.undecodable]
        letters.extend(unresolved_letters(records, decoded.ledger, rated.unresolved))
        if letters:
            self._deadletters.send(letters, self.config.deadletter_timeout_s)

        offsets = next_offsets(records)
        consumed = consumed_offsets(self.config.group_id, offsets)
        if self._archive is not None and decoded.ledger.height:
            # Before the store write: a batch counted is always in the archive (a crash
            # between the two replays the poll, whose file is then already there).
            archive, accepted = self._archive, archive_frame(records, decoded)
            self._retrying("archive.write", lambda: archive.write(accepted))
        rated_at = self._clock()
        if self._crash is not None:
            self._crash.reached("before_store_write")
        outcome: WriteOutcome = self._retrying(
            "store.write_rated",
            lambda: self._store.write_rated(decoded.ledger, rated.partials, consumed, rated_at),
        )
        if self._crash is not None:
            self._crash.reached("after_store_write")
        self._consumer.commit(offsets)

        stats = WorkerStats(
            polls=1,
            records=len(records),
            batches_new=outcome.new_batches,
            # The store counts a batch repeated within this poll as a duplicate too, so
            # new + duplicate = decodable records, however the records fell into polls.
            batches_duplicate=outcome.duplicate_batches,
            samples=decoded.samples.height,
            unresolved_samples=rated.unresolved.height,
            undecodable=len(decoded.undecodable),
            dead_lettered=len(letters),
        )
        log.debug("rated a poll: %s", stats)
        return stats


# -- dead letters ----------------------------------------------------------------------------


def undecodable_letter(record: RawRecord, error: str) -> DeadLetter:
    return consumer_loop.undecodable_letter(record, error, STAGE)


def unresolved_letters(
    records: Sequence[RawRecord], ledger: pl.DataFrame, unresolved: pl.DataFrame
) -> list[DeadLetter]:
    """One dead letter per batch with unresolved samples: a copy of the batch holding only
    those samples, headers naming each reason with its count."""
    if unresolved.is_empty():
        return []
    by_position = {(r.topic, r.partition, r.offset): r for r in records}
    # The first record of each batch in this poll is the one whose samples were rated.
    first_record = (
        ledger.unique(["agent_id", "seq"], keep="first", maintain_order=True)
        .select("agent_id", "seq", "topic", "partition", "offset")
        .rows()
    )
    source = {(a, s): by_position[t, p, o] for a, s, t, p, o in first_record}
    reason_counts = (
        unresolved.group_by("agent_id", "seq", "reason", maintain_order=True)
        .len()
        .group_by("agent_id", "seq", maintain_order=True)
        .agg(pl.col("reason"), pl.col("len"))
    )
    per_batch = (
        unresolved.group_by("agent_id", "seq", maintain_order=True)
        .agg(pl.col("sample_index"))
        .join(reason_counts, on=["agent_id", "seq"], how="left", maintain_order="left")
        .rows()
    )
    letters: list[DeadLetter] = []
    for agent_id, seq, indexes, reasons, counts in per_batch:
        record = source[agent_id, seq]
        error = "; ".join(
            f"{reason} ({n} sample{'s' if n != 1 else ''})"
            for reason, n in zip(reasons, counts, strict=True)
        )
        subset = subset_record(parse_record(record.value), indexes)
        letters.append(
            DeadLetter(
                record.key,
                subset.SerializeToString(),
                letter_headers(
                    record,
                    STAGE,
                    "unresolved",
                    error,
                    [("meterline.sample_indexes", ",".join(map(str, indexes)).encode())],
                ),
            )
        )
    return letters
