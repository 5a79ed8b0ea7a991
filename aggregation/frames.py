"""Checks and shaping of the frames handed to ``Store.write_rated``, shared by both adapters.

Pure: Polars only, whole frames at a time. The adapters call ``prepare_rated`` first, so a
bad frame is refused with a clear message before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from aggregation.ports import (
    LEDGER_SCHEMA,
    PARTIALS_SCHEMA,
    ConsumedOffset,
    StoredInvoice,
)

BATCH_KEY = ("agent_id", "seq")
HOURLY_KEY = ("subscription_id", "meter", "hour_start")
PARTIAL_KEY = (*BATCH_KEY, *HOURLY_KEY)
INVOICE_STATUSES = ("draft", "issued")
_EXAMPLES = 3  # how many offending keys an error message names


@dataclass(frozen=True, slots=True)
class RatedWrite:
    """What write_rated writes, checked and shaped.

    ``ledger`` holds each (agent_id, seq) once (the first row of each); ``partials`` holds
    each (agent_id, seq, subscription_id, meter, hour_start) once; ``offsets`` holds each
    (group_id, topic, partition) once, with its highest next_offset.
    """

    ledger: pl.DataFrame
    partials: pl.DataFrame
    offsets: tuple[ConsumedOffset, ...]
    ledger_rows: int  # rows handed in, repeats included


def require_aware(value: datetime, what: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime (UTC), got naive {value}")


def check_frame(frame: pl.DataFrame, schema: dict[str, pl.DataType], what: str) -> None:
    """Refuse a frame whose columns, dtypes or nulls differ from ``schema``; name them all."""
    problems: list[str] = []
    missing = [c for c in schema if c not in frame.schema]
    if missing:
        problems.append(f"missing columns {missing}")
    extra = [c for c in frame.schema if c not in schema]
    if extra:
        problems.append(f"unexpected columns {extra}")
    problems.extend(
        f"column {c!r} is {frame.schema[c]}, expected {dtype}"
        for c, dtype in schema.items()
        if c in frame.schema and frame.schema[c] != dtype
    )
    if not problems and frame.height:
        nulls = frame.null_count().row(0, named=True)
        problems.extend(f"column {c!r} has {n} null(s)" for c, n in nulls.items() if n)
    if problems:
        raise ValueError(f"{what} frame does not match its schema: " + "; ".join(problems))


def _examples(frame: pl.DataFrame, columns: Sequence[str]) -> str:
    rows = frame.select(columns).head(_EXAMPLES).rows()
    return ", ".join(str(r) for r in rows)


def prepare_rated(
    ledger: pl.DataFrame,
    partials: pl.DataFrame,
    offsets: Sequence[ConsumedOffset],
    rated_at: datetime,
) -> RatedWrite:
    """Check the inputs of write_rated and remove repeats that must count once."""
    require_aware(rated_at, "rated_at")
    check_frame(ledger, LEDGER_SCHEMA, "ledger")
    check_frame(partials, PARTIALS_SCHEMA, "partials")

    unique_ledger = ledger.unique(subset=BATCH_KEY, keep="first", maintain_order=True)

    # A batch delivered twice in one poll may bring its partial rows twice: identical rows
    # collapse. Two different rows for one (batch, subscription, meter, hour) cannot both
    # be right, so they are refused rather than summed.
    unique_partials = partials  # no repeated key, so no repeated row (the usual case)
    if not _strictly_sorted(partials, PARTIAL_KEY) and (
        partials.select(PARTIAL_KEY).is_duplicated().any()
    ):
        unique_partials = partials.unique(maintain_order=True)
        if unique_partials.height != unique_partials.select(PARTIAL_KEY).n_unique():
            clashes = unique_partials.filter(pl.struct(PARTIAL_KEY).is_duplicated())
            raise ValueError(
                "partials frame holds different rows for the same (agent_id, seq, "
                "subscription_id, meter, hour_start): aggregate each batch once; e.g. "
                + _examples(clashes, PARTIAL_KEY)
            )
    orphans = unique_partials.join(unique_ledger, on=BATCH_KEY, how="anti")
    if orphans.height:
        raise ValueError(
            f"partials frame has {orphans.height} row(s) of batches missing from the ledger "
            f"frame (agent_id, seq): {_examples(orphans.unique(BATCH_KEY), BATCH_KEY)}"
        )
    misaligned = unique_partials.filter(
        pl.col("hour_start") != pl.col("hour_start").dt.truncate("1h")
    )
    if misaligned.height:
        raise ValueError(
            f"partials frame has {misaligned.height} hour_start value(s) not on a whole UTC "
            f"hour, e.g. {misaligned['hour_start'].head(_EXAMPLES).to_list()}"
        )

    latest: dict[tuple[str, str, int], ConsumedOffset] = {}
    for offset in offsets:
        if offset.next_offset < 0:
            raise ValueError(f"negative next_offset in {offset}")
        key = (offset.group_id, offset.topic, offset.partition)
        if key not in latest or latest[key].next_offset < offset.next_offset:
            latest[key] = offset

    return RatedWrite(
        ledger=unique_ledger,
        partials=unique_partials,
        offsets=tuple(latest.values()),
        ledger_rows=ledger.height,
    )


# Largest magnitude of a numeric(38,0) / Decimal(38,0) quantity.
_QUANTITY_LIMIT = 10**38 - 1


# The batches a ledger insert counted (its RETURNING rows), with their surrogate keys.
NEW_BATCH_SCHEMA: dict[str, pl.DataType] = {
    "agent_id": pl.String(),
    "seq": pl.Int64(),
    "batch_id": pl.Int64(),
}


def _may_overflow(quantity: pl.Series, rows: pl.Series) -> bool:
    """Whether a sum of ``rows`` (per hour row) values of ``quantity`` could pass 38 digits."""
    largest = int(quantity.abs().max() or 0)  # type: ignore[arg-type]
    return largest * int(rows.max() or 0) > _QUANTITY_LIMIT  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class HourlySources:
    """The new partial rows of a write_rated call summed per hour row, with their sources.

    ``hourly`` has the hour key, ``quantity`` (sum), ``quantity_max`` (max), ``sample_count``
    (sum), and ``lo`` and ``hi`` (Int32): the 1-based, inclusive bounds of the hour row's
    batches in ``batch_ids`` (each hour row's batch ids are contiguous there, each batch
    once). Polars' decimal sum wraps on overflow, so when a sum could pass 38 digits (rows
    per hour row x largest |quantity| > 10^38 - 1) the rows come back unsummed, for the
    database's exact sum (which raises) to do it, those of one hour row next to each other;
    then only the first of them carries the bounds and the others an empty slice (``lo`` 1 >
    ``hi`` 0), so that the sources still come out one row per hour row.
    """

    hourly: pl.DataFrame
    batch_ids: pl.Series


def _strictly_sorted(frame: pl.DataFrame, key: Sequence[str]) -> bool:
    """Whether every row's key is greater than the row's before (so no key repeats): one
    pass over adjacent rows, several times cheaper than hashing the key, and true for the
    engine's partials, which come sorted by PARTIAL_KEY. False says nothing."""
    if frame.height < 2:
        return True
    later = pl.col(key[-1]) > pl.col(key[-1]).shift(1)
    for column in reversed(key[:-1]):
        this, before = pl.col(column), pl.col(column).shift(1)
        later = (this > before) | ((this == before) & later)
    return bool(frame.select(later.slice(1).fill_null(value=False).all()).item())


def sum_per_hour_with_sources(fresh: pl.DataFrame) -> HourlySources:
    """``fresh`` (PARTIALS_SCHEMA plus ``batch_id``: the ledger's surrogate key of each
    row's batch) summed per (subscription_id, meter, hour_start), and the batch ids of each
    hour row, in one pass (one group_by, no sort of the rows); see ``HourlySources``."""
    grouped = fresh.group_by(HOURLY_KEY).agg(
        pl.col("quantity").sum(),
        pl.col("quantity_max").max(),
        pl.col("sample_count").sum(),
        pl.col("batch_id"),
    )
    rows = grouped["batch_id"].list.len()
    hi = rows.cum_sum()
    grouped = grouped.with_columns(lo=(hi - rows + 1).cast(pl.Int32), hi=hi.cast(pl.Int32))
    batch_ids = grouped["batch_id"].explode()
    if not _may_overflow(fresh["quantity"], rows):
        return HourlySources(grouped.drop("batch_id"), batch_ids)
    # Left unsummed for the database's exact sum: each hour row's rows in grouped's order.
    order = grouped.select(*HOURLY_KEY, "lo", "hi").with_row_index("group")
    unsummed = (
        fresh.select(*HOURLY_KEY, "quantity", "quantity_max", "sample_count")
        .join(order, on=HOURLY_KEY)
        .sort("group", maintain_order=True)
    )
    first = unsummed["group"].is_first_distinct()
    unsummed = unsummed.with_columns(
        lo=pl.when(first).then(pl.col("lo")).otherwise(pl.lit(1, pl.Int32)),
        hi=pl.when(first).then(pl.col("hi")).otherwise(pl.lit(0, pl.Int32)),
    ).drop("group")
    return HourlySources(unsummed, batch_ids)


def check_invoices(invoices: Sequence[StoredInvoice]) -> None:
    """Refuse invoices the store cannot keep as given; name the key and the problem."""
    seen: set[str] = set()
    for invoice in invoices:
        where = f"invoice {invoice.key!r}"
        if invoice.key in seen:
            raise ValueError(f"{where} appears twice in one save_invoices call")
        seen.add(invoice.key)
        if invoice.status not in INVOICE_STATUSES:
            raise ValueError(f"{where}: status {invoice.status!r} is not one of {INVOICE_STATUSES}")
        require_aware(invoice.period_start, f"{where}: period_start")
        require_aware(invoice.period_end, f"{where}: period_end")
        if invoice.period_end <= invoice.period_start:
            raise ValueError(f"{where}: period_end must be after period_start")
