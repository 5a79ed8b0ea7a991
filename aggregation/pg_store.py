"""The Store on PostgreSQL (and TimescaleDB) with psycopg 3: the only module importing psycopg.

One connection in autocommit mode; every operation is one short explicit transaction, so the
adapter also works against a server where all clients share one backend session (PGlite
with TimescaleDB). Bulk rows travel as arrays (``INSERT ... SELECT ... FROM unnest(...)``):
a handful of round trips per call, never one statement per row, and no COPY (which PGlite
does not support).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import polars as pl
import psycopg

from aggregation import migrations
from aggregation.frames import check_invoices, prepare_rated, require_aware
from aggregation.ports import (
    HOURLY_SCHEMA,
    ConsumedOffset,
    IssuedInvoiceError,
    StoredCatalog,
    StoredInvoice,
    UsageTotal,
    WriteOutcome,
)

# Any constant works; it only has to be the same for every Meterline process.
_MIGRATION_LOCK_KEY = 0x6D657465726C696E  # "meterlin"

# (1) Insert the batches not seen before; RETURNING names exactly those. (2) Add into
# usage_hourly the partial rows of those batches only, summed per hour row first (an
# upsert may touch each row once). A concurrent writer of the same batch waits on the
# ledger key, then skips it, so each batch counts once.
_WRITE_LEDGER_AND_HOURLY = """
WITH new_batches AS (
    INSERT INTO batch_ledger
        (agent_id, seq, topic, partition, "offset", received_at, sample_count, rated_at)
    SELECT b.agent_id, b.seq, b.topic, b.partition, b."offset", b.received_at,
           b.sample_count, %(rated_at)s
    FROM unnest(%(agent_id)b::text[], %(seq)b::bigint[], %(topic)b::text[],
                %(partition)b::integer[], %(offset)b::bigint[],
                %(received_at)b::timestamptz[], %(sample_count)b::bigint[])
         AS b(agent_id, seq, topic, partition, "offset", received_at, sample_count)
    ON CONFLICT (agent_id, seq) DO NOTHING
    RETURNING agent_id, seq
), upserted AS (
    INSERT INTO usage_hourly AS h
        (subscription_id, meter, hour_start, quantity, quantity_max, sample_count,
         updated_at)
    SELECT p.subscription_id, p.meter, p.hour_start, sum(p.quantity), max(p.quantity_max),
           sum(p.sample_count), %(rated_at)s
    FROM unnest(%(p_agent_id)b::text[], %(p_seq)b::bigint[], %(p_subscription_id)b::text[],
                %(p_meter)b::text[], %(p_hour_start)b::timestamptz[],
                %(p_quantity)b::text[]::numeric[], %(p_quantity_max)b::text[]::numeric[],
                %(p_sample_count)b::bigint[])
         AS p(agent_id, seq, subscription_id, meter, hour_start, quantity, quantity_max,
              sample_count)
    JOIN new_batches AS n ON n.agent_id = p.agent_id AND n.seq = p.seq
    GROUP BY p.subscription_id, p.meter, p.hour_start
    ON CONFLICT (subscription_id, meter, hour_start) DO UPDATE SET
        quantity = h.quantity + excluded.quantity,
        quantity_max = greatest(h.quantity_max, excluded.quantity_max),
        sample_count = h.sample_count + excluded.sample_count,
        updated_at = excluded.updated_at
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_batches), (SELECT count(*) FROM upserted)
"""

# (3) Offsets never move backwards.
_WRITE_OFFSETS = """
INSERT INTO consumer_offsets AS o (group_id, topic, partition, next_offset, updated_at)
SELECT group_id, topic, partition, next_offset, %(rated_at)s
FROM unnest(%(group_id)b::text[], %(topic)b::text[], %(partition)b::integer[],
            %(next_offset)b::bigint[]) AS u(group_id, topic, partition, next_offset)
ON CONFLICT (group_id, topic, partition) DO UPDATE SET
    next_offset = greatest(o.next_offset, excluded.next_offset),
    updated_at = excluded.updated_at
"""

# Drafts are replaced by key; a row that is already issued is left alone, and RETURNING
# tells which keys were written, so an issued one makes the whole call roll back.
_SAVE_INVOICES = """
INSERT INTO invoices AS i
    (key, account_id, period_start, period_end, currency, status, total_minor, document,
     updated_at)
SELECT key, account_id, period_start, period_end, currency, status, total_minor, document,
       now()
FROM unnest(%(key)b::text[], %(account_id)b::text[], %(period_start)b::timestamptz[],
            %(period_end)b::timestamptz[], %(currency)b::text[], %(status)b::text[],
            %(total_minor)b::bigint[], %(document)b::text[])
     AS u(key, account_id, period_start, period_end, currency, status, total_minor, document)
ON CONFLICT (key) DO UPDATE SET
    account_id = excluded.account_id,
    period_start = excluded.period_start,
    period_end = excluded.period_end,
    currency = excluded.currency,
    status = excluded.status,
    total_minor = excluded.total_minor,
    document = excluded.document,
    updated_at = excluded.updated_at
WHERE i.status = 'draft'
RETURNING key
"""

_INVOICE_COLUMNS = (
    "key, account_id, period_start, period_end, currency, status, total_minor, document"
)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _subscription_filter(subscription_ids: Sequence[str] | None, params: dict[str, Any]) -> str:
    if subscription_ids is None:
        return ""
    params["subscription_ids"] = list(subscription_ids)
    return " AND subscription_id = ANY(%(subscription_ids)b::text[])"


class PgStore:
    """The Store on one PostgreSQL database, given as a libpq conninfo or URL."""

    def __init__(self, conninfo: str) -> None:
        self._conn = psycopg.connect(conninfo, autocommit=True)
        self._conn.execute("SET TIME ZONE 'UTC'")
        # One connection serves one transaction at a time, whichever thread asks.
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- schema --------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        available = migrations.discover("postgresql")
        applied_now: list[int] = []
        with self._lock:
            self._conn.execute(migrations.SCHEMA_MIGRATIONS_DDL)
            for migration in available:
                with self._conn.transaction():
                    # Concurrent migrators queue here; each re-reads what is applied.
                    self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
                    rows = self._conn.execute("SELECT version FROM schema_migrations").fetchall()
                    todo = migrations.pending(available, {r[0] for r in rows})
                    if migration not in todo:
                        continue
                    self._conn.execute(migration.sql)
                    self._conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) "
                        "VALUES (%s, %s, now())",
                        (migration.version, migration.name),
                    )
                applied_now.append(migration.version)
        return applied_now

    # -- catalog -------------------------------------------------------------------------
    def save_catalog(self, document: str, digest: str, source: str, applied_at: datetime) -> int:
        require_aware(applied_at, "applied_at")
        with self._lock, self._conn.transaction():
            row = self._conn.execute(
                "INSERT INTO catalog_versions (document, digest, source, applied_at) "
                "VALUES (%s, %s, %s, %s) RETURNING version",
                (document, digest, source, applied_at),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def load_catalog(self) -> StoredCatalog | None:
        with self._lock, self._conn.transaction():
            row = self._conn.execute(
                "SELECT version, document, digest, source, applied_at FROM catalog_versions "
                "ORDER BY version DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        version, document, digest, source, applied_at = row
        return StoredCatalog(version, document, digest, source, _utc(applied_at))

    # -- rating, exactly once --------------------------------------------------------------
    def write_rated(
        self,
        ledger: pl.DataFrame,
        partials: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        rated_at: datetime,
    ) -> WriteOutcome:
        write = prepare_rated(ledger, partials, offsets, rated_at)
        new_batches = hourly_rows = 0
        with self._lock, self._conn.transaction():
            if write.ledger.height:
                params = _ledger_params(write.ledger, write.partials)
                params["rated_at"] = rated_at
                row = self._conn.execute(_WRITE_LEDGER_AND_HOURLY, params).fetchone()
                assert row is not None
                new_batches, hourly_rows = int(row[0]), int(row[1])
            if write.offsets:
                self._conn.execute(
                    _WRITE_OFFSETS,
                    {
                        "group_id": [o.group_id for o in write.offsets],
                        "topic": [o.topic for o in write.offsets],
                        "partition": [o.partition for o in write.offsets],
                        "next_offset": [o.next_offset for o in write.offsets],
                        "rated_at": rated_at,
                    },
                )
        return WriteOutcome(
            new_batches=new_batches,
            duplicate_batches=write.ledger_rows - new_batches,
            hourly_rows=hourly_rows,
        )

    def committed_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                "SELECT partition, next_offset FROM consumer_offsets "
                "WHERE group_id = %s AND topic = %s",
                (group_id, topic),
            ).fetchall()
        return {int(p): int(o) for p, o in rows}

    # -- usage queries ---------------------------------------------------------------------
    def usage_hourly(
        self, start: datetime, end: datetime, subscription_ids: Sequence[str] | None = None
    ) -> pl.DataFrame:
        require_aware(start, "start")
        require_aware(end, "end")
        params: dict[str, Any] = {"start": start, "end": end}
        query = (
            "SELECT subscription_id, meter, hour_start, quantity, quantity_max, sample_count "
            "FROM usage_hourly WHERE hour_start >= %(start)s AND hour_start < %(end)s"
            + _subscription_filter(subscription_ids, params)
            + " ORDER BY subscription_id, meter, hour_start"
        )
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(query, params).fetchall()
        return pl.DataFrame(rows, schema=HOURLY_SCHEMA, orient="row")

    def usage_totals(
        self, start: datetime, end: datetime, subscription_ids: Sequence[str] | None = None
    ) -> list[UsageTotal]:
        require_aware(start, "start")
        require_aware(end, "end")
        params: dict[str, Any] = {"start": start, "end": end}
        query = (
            "SELECT subscription_id, meter, sum(quantity), max(quantity_max), "
            "sum(sample_count) FROM usage_hourly "
            "WHERE hour_start >= %(start)s AND hour_start < %(end)s"
            + _subscription_filter(subscription_ids, params)
            + " GROUP BY subscription_id, meter ORDER BY subscription_id, meter"
        )
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(query, params).fetchall()
        return [UsageTotal(s, m, int(q), int(qmax), int(n)) for s, m, q, qmax, n in rows]

    def ledger_count(self) -> int:
        with self._lock, self._conn.transaction():
            row = self._conn.execute("SELECT count(*) FROM batch_ledger").fetchone()
        assert row is not None
        return int(row[0])

    # -- invoices --------------------------------------------------------------------------
    def save_invoices(self, invoices: Sequence[StoredInvoice]) -> None:
        check_invoices(invoices)
        if not invoices:
            return
        params = {
            "key": [i.key for i in invoices],
            "account_id": [i.account_id for i in invoices],
            "period_start": [i.period_start for i in invoices],
            "period_end": [i.period_end for i in invoices],
            "currency": [i.currency for i in invoices],
            "status": [i.status for i in invoices],
            "total_minor": [i.total_minor for i in invoices],
            "document": [i.document for i in invoices],
        }
        with self._lock, self._conn.transaction():
            written = {r[0] for r in self._conn.execute(_SAVE_INVOICES, params).fetchall()}
            refused = sorted(i.key for i in invoices if i.key not in written)
            if refused:
                # Raising inside the transaction rolls back the drafts written with them.
                raise IssuedInvoiceError(
                    f"invoices already issued cannot be replaced: {refused}; nothing was saved"
                )

    def load_invoices(self, period_start: datetime | None = None) -> list[StoredInvoice]:
        query = f"SELECT {_INVOICE_COLUMNS} FROM invoices"
        params: dict[str, Any] = {}
        if period_start is not None:
            require_aware(period_start, "period_start")
            query += " WHERE period_start = %(period_start)s"
            params["period_start"] = period_start
        query += " ORDER BY key"
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(query, params).fetchall()
        return [
            StoredInvoice(key, account, _utc(start), _utc(end), currency, status, total, doc)
            for key, account, start, end, currency, status, total, doc in rows
        ]


def _ledger_params(ledger: pl.DataFrame, partials: pl.DataFrame) -> dict[str, Any]:
    """Column lists for the unnest() arrays: one conversion per column, none per row.
    Quantities travel as decimal text (exact, and cheaper to convert than Decimal objects)."""
    return {
        "agent_id": ledger["agent_id"].to_list(),
        "seq": ledger["seq"].to_list(),
        "topic": ledger["topic"].to_list(),
        "partition": ledger["partition"].to_list(),
        "offset": ledger["offset"].to_list(),
        "received_at": ledger["received_at"].to_list(),
        "sample_count": ledger["sample_count"].to_list(),
        "p_agent_id": partials["agent_id"].to_list(),
        "p_seq": partials["seq"].to_list(),
        "p_subscription_id": partials["subscription_id"].to_list(),
        "p_meter": partials["meter"].to_list(),
        "p_hour_start": partials["hour_start"].to_list(),
        "p_quantity": partials["quantity"].cast(pl.String).to_list(),
        "p_quantity_max": partials["quantity_max"].cast(pl.String).to_list(),
        "p_sample_count": partials["sample_count"].to_list(),
    }
