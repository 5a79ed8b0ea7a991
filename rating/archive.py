"""The raw-batch archive: what the worker hands to it, and the port it writes through.

Every accepted (decodable) Kafka record of a poll is archived as it was consumed, before the
poll's store transaction, so that ``meterline rerate`` can rate the same bytes again with
the current catalog and auditors can trace every hourly row back to the records behind it.

One row per record (``ARCHIVE_SCHEMA``): its Kafka position, its identity and arrival, the
record value exactly as consumed (the ``UsageBatchRecord`` bytes: re-rating decodes them
with the same codec and rates them with the same engine, so it is exact), and the time
bounds of its samples so a reader can skip records outside a range without decoding them.

Undecodable records are not archived (they are dead-lettered as they were). Pure Polars
here; ``rating.parquet_archive`` is the one module that writes and reads the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import polars as pl

from aggregation.ports import INSTANT
from rating.engine import MAX_DURATION_S
from rating.record_codec import Decoded, RawRecord

ARCHIVE_SCHEMA: dict[str, pl.DataType] = {
    "topic": pl.String(),
    "partition": pl.Int32(),
    "offset": pl.Int64(),
    "agent_id": pl.String(),
    "seq": pl.Int64(),
    "received_at": INSTANT,
    "sample_count": pl.Int64(),
    # Bounds of the record's samples in unix seconds: the earliest start and the latest
    # start + duration (duration clipped to [0, 31 days]); 0 and 0 for a record without
    # samples. A record may touch hour h only if first_start_unix_s < h + 3600 and
    # last_end_unix_s >= h.
    "first_start_unix_s": pl.Int64(),
    "last_end_unix_s": pl.Int64(),
    "value": pl.Binary(),  # the record value as consumed
}

# Instants outside [1970, 10000) are unresolved anyway; clipping keeps the sums in int64.
_START_LIMIT = 2**62


class RawArchive(Protocol):
    """Where the worker archives each poll's accepted records (see ``ARCHIVE_SCHEMA``)."""

    def write(self, records: pl.DataFrame) -> int:
        """Durably archive ``records`` (ARCHIVE_SCHEMA) before returning; writing the same
        records again is harmless. Returns how many files were written now."""
        ...


def archive_frame(records: Sequence[RawRecord], decoded: Decoded) -> pl.DataFrame:
    """The poll's decodable records (the rows of ``decoded.ledger``) with their values and
    sample bounds, sorted by topic, partition, offset. One Python step per record (its
    value), none per sample."""
    values = pl.DataFrame(
        {
            "topic": [r.topic for r in records],
            "partition": [r.partition for r in records],
            "offset": [r.offset for r in records],
            "value": [r.value for r in records],
        },
        schema={
            "topic": pl.String(),
            "partition": pl.Int32(),
            "offset": pl.Int64(),
            "value": pl.Binary(),
        },
    )
    start = pl.col("start_unix_s").clip(-_START_LIMIT, _START_LIMIT)
    bounds = decoded.samples.group_by("agent_id", "seq").agg(
        first_start_unix_s=start.min(),
        last_end_unix_s=(start + pl.col("duration_s").clip(0, MAX_DURATION_S)).max(),
    )
    return (
        decoded.ledger.join(
            values, on=["topic", "partition", "offset"], how="left", maintain_order="left"
        )
        .join(bounds, on=["agent_id", "seq"], how="left", maintain_order="left")
        .with_columns(pl.col("first_start_unix_s", "last_end_unix_s").fill_null(0))
        .select(list(ARCHIVE_SCHEMA))
        .sort("topic", "partition", "offset")
    )
