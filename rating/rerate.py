"""Re-rating: recompute hourly usage for a range of hours from the raw-batch archive.

``rerate`` takes the archived records whose samples may touch ``[start, end)`` (whole UTC
hours), decodes them with the worker's codec and rates them with the worker's engine against
the catalog given (the current one), keeps the hour rows inside the range and compares them
with what the store holds. ``apply_rerating`` writes them (``Store.replace_hourly``: one
transaction; refused unless the archive holds exactly the batches counted into those hours).

What can change: which subscription a resource's usage belongs to (a resource moved in the
catalog), whether a sample resolves at all (a resource or meter added or removed: samples
once dead-lettered as unresolved are counted now, and samples that no longer resolve are
reported and left out), the meter kind. Prices are not the rater's business: the invoicer
applies the current prices when it closes or previews a period.

Exactly once: the ledger is not touched. Each batch stays counted once; its contribution to
the re-rated hours is replaced, never added again, and a later delivery of it is still a
duplicate. Work is bounded per chunk of records: one chunk decoded and rated at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from aggregation.ports import BATCH_KEY_SCHEMA, HOURLY_SCHEMA, PARTIALS_SCHEMA, QUANTITY, Store
from rating.archive import ARCHIVE_SCHEMA
from rating.catalog import Catalog
from rating.engine import HOUR_S, MAX_DURATION_S, CatalogFrames, rate
from rating.record_codec import RawRecord, decode_records

HOURLY_KEY = ["subscription_id", "meter", "hour_start"]
CHUNK_RECORDS = 1000

# One row per (subscription, meter, hour) whose stored and re-rated values differ.
DIFF_SCHEMA: dict[str, pl.DataType] = {
    "subscription_id": pl.String(),
    "meter": pl.String(),
    "hour_start": pl.Datetime("us", "UTC"),
    "stored_quantity": QUANTITY,
    "rerated_quantity": QUANTITY,
    "quantity_diff": pl.Int128(),  # rerated - stored
    "stored_max": QUANTITY,
    "rerated_max": QUANTITY,
    "max_diff": pl.Int128(),
    "sample_count_diff": pl.Int64(),
}


@dataclass(frozen=True, slots=True)
class Rerating:
    start: datetime
    end: datetime
    records: int  # archived records read (each Kafka position once)
    batches: pl.DataFrame  # BATCH_KEY_SCHEMA: the distinct batches the rows come from
    partials: pl.DataFrame  # PARTIALS_SCHEMA: their re-rated parts inside the range
    hourly: pl.DataFrame  # HOURLY_SCHEMA: the re-rated hour rows
    unresolved_samples: int  # samples the catalog does not resolve (left out)
    diff: pl.DataFrame  # DIFF_SCHEMA, sorted by subscription_id, meter, hour_start

    def totals(self) -> pl.DataFrame:
        """The signed differences summed per (subscription_id, meter)."""
        return (
            self.diff.group_by("subscription_id", "meter")
            .agg(
                pl.len().alias("hours"),
                pl.col("quantity_diff").sum(),
                pl.col("sample_count_diff").sum(),
            )
            .sort("subscription_id", "meter")
        )


def hour_bounds(start: datetime, end: datetime) -> tuple[int, int]:
    """``[start, end)`` as unix seconds; both must be aware, on whole hours, start < end."""
    bounds: list[int] = []
    for name, instant in (("--from", start), ("--to", end)):
        if instant.tzinfo is None or instant.utcoffset() is None:
            raise ValueError(f"{name} {instant} has no offset: give Z or +01:00")
        seconds = int(instant.timestamp())
        if seconds % HOUR_S or instant.microsecond:
            raise ValueError(f"{name} {instant.isoformat()} is not on a whole UTC hour")
        bounds.append(seconds)
    if bounds[0] >= bounds[1]:
        raise ValueError(f"--from {start.isoformat()} must be before --to {end.isoformat()}")
    return bounds[0], bounds[1]


def rerate(
    archived: pl.DataFrame,
    stored: pl.DataFrame,
    catalog: Catalog,
    start: datetime,
    end: datetime,
    *,
    max_duration_s: int = MAX_DURATION_S,
    chunk_records: int = CHUNK_RECORDS,
) -> Rerating:
    """Re-rate ``archived`` (ARCHIVE_SCHEMA: at least every record touching the range) into
    the hours of ``[start, end)`` and diff against ``stored`` (HOURLY_SCHEMA, the store's
    rows of those hours)."""
    hour_bounds(start, end)
    if archived.schema != pl.Schema(ARCHIVE_SCHEMA):
        raise ValueError(f"archive frame does not match ARCHIVE_SCHEMA: {dict(archived.schema)}")
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    frames = CatalogFrames.from_catalog(catalog)
    # A batch delivered twice (two Kafka positions) counts once, from its first record.
    records = archived.sort("topic", "partition", "offset").unique(
        ["agent_id", "seq"], keep="first", maintain_order=True
    )
    parts: list[pl.DataFrame] = [pl.DataFrame(schema=PARTIALS_SCHEMA)]
    unresolved = 0
    for chunk in records.iter_slices(chunk_records):
        raw = [
            RawRecord(topic, partition, offset, value)
            for topic, partition, offset, value in chunk.select(
                "topic", "partition", "offset", "value"
            ).iter_rows()
        ]
        decoded = decode_records(raw)
        if decoded.undecodable:
            first = decoded.undecodable[0]
            raise ValueError(
                f"archived record {first.record.topic}/{first.record.partition}/"
                f"{first.record.offset} cannot be decoded ({first.error}): the archive is "
                "damaged"
            )
        rated = rate(decoded.samples, frames, max_duration_s)
        unresolved += rated.unresolved.height
        hour = pl.col("hour_start")
        parts.append(rated.partials.filter((hour >= start) & (hour < end)))
    partials = pl.concat(parts, how="vertical")
    hourly = (
        partials.group_by(HOURLY_KEY)
        .agg(
            pl.col("quantity").cast(pl.Int128).sum(),
            pl.col("quantity_max").cast(pl.Int128).max(),
            pl.col("sample_count").sum(),
        )
        .with_columns(pl.col("quantity", "quantity_max").cast(QUANTITY))
        .select(list(HOURLY_SCHEMA))
        .sort(HOURLY_KEY)
    )
    return Rerating(
        start=start,
        end=end,
        records=archived.height,
        batches=records.select(list(BATCH_KEY_SCHEMA)),
        partials=partials,
        hourly=hourly,
        unresolved_samples=unresolved,
        diff=diff_hourly(stored, hourly),
    )


def diff_hourly(stored: pl.DataFrame, rerated: pl.DataFrame) -> pl.DataFrame:
    """Rows of either frame (HOURLY_SCHEMA) whose values differ (a missing row counts as 0),
    with the signed differences (rerated - stored)."""
    zero = pl.lit(0, dtype=QUANTITY)
    joined = stored.join(rerated, on=HOURLY_KEY, how="full", coalesce=True, suffix="_new")
    return (
        joined.select(
            *HOURLY_KEY,
            stored_quantity=pl.col("quantity").fill_null(zero),
            rerated_quantity=pl.col("quantity_new").fill_null(zero),
            stored_max=pl.col("quantity_max").fill_null(zero),
            rerated_max=pl.col("quantity_max_new").fill_null(zero),
            stored_count=pl.col("sample_count").fill_null(0),
            rerated_count=pl.col("sample_count_new").fill_null(0),
        )
        .with_columns(
            quantity_diff=pl.col("rerated_quantity").cast(pl.Int128)
            - pl.col("stored_quantity").cast(pl.Int128),
            max_diff=pl.col("rerated_max").cast(pl.Int128) - pl.col("stored_max").cast(pl.Int128),
            sample_count_diff=pl.col("rerated_count") - pl.col("stored_count"),
        )
        .filter(
            (pl.col("quantity_diff") != 0)
            | (pl.col("max_diff") != 0)
            | (pl.col("sample_count_diff") != 0)
        )
        .select(list(DIFF_SCHEMA))
        .sort(HOURLY_KEY)
    )


def apply_rerating(store: Store, rerating: Rerating, applied_at: datetime) -> int:
    """Write the re-rated hours (one transaction, see ``Store.replace_hourly``); return the
    hour rows changed."""
    return store.replace_hourly(
        rerating.start, rerating.end, rerating.partials, rerating.batches, applied_at
    )
