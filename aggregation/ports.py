"""The store port: what rating and the invoicer may ask of the store.

Two adapters implement it: ``aggregation.pg_store`` (PostgreSQL / TimescaleDB) and
``aggregation.duckdb_store`` (the embedded single-machine default). One contract test
suite (``tests/integration/test_store_contract.py``) runs against both.

The store never prices anything and never interprets the catalog: it keeps the catalog
as an opaque, versioned document, and usage as exact integer quantities.

Frames crossing this port have declared schemas (below). Quantities are
``Decimal(38, 0)`` so that sums of int64 samples (gauges integrate level x seconds) never
overflow; instants are ``Datetime("us", "UTC")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import polars as pl

QUANTITY = pl.Decimal(38, 0)
INSTANT = pl.Datetime("us", "UTC")

# One row per accepted Kafka record (= one agent batch) handed to write_rated().
LEDGER_SCHEMA: dict[str, pl.DataType] = {
    "agent_id": pl.String(),
    "seq": pl.Int64(),
    "topic": pl.String(),
    "partition": pl.Int32(),
    "offset": pl.Int64(),
    "received_at": INSTANT,
    "sample_count": pl.Int64(),
}

# Usage aggregated per batch: (agent_id, seq) says which batch each part came from, so the
# store can keep exactly the parts of batches it has not seen before.
PARTIALS_SCHEMA: dict[str, pl.DataType] = {
    "agent_id": pl.String(),
    "seq": pl.Int64(),
    "subscription_id": pl.String(),
    "meter": pl.String(),
    "hour_start": INSTANT,
    "quantity": QUANTITY,  # sum: counter deltas, or gauge level x seconds
    "quantity_max": QUANTITY,  # max of the sample values (the peak for peak meters)
    "sample_count": pl.Int64(),
}

# usage_hourly as read back.
HOURLY_SCHEMA: dict[str, pl.DataType] = {
    "subscription_id": pl.String(),
    "meter": pl.String(),
    "hour_start": INSTANT,
    "quantity": QUANTITY,
    "quantity_max": QUANTITY,
    "sample_count": pl.Int64(),
}


@dataclass(frozen=True, slots=True)
class ConsumedOffset:
    """The next offset to consume on a partition, stored with the effects it covers."""

    group_id: str
    topic: str
    partition: int
    next_offset: int


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    new_batches: int  # batches counted now
    duplicate_batches: int  # batches already in the ledger: nothing of them was counted again
    hourly_rows: int  # usage_hourly rows inserted or updated


@dataclass(frozen=True, slots=True)
class StoredCatalog:
    version: int
    document: str  # the catalog as applied, canonical JSON
    digest: str  # sha256 of document
    source: str  # where it came from (file path)
    applied_at: datetime


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Usage of one (subscription, meter) over a half-open range of hours."""

    subscription_id: str
    meter: str
    quantity: int  # sum over the range
    quantity_max: int  # max over the range
    sample_count: int


@dataclass(frozen=True, slots=True)
class StoredInvoice:
    """An invoice as the invoicer rendered it. ``key`` is deterministic:
    ``{account_id}/{local start date of the period}``; saving a draft again replaces it."""

    key: str
    account_id: str
    period_start: datetime
    period_end: datetime
    currency: str
    status: str  # "draft" | "issued"
    total_minor: int
    document: str  # canonical JSON of the invoice and its lines


class Store(Protocol):
    def migrate(self) -> list[int]:
        """Apply pending migrations in order; return the versions applied now."""
        ...

    def close(self) -> None: ...

    # -- catalog -------------------------------------------------------------------------
    def save_catalog(self, document: str, digest: str, source: str, applied_at: datetime) -> int:
        """Store a new catalog version atomically; return its version number."""
        ...

    def load_catalog(self) -> StoredCatalog | None:
        """The latest catalog version, or None before the first apply."""
        ...

    # -- rating, exactly once --------------------------------------------------------------
    def write_rated(
        self,
        ledger: pl.DataFrame,
        partials: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        rated_at: datetime,
    ) -> WriteOutcome:
        """In ONE transaction: add the ledger rows whose (agent_id, seq) is new, add to
        usage_hourly exactly the partials of those new batches (sum ``quantity``, max
        ``quantity_max``, sum ``sample_count``), and store the consumed offsets (never
        moving one backwards). Batches already in the ledger change nothing.
        ``ledger`` has LEDGER_SCHEMA and ``partials`` PARTIALS_SCHEMA; (agent_id, seq) may
        repeat within ``ledger`` (a batch delivered twice in one poll) and counts once."""
        ...

    def committed_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        """partition -> next offset to consume, as stored by write_rated()."""
        ...

    # -- usage queries ---------------------------------------------------------------------
    def usage_hourly(
        self, start: datetime, end: datetime, subscription_ids: Sequence[str] | None = None
    ) -> pl.DataFrame:
        """usage_hourly rows with start <= hour_start < end (HOURLY_SCHEMA), sorted by
        subscription_id, meter, hour_start."""
        ...

    def usage_totals(
        self, start: datetime, end: datetime, subscription_ids: Sequence[str] | None = None
    ) -> list[UsageTotal]:
        """Per (subscription, meter): sum and max over start <= hour_start < end, sorted."""
        ...

    def ledger_count(self) -> int:
        """How many distinct batches have been counted."""
        ...

    # -- invoices --------------------------------------------------------------------------
    def save_invoices(self, invoices: Sequence[StoredInvoice]) -> None:
        """Insert or replace drafts by key, in one transaction. Replacing an issued
        invoice raises ``IssuedInvoiceError`` and writes nothing."""
        ...

    def load_invoices(self, period_start: datetime | None = None) -> list[StoredInvoice]:
        """Invoices (optionally of one period start), sorted by key."""
        ...


class IssuedInvoiceError(RuntimeError):
    """An issued invoice never changes."""
