"""The Store on an embedded DuckDB file: the only module importing duckdb.

One connection per store, one explicit transaction per operation. Frames go in by
registering them as views (Arrow, no copy through Python objects) and come out as Arrow.
The session TimeZone is UTC; instants are read as epoch microseconds or Arrow timestamps,
never through DuckDB's Python datetime conversion (which would need pytz).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import polars as pl

from aggregation import migrations
from aggregation.frames import check_invoices, prepare_rated, require_aware
from aggregation.ports import (
    HOURLY_SCHEMA,
    INSTANT,
    ConsumedOffset,
    IssuedInvoiceError,
    StoredCatalog,
    StoredInvoice,
    UsageTotal,
    WriteOutcome,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_INSERT_LEDGER = """
INSERT INTO batch_ledger
    (agent_id, seq, topic, partition, "offset", received_at, sample_count, rated_at)
SELECT agent_id, seq, topic, partition, "offset", received_at, sample_count, $rated_at
FROM meterline_ledger_in
ON CONFLICT (agent_id, seq) DO NOTHING
RETURNING agent_id, seq
"""

# Only the partial rows of batches that were new, summed per hour row first (an upsert may
# touch each row once). DuckDB raises on DECIMAL(38) overflow, so sums stay exact.
_UPSERT_HOURLY = """
INSERT INTO usage_hourly
    (subscription_id, meter, hour_start, quantity, quantity_max, sample_count, updated_at)
SELECT p.subscription_id, p.meter, p.hour_start, sum(p.quantity), max(p.quantity_max),
       sum(p.sample_count), $rated_at
FROM meterline_partials_in AS p
SEMI JOIN (
    SELECT unnest($new_agent_ids::VARCHAR[]) AS agent_id, unnest($new_seqs::BIGINT[]) AS seq
) AS n ON n.agent_id = p.agent_id AND n.seq = p.seq
GROUP BY p.subscription_id, p.meter, p.hour_start
ON CONFLICT (subscription_id, meter, hour_start) DO UPDATE SET
    quantity = usage_hourly.quantity + excluded.quantity,
    quantity_max = greatest(usage_hourly.quantity_max, excluded.quantity_max),
    sample_count = usage_hourly.sample_count + excluded.sample_count,
    updated_at = excluded.updated_at
RETURNING 1
"""

_UPSERT_OFFSETS = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_at)
SELECT group_id, topic, partition, next_offset, $rated_at
FROM meterline_offsets_in
ON CONFLICT (group_id, topic, partition) DO UPDATE SET
    next_offset = greatest(consumer_offsets.next_offset, excluded.next_offset),
    updated_at = excluded.updated_at
"""

_SAVE_INVOICES = """
INSERT INTO invoices
    (key, account_id, period_start, period_end, currency, status, total_minor, document,
     updated_at)
SELECT key, account_id, period_start, period_end, currency, status, total_minor, document,
       now()
FROM meterline_invoices_in
ON CONFLICT (key) DO UPDATE SET
    account_id = excluded.account_id,
    period_start = excluded.period_start,
    period_end = excluded.period_end,
    currency = excluded.currency,
    status = excluded.status,
    total_minor = excluded.total_minor,
    document = excluded.document,
    updated_at = excluded.updated_at
WHERE invoices.status = 'draft'
RETURNING key
"""

_INVOICE_COLUMNS = (
    "key, account_id, epoch_us(period_start), epoch_us(period_end), currency, status, "
    "total_minor, document"
)

_OFFSETS_SCHEMA: dict[str, pl.DataType] = {
    "group_id": pl.String(),
    "topic": pl.String(),
    "partition": pl.Int32(),
    "next_offset": pl.Int64(),
}

_INVOICES_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.String(),
    "account_id": pl.String(),
    "period_start": INSTANT,
    "period_end": INSTANT,
    "currency": pl.String(),
    "status": pl.String(),
    "total_minor": pl.Int64(),
    "document": pl.String(),
}


def _from_epoch_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _subscription_filter(subscription_ids: Sequence[str] | None, params: dict[str, Any]) -> str:
    if subscription_ids is None:
        return ""
    params["subscription_ids"] = list(subscription_ids)
    return " AND list_contains($subscription_ids::VARCHAR[], subscription_id)"


class DuckDbStore:
    """The Store in one DuckDB database: a file path, or ``":memory:"``."""

    def __init__(self, path: str) -> None:
        self._conn = duckdb.connect(path)
        self._conn.execute("SET TimeZone = 'UTC'")
        # A DuckDB connection is not safe for concurrent use; one operation at a time.
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(
        self, frames: Mapping[str, pl.DataFrame] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction, with ``frames`` readable as views by name while it lasts. The
        views are registered before BEGIN and dropped after COMMIT or ROLLBACK, so that an
        aborted transaction cannot leave them behind or hide the error that aborted it."""
        frames = frames or {}
        with self._lock:
            for name, frame in frames.items():
                self._conn.register(name, frame)
            try:
                self._conn.execute("BEGIN TRANSACTION")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                for name in frames:
                    self._conn.unregister(name)

    def _frame(self, query: str, params: dict[str, Any]) -> pl.DataFrame:
        result = pl.from_arrow(self._conn.sql(query, params=params).to_arrow_table())
        assert isinstance(result, pl.DataFrame)
        return result

    # -- schema --------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        available = migrations.discover("duckdb")
        applied_now: list[int] = []
        with self._transaction() as conn:
            conn.execute(migrations.SCHEMA_MIGRATIONS_DDL)
        for migration in available:
            with self._transaction() as conn:
                rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
                if migration not in migrations.pending(available, {r[0] for r in rows}):
                    continue
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) "
                    "VALUES ($version, $name, now())",
                    {"version": migration.version, "name": migration.name},
                )
            applied_now.append(migration.version)
        return applied_now

    # -- catalog -------------------------------------------------------------------------
    def save_catalog(self, document: str, digest: str, source: str, applied_at: datetime) -> int:
        require_aware(applied_at, "applied_at")
        with self._transaction() as conn:
            row = conn.execute(
                "INSERT INTO catalog_versions (document, digest, source, applied_at) "
                "VALUES ($document, $digest, $source, $applied_at) RETURNING version",
                {
                    "document": document,
                    "digest": digest,
                    "source": source,
                    "applied_at": applied_at,
                },
            ).fetchone()
        assert row is not None
        return int(row[0])

    def load_catalog(self) -> StoredCatalog | None:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT version, document, digest, source, epoch_us(applied_at) "
                "FROM catalog_versions ORDER BY version DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        version, document, digest, source, applied_at_us = row
        return StoredCatalog(int(version), document, digest, source, _from_epoch_us(applied_at_us))

    # -- rating, exactly once --------------------------------------------------------------
    def write_rated(
        self,
        ledger: pl.DataFrame,
        partials: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        rated_at: datetime,
    ) -> WriteOutcome:
        write = prepare_rated(ledger, partials, offsets, rated_at)
        offsets_frame = pl.DataFrame(
            [(o.group_id, o.topic, o.partition, o.next_offset) for o in write.offsets],
            schema=_OFFSETS_SCHEMA,
            orient="row",
        )
        frames = {
            "meterline_ledger_in": write.ledger,
            "meterline_partials_in": write.partials,
            "meterline_offsets_in": offsets_frame,
        }
        new_keys: list[Any] = []
        hourly_rows = 0
        with self._transaction(frames) as conn:
            if write.ledger.height:
                new_keys = conn.execute(_INSERT_LEDGER, {"rated_at": rated_at}).fetchall()
            if new_keys and write.partials.height:
                params = {
                    "rated_at": rated_at,
                    "new_agent_ids": [k[0] for k in new_keys],
                    "new_seqs": [k[1] for k in new_keys],
                }
                hourly_rows = len(conn.execute(_UPSERT_HOURLY, params).fetchall())
            if write.offsets:
                conn.execute(_UPSERT_OFFSETS, {"rated_at": rated_at})
        return WriteOutcome(
            new_batches=len(new_keys),
            duplicate_batches=write.ledger_rows - len(new_keys),
            hourly_rows=hourly_rows,
        )

    def committed_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT partition, next_offset FROM consumer_offsets "
                "WHERE group_id = $group_id AND topic = $topic",
                {"group_id": group_id, "topic": topic},
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
            "FROM usage_hourly WHERE hour_start >= $start AND hour_start < $end"
            + _subscription_filter(subscription_ids, params)
            + " ORDER BY subscription_id, meter, hour_start"
        )
        with self._transaction():
            frame = self._frame(query, params)
        return frame.cast(pl.Schema(HOURLY_SCHEMA))

    def usage_totals(
        self, start: datetime, end: datetime, subscription_ids: Sequence[str] | None = None
    ) -> list[UsageTotal]:
        require_aware(start, "start")
        require_aware(end, "end")
        params: dict[str, Any] = {"start": start, "end": end}
        # Sums are read as text: exact, whatever width DuckDB picked for them.
        query = (
            "SELECT subscription_id, meter, sum(quantity)::VARCHAR, "
            "max(quantity_max)::VARCHAR, sum(sample_count)::VARCHAR FROM usage_hourly "
            "WHERE hour_start >= $start AND hour_start < $end"
            + _subscription_filter(subscription_ids, params)
            + " GROUP BY subscription_id, meter ORDER BY subscription_id, meter"
        )
        with self._transaction() as conn:
            rows = conn.execute(query, params).fetchall()
        return [UsageTotal(s, m, int(q), int(qmax), int(n)) for s, m, q, qmax, n in rows]

    def ledger_count(self) -> int:
        with self._transaction() as conn:
            row = conn.execute("SELECT count(*) FROM batch_ledger").fetchone()
        assert row is not None
        return int(row[0])

    # -- invoices --------------------------------------------------------------------------
    def save_invoices(self, invoices: Sequence[StoredInvoice]) -> None:
        check_invoices(invoices)
        if not invoices:
            return
        frame = pl.DataFrame(
            [
                (
                    i.key,
                    i.account_id,
                    i.period_start.astimezone(UTC),
                    i.period_end.astimezone(UTC),
                    i.currency,
                    i.status,
                    i.total_minor,
                    i.document,
                )
                for i in invoices
            ],
            schema=_INVOICES_SCHEMA,
            orient="row",
        )
        with self._transaction({"meterline_invoices_in": frame}) as conn:
            written = {r[0] for r in conn.execute(_SAVE_INVOICES).fetchall()}
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
            query += " WHERE period_start = $period_start"
            params["period_start"] = period_start
        query += " ORDER BY key"
        with self._transaction() as conn:
            rows = conn.execute(query, params).fetchall()
        return [
            StoredInvoice(
                key,
                account,
                _from_epoch_us(start_us),
                _from_epoch_us(end_us),
                currency,
                status,
                int(total),
                doc,
            )
            for key, account, start_us, end_us, currency, status, total, doc in rows
        ]
