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

from collections.abc import Callable, Sequence
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

# The source batches behind usage hours (Store.usage_batches), for `meterline explain`.
SOURCE_BATCH_SCHEMA: dict[str, pl.DataType] = {
    "agent_id": pl.String(),
    "seq": pl.Int64(),
    "topic": pl.String(),
    "partition": pl.Int32(),
    "offset": pl.Int64(),
    "received_at": INSTANT,
    "hours": pl.Int64(),  # hours of the range this batch added to
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

# The identity of a batch: Store.replace_hourly's ``batches``.
BATCH_KEY_SCHEMA: dict[str, pl.DataType] = {"agent_id": pl.String(), "seq": pl.Int64()}

# usage_hourly rows touched after an instant (Store.usage_changed_since): late usage.
CHANGED_SCHEMA: dict[str, pl.DataType] = {
    "subscription_id": pl.String(),
    "meter": pl.String(),
    "hour_start": INSTANT,
    "updated_at": INSTANT,  # the rated_at of the last write that touched the row
}

# resource_spans, written and read back: which subscription and plan a resource belonged to
# over [span_start, span_end); span_end is null while the span is open (the only nullable
# column). Key: (resource_id, span_start).
SPANS_SCHEMA: dict[str, pl.DataType] = {
    "resource_id": pl.String(),
    "subscription_id": pl.String(),
    "plan_id": pl.String(),
    "span_start": INSTANT,
    "span_end": INSTANT,
}

# resource_events: every lifecycle event stored (key: resource_id, event_id). kind is
# "created" | "resized" | "moved" | "deleted"; plan_id / subscription_id are "" when the
# event names none. No nulls.
EVENTS_SCHEMA: dict[str, pl.DataType] = {
    "resource_id": pl.String(),
    "event_id": pl.String(),
    "kind": pl.String(),
    "plan_id": pl.String(),
    "subscription_id": pl.String(),
    "occurred_at": INSTANT,
    "agent_id": pl.String(),
    "received_at": INSTANT,
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
class LifecycleOutcome:
    new_events: int  # events stored now
    duplicate_events: int  # events handed in whose (resource_id, event_id) was already stored
    resources: int  # resources whose spans were derived again
    spans: int  # spans those resources have now


# derive(all stored events of some resources, EVENTS_SCHEMA) -> their spans (SPANS_SCHEMA);
# called by write_lifecycle_events inside its transaction. Must be pure.
SpanDeriver = Callable[[pl.DataFrame], pl.DataFrame]


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


@dataclass(frozen=True, slots=True)
class AgentToken:
    """An agent's bearer token as stored: only its sha256 (lowercase hex), never the token.

    ``scope`` lists the resource ids the agent may report, or is ``("*",)`` for all.
    """

    token_hash: str
    agent_id: str
    scope: tuple[str, ...]
    issued_at: datetime
    revoked_at: datetime | None


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

    def usage_changed_since(self, instant: datetime) -> pl.DataFrame:
        """usage_hourly rows whose ``updated_at`` is after ``instant`` (CHANGED_SCHEMA),
        sorted by subscription_id, meter, hour_start. ``updated_at`` is the ``rated_at`` of
        the last write_rated (or the ``updated_at`` of the replace_hourly) that changed the
        row, so usage that arrived after an invoice was issued at ``instant`` is exactly the
        rows listed whose hour lies in the invoice's period."""
        ...

    def replace_hourly(
        self,
        start: datetime,
        end: datetime,
        partials: pl.DataFrame,
        batches: pl.DataFrame,
        updated_at: datetime,
    ) -> int:
        """Re-rating: in ONE transaction, with write_rated held off, make usage_hourly (and
        its sources) for start <= hour_start < end (whole hours) the sums of ``partials``
        (PARTIALS_SCHEMA, every row in the range), recomputed from exactly the batches
        ``batches`` (BATCH_KEY_SCHEMA). Rows whose values change (or appear, or vanish)
        take ``updated_at``; equal rows are left alone. The ledger is not touched. Raises
        ``ReplaceConflictError`` (nothing written) unless the batches counted into those
        hours are all in ``batches`` and every batch of ``batches`` is counted. Returns the
        usage_hourly rows inserted, updated or deleted."""
        ...

    # -- resource spans ----------------------------------------------------------------------
    def write_resource_spans(self, spans: pl.DataFrame) -> int:
        """Upsert spans (SPANS_SCHEMA) by (resource_id, span_start) in one transaction:
        a span already stored takes the given subscription_id, plan_id and span_end (so
        closing a span is writing it again with its end). Returns the rows written."""
        ...

    def resource_spans(
        self, start: datetime, end: datetime, resource_ids: Sequence[str] | None = None
    ) -> pl.DataFrame:
        """Spans overlapping [start, end) (span_start < end and span_end is null or
        > start), SPANS_SCHEMA, sorted by resource_id, span_start."""
        ...

    def write_lifecycle_events(
        self,
        events: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        derive: SpanDeriver,
        stored_at: datetime,
    ) -> LifecycleOutcome:
        """In ONE transaction: insert the events (EVENTS_SCHEMA) whose (resource_id,
        event_id) is new; for the resources that got a new event, read ALL their stored
        events, call ``derive`` on them and REPLACE those resources' rows of resource_spans
        by its result (a resource with lifecycle events has exactly the spans its events
        give); store the consumed offsets (never moving one backwards). Events already
        stored change nothing (the first stored wins). (resource_id, event_id) may repeat
        within ``events`` and counts once. Any failure, ``derive``'s included, rolls back
        everything."""
        ...

    def lifecycle_events(self, resource_ids: Sequence[str] | None = None) -> pl.DataFrame:
        """Stored lifecycle events (EVENTS_SCHEMA), sorted by resource_id, occurred_at,
        event_id."""
        ...

    # -- agent tokens ----------------------------------------------------------------------
    def save_agent_token(
        self, token_hash: str, agent_id: str, scope: Sequence[str], issued_at: datetime
    ) -> None:
        """Store a new active token (by its sha256 hex). A hash already stored raises
        ``ValueError`` (tokens are random: a repeat means a bug or a replayed command)."""
        ...

    def revoke_agent_tokens(self, agent_id: str, revoked_at: datetime) -> int:
        """Revoke every active token of ``agent_id``; return how many were revoked now."""
        ...

    def active_agent_tokens(self) -> list[AgentToken]:
        """Tokens not revoked, sorted by agent_id then token_hash."""
        ...

    # -- invoices --------------------------------------------------------------------------
    def save_invoices(self, invoices: Sequence[StoredInvoice]) -> None:
        """Insert or replace drafts by key, in one transaction. Replacing an issued
        invoice raises ``IssuedInvoiceError`` and writes nothing."""
        ...

    def load_invoices(self, period_start: datetime | None = None) -> list[StoredInvoice]:
        """Invoices (optionally of one period start), sorted by key."""
        ...

    # -- invoice lifecycle (issue 4): numbering, outbox ------------------------------------
    def load_invoice(self, key: str) -> StoredInvoice | None:
        """One invoice by key, or None."""
        ...

    def load_invoices_ending_after(
        self, instant: datetime, status: str | None = None
    ) -> list[StoredInvoice]:
        """Invoices whose period_end is after ``instant`` (optionally only those with
        ``status``), sorted by key: the recent ones late usage may still change."""
        ...

    def issue_invoice(
        self, key: str, series: str, issued_at: datetime, render: IssueRenderer
    ) -> StoredInvoice:
        """In ONE transaction: lock the draft ``key``, take the next number of ``series``
        (1, 2, 3, ... without gaps), call ``render(draft, seq)`` for the issued document and
        its outbox events, record the number, flip the invoice to ``issued`` and add the
        events to the outbox. Any failure (render included) rolls everything back: no gap,
        no duplicate. A missing key raises ``KeyError``; an issued one
        ``IssuedInvoiceError``."""
        ...

    def delete_drafts(self, keys: Sequence[str]) -> int:
        """Delete the drafts among ``keys`` (issued invoices and unknown keys are left
        alone); return how many were deleted."""
        ...

    def invoice_numbers(self, series: str | None = None) -> list[InvoiceNumber]:
        """Numbers given so far (optionally of one series), sorted by series and seq."""
        ...

    def pending_billing_events(self, limit: int = 1000) -> list[BillingEvent]:
        """Outbox events not yet marked published, oldest first (created_at, event_id)."""
        ...

    def mark_billing_events_published(
        self, event_ids: Sequence[str], published_at: datetime
    ) -> int:
        """Mark events published (those still pending); return how many were marked now."""
        ...

    def usage_batches(
        self, subscription_id: str, meter: str, start: datetime, end: datetime
    ) -> pl.DataFrame:
        """The batches (SOURCE_BATCH_SCHEMA) that added to usage_hourly of (subscription,
        meter) with start <= hour_start < end, with their Kafka position and how many of
        those hours each touched; sorted by topic, partition, offset. Written by write_rated
        from schema version 3 on (batch_usage; usage_sources from version 6, both read):
        batches counted before version 3 are not listed."""
        ...


class IssuedInvoiceError(RuntimeError):
    """An issued invoice never changes."""


class ReplaceConflictError(RuntimeError):
    """A re-rating does not cover exactly the batches counted into its hours."""


@dataclass(frozen=True, slots=True)
class BillingEvent:
    """An outbox row: one Kafka record to publish (at least once; dedupe by event_id)."""

    event_id: str
    topic: str
    key: str  # the Kafka key (the account id for invoice.issued)
    value: str  # JSON text
    created_at: datetime


@dataclass(frozen=True, slots=True)
class IssueRendering:
    """What the invoicer makes of a draft once the store gave it a number."""

    number: str  # e.g. "ML-2026-000001"
    document: str  # the issued document (canonical JSON)
    events: tuple[BillingEvent, ...]  # outbox rows written in the same transaction


@dataclass(frozen=True, slots=True)
class InvoiceNumber:
    invoice_key: str
    series: str
    seq: int
    number: str
    issued_at: datetime


# render(draft, seq) -> the issued document; called inside the issue transaction.
IssueRenderer = Callable[[StoredInvoice, int], IssueRendering]
