"""The Store on an embedded DuckDB file: the only module importing duckdb.

One connection per store, one explicit transaction per operation. Frames go in by
registering them as views (Arrow, no copy through Python objects) and come out as Arrow.
The session TimeZone is UTC; instants are read as epoch microseconds or Arrow timestamps,
never through DuckDB's Python datetime conversion (which would need pytz).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import polars as pl

from aggregation import migrations
from aggregation.agent_tokens import check_agent_token, scope_from_json
from aggregation.frames import (
    BATCH_KEY,
    HOURLY_KEY,
    NEW_BATCH_SCHEMA,
    check_invoices,
    prepare_rated,
    require_aware,
)
from aggregation.lifecycle_events import check_events, latest_offsets, require_spans_of
from aggregation.ports import (
    CHANGED_SCHEMA,
    EVENTS_SCHEMA,
    HOURLY_SCHEMA,
    INSTANT,
    SOURCE_BATCH_SCHEMA,
    SPANS_SCHEMA,
    AgentToken,
    BillingEvent,
    ConsumedOffset,
    InvoiceNumber,
    IssuedInvoiceError,
    IssueRenderer,
    LifecycleOutcome,
    SpanDeriver,
    StoredCatalog,
    StoredInvoice,
    UsageTotal,
    WriteOutcome,
)
from aggregation.replace import conflict as replace_conflict
from aggregation.replace import prepare_replacement
from aggregation.spans import check_spans

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_INSERT_LEDGER = """
INSERT INTO batch_ledger
    (agent_id, seq, topic, partition, "offset", received_at, sample_count, rated_at)
SELECT agent_id, seq, topic, partition, "offset", received_at, sample_count, $rated_at
FROM meterline_ledger_in
ON CONFLICT (agent_id, seq) DO NOTHING
RETURNING agent_id, seq, batch_id
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

# Which batches (batch_ledger.batch_id) this call added to each hour row (schema 6), for
# `meterline explain` and re-rating: one row per hour row, from a frame grouped by Polars.
_INSERT_SOURCES = """
INSERT INTO usage_sources (subscription_id, meter, hour_start, batch_ids)
SELECT subscription_id, meter, hour_start, batch_ids FROM meterline_sources_in
"""

_UPSERT_OFFSETS = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_at)
SELECT group_id, topic, partition, next_offset, $rated_at
FROM meterline_offsets_in
ON CONFLICT (group_id, topic, partition) DO UPDATE SET
    next_offset = greatest(consumer_offsets.next_offset, excluded.next_offset),
    updated_at = excluded.updated_at
"""

# Saving drafts: refuse when any key is already issued, else replace by key, as a delete of
# the keys present plus a plain insert. On DuckDB that is faster than ON CONFLICT DO UPDATE
# for the usual first close of a period (100,000 new 8 KiB invoices: 6.95 s -> 4.99 s;
# replacing them all: 3.62 s -> 4.05 s).
_ISSUED_AMONG = """
SELECT i.key FROM invoices AS i JOIN meterline_invoices_in AS n USING (key)
WHERE i.status <> 'draft' ORDER BY i.key
"""
_DELETE_DRAFTS_AMONG = "DELETE FROM invoices WHERE key IN (SELECT key FROM meterline_invoices_in)"
_INSERT_INVOICES = """
INSERT INTO invoices
    (key, account_id, period_start, period_end, currency, status, total_minor, document,
     updated_at)
SELECT key, account_id, period_start, period_end, currency, status, total_minor, document,
       now()
FROM meterline_invoices_in
"""

# Re-rating (replace_hourly): batches counted into the hours (usage_sources, and batch_usage
# rows of versions before 6) but missing from the re-rating, and batches of the re-rating
# not counted (yet); up to three, with the count.
_REPLACE_MISSING = """
SELECT agent_id, seq, count(*) OVER () FROM (
    SELECT l.agent_id, l.seq
    FROM (
        SELECT unnest(batch_ids) AS batch_id FROM usage_sources
        WHERE hour_start >= $start AND hour_start < $end
    ) AS s
    JOIN batch_ledger AS l ON l.batch_id = s.batch_id
    UNION
    SELECT agent_id, seq FROM batch_usage WHERE hour_start >= $start AND hour_start < $end
    EXCEPT
    SELECT agent_id, seq FROM meterline_replace_batches
) ORDER BY agent_id, seq LIMIT 3
"""
_REPLACE_UNCOUNTED = """
SELECT b.agent_id, b.seq, count(*) OVER () FROM meterline_replace_batches AS b
ANTI JOIN batch_ledger AS l ON l.agent_id = b.agent_id AND l.seq = b.seq
ORDER BY b.agent_id, b.seq LIMIT 3
"""
_REPLACE_DELETE_HOURLY = """
DELETE FROM usage_hourly AS h
WHERE h.hour_start >= $start AND h.hour_start < $end
  AND NOT EXISTS (SELECT 1 FROM meterline_replace_partials AS p
                  WHERE p.subscription_id = h.subscription_id AND p.meter = h.meter
                    AND p.hour_start = h.hour_start)
RETURNING 1
"""
_REPLACE_UPSERT_HOURLY = """
INSERT INTO usage_hourly
    (subscription_id, meter, hour_start, quantity, quantity_max, sample_count, updated_at)
SELECT subscription_id, meter, hour_start, sum(quantity), max(quantity_max),
       sum(sample_count), $updated_at
FROM meterline_replace_partials
GROUP BY subscription_id, meter, hour_start
ON CONFLICT (subscription_id, meter, hour_start) DO UPDATE SET
    quantity = excluded.quantity,
    quantity_max = excluded.quantity_max,
    sample_count = excluded.sample_count,
    updated_at = excluded.updated_at
WHERE usage_hourly.quantity <> excluded.quantity
   OR usage_hourly.quantity_max <> excluded.quantity_max
   OR usage_hourly.sample_count <> excluded.sample_count
RETURNING 1
"""

# The sources of the re-rated hours: one row per hour row, the batch ids from the ledger.
_REPLACE_SOURCES = """
INSERT INTO usage_sources (subscription_id, meter, hour_start, batch_ids)
SELECT p.subscription_id, p.meter, p.hour_start, list(l.batch_id ORDER BY l.batch_id)
FROM meterline_replace_partials AS p
JOIN batch_ledger AS l ON l.agent_id = p.agent_id AND l.seq = p.seq
GROUP BY p.subscription_id, p.meter, p.hour_start
"""

# The batches behind some hours of one (subscription, meter), with how many of the hours
# each added to: usage_sources (schema 6) and the batch_usage rows of older versions. A batch
# is listed once per hour it added to (write_rated records new batches only, and a
# re-rating replaces both tables' rows of its hours), so count(*) counts hours.
_USAGE_BATCHES = """
SELECT agent_id, seq, topic, partition, "offset", received_at,
       count(*) AS hours
FROM (
    SELECT l.agent_id, l.seq, l.topic, l.partition, l."offset", l.received_at, s.hour_start
    FROM (
        SELECT hour_start, unnest(batch_ids) AS batch_id FROM usage_sources
        WHERE subscription_id = $sub AND meter = $meter
          AND hour_start >= $start AND hour_start < $end
    ) AS s
    JOIN batch_ledger AS l ON l.batch_id = s.batch_id
    UNION ALL
    SELECT l.agent_id, l.seq, l.topic, l.partition, l."offset", l.received_at, u.hour_start
    FROM batch_usage AS u JOIN batch_ledger AS l ON l.agent_id = u.agent_id AND l.seq = u.seq
    WHERE u.subscription_id = $sub AND u.meter = $meter
      AND u.hour_start >= $start AND u.hour_start < $end
)
GROUP BY agent_id, seq, topic, partition, "offset", received_at
ORDER BY topic, partition, "offset", agent_id, seq
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


# Upsert by key; closing a span is writing it again with its end.
_UPSERT_SPANS = """
INSERT INTO resource_spans (resource_id, subscription_id, plan_id, span_start, span_end)
SELECT resource_id, subscription_id, plan_id, span_start, span_end FROM meterline_spans_in
ON CONFLICT (resource_id, span_start) DO UPDATE SET
    subscription_id = excluded.subscription_id,
    plan_id = excluded.plan_id,
    span_end = excluded.span_end
"""

# Lifecycle events (schema 5): the first stored of each (resource_id, event_id) wins.
_INSERT_EVENTS = """
INSERT INTO resource_events
    (resource_id, event_id, kind, plan_id, subscription_id, occurred_at, agent_id,
     received_at, stored_at)
SELECT resource_id, event_id, kind, plan_id, subscription_id, occurred_at, agent_id,
       received_at, $stored_at
FROM meterline_events_in
ON CONFLICT (resource_id, event_id) DO NOTHING
RETURNING resource_id
"""

_SELECT_EVENTS = (
    "SELECT resource_id, event_id, kind, plan_id, subscription_id, occurred_at, agent_id, "
    "received_at FROM resource_events"
)

# The spans of the re-derived resources that their events no longer give.
_DELETE_STALE_SPANS = """
DELETE FROM resource_spans
WHERE list_contains($resource_ids::VARCHAR[], resource_id)
  AND NOT EXISTS (
    SELECT 1 FROM meterline_spans_in AS d
    WHERE d.resource_id = resource_spans.resource_id
      AND d.span_start = resource_spans.span_start)
"""


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
        with self._lock, ExitStack() as views:
            for name, frame in (frames or {}).items():
                views.enter_context(_registered(self._conn, name, frame))
            self._conn.execute("BEGIN TRANSACTION")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

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
                # Schema 6: which batches this call added to each hour row.
                sources = _sources_of(write.partials, new_keys)
                with _registered(conn, "meterline_sources_in", sources):
                    conn.execute(_INSERT_SOURCES)
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

    def usage_changed_since(self, instant: datetime) -> pl.DataFrame:
        require_aware(instant, "instant")
        with self._transaction():
            frame = self._frame(
                "SELECT subscription_id, meter, hour_start, updated_at FROM usage_hourly "
                "WHERE updated_at > $instant ORDER BY subscription_id, meter, hour_start",
                {"instant": instant},
            )
        return frame.cast(pl.Schema(CHANGED_SCHEMA))

    def replace_hourly(
        self,
        start: datetime,
        end: datetime,
        partials: pl.DataFrame,
        batches: pl.DataFrame,
        updated_at: datetime,
    ) -> int:
        replacement = prepare_replacement(start, end, partials, batches, updated_at)
        frames = {
            "meterline_replace_partials": replacement.partials,
            "meterline_replace_batches": replacement.batches,
        }
        params = {"start": start, "end": end}
        # The adapter's lock and DuckDB's file lock keep every other writer out meanwhile.
        with self._transaction(frames) as conn:
            missing = conn.execute(_REPLACE_MISSING, params).fetchall()
            uncounted = conn.execute(_REPLACE_UNCOUNTED).fetchall()
            replace_conflict(missing, uncounted)
            deleted = len(conn.execute(_REPLACE_DELETE_HOURLY, params).fetchall())
            upserted = len(
                conn.execute(_REPLACE_UPSERT_HOURLY, {"updated_at": updated_at}).fetchall()
            )
            for table in ("usage_sources", "batch_usage"):  # batch_usage: before schema 6
                conn.execute(
                    f"DELETE FROM {table} WHERE hour_start >= $start AND hour_start < $end",
                    params,
                )
            conn.execute(_REPLACE_SOURCES)
        return deleted + upserted

    def ledger_count(self) -> int:
        with self._transaction() as conn:
            row = conn.execute("SELECT count(*) FROM batch_ledger").fetchone()
        assert row is not None
        return int(row[0])

    # -- resource spans ----------------------------------------------------------------------
    def write_resource_spans(self, spans: pl.DataFrame) -> int:
        spans = check_spans(spans)
        if spans.is_empty():
            return 0
        with self._transaction({"meterline_spans_in": spans}) as conn:
            conn.execute(_UPSERT_SPANS)
        return spans.height

    def resource_spans(
        self, start: datetime, end: datetime, resource_ids: Sequence[str] | None = None
    ) -> pl.DataFrame:
        require_aware(start, "start")
        require_aware(end, "end")
        params: dict[str, Any] = {"start": start, "end": end}
        query = (
            "SELECT resource_id, subscription_id, plan_id, span_start, span_end "
            "FROM resource_spans WHERE span_start < $end "
            "AND (span_end IS NULL OR span_end > $start)"
        )
        if resource_ids is not None:
            params["resource_ids"] = list(resource_ids)
            query += " AND list_contains($resource_ids::VARCHAR[], resource_id)"
        query += " ORDER BY resource_id, span_start"
        with self._transaction():
            frame = self._frame(query, params)
        return frame.cast(pl.Schema(SPANS_SCHEMA))

    # -- lifecycle events (schema 5) --------------------------------------------------------
    def write_lifecycle_events(
        self,
        events: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        derive: SpanDeriver,
        stored_at: datetime,
    ) -> LifecycleOutcome:
        handed_in = events.height
        events = check_events(events, stored_at)
        consumed = latest_offsets(offsets)
        offsets_frame = pl.DataFrame(
            [(o.group_id, o.topic, o.partition, o.next_offset) for o in consumed],
            schema=_OFFSETS_SCHEMA,
            orient="row",
        )
        frames = {"meterline_events_in": events, "meterline_offsets_in": offsets_frame}
        touched: list[str] = []
        new_events = 0
        spans = pl.DataFrame(schema=SPANS_SCHEMA)
        with self._transaction(frames) as conn:
            if events.height:
                rows = conn.execute(_INSERT_EVENTS, {"stored_at": stored_at}).fetchall()
                new_events = len(rows)
                touched = sorted({r[0] for r in rows})
            if touched:
                stored = self._frame(
                    _SELECT_EVENTS + " WHERE list_contains($ids::VARCHAR[], resource_id)"
                    " ORDER BY resource_id, occurred_at, event_id",
                    {"ids": touched},
                ).cast(pl.Schema(EVENTS_SCHEMA))
                spans = check_spans(derive(stored))
                require_spans_of(spans, touched)
                with _registered(conn, "meterline_spans_in", spans):
                    conn.execute(_DELETE_STALE_SPANS, {"resource_ids": touched})
                    if spans.height:
                        conn.execute(_UPSERT_SPANS)
            if consumed:
                conn.execute(_UPSERT_OFFSETS, {"rated_at": stored_at})
        return LifecycleOutcome(new_events, handed_in - new_events, len(touched), spans.height)

    def lifecycle_events(self, resource_ids: Sequence[str] | None = None) -> pl.DataFrame:
        params: dict[str, Any] = {}
        query = _SELECT_EVENTS
        if resource_ids is not None:
            params["ids"] = list(resource_ids)
            query += " WHERE list_contains($ids::VARCHAR[], resource_id)"
        query += " ORDER BY resource_id, occurred_at, event_id"
        with self._transaction():
            frame = self._frame(query, params)
        return frame.cast(pl.Schema(EVENTS_SCHEMA))

    # -- agent tokens ----------------------------------------------------------------------
    def save_agent_token(
        self, token_hash: str, agent_id: str, scope: Sequence[str], issued_at: datetime
    ) -> None:
        scope_json = check_agent_token(token_hash, agent_id, scope, issued_at)
        with self._transaction() as conn:
            rows = conn.execute(
                "INSERT INTO agent_tokens (token_hash, agent_id, scope, issued_at) "
                "VALUES ($token_hash, $agent_id, $scope, $issued_at) "
                "ON CONFLICT (token_hash) DO NOTHING RETURNING 1",
                {
                    "token_hash": token_hash,
                    "agent_id": agent_id,
                    "scope": scope_json,
                    "issued_at": issued_at,
                },
            ).fetchall()
        if not rows:
            raise ValueError(f"token hash {token_hash[:12]}... is already stored")

    def revoke_agent_tokens(self, agent_id: str, revoked_at: datetime) -> int:
        require_aware(revoked_at, "revoked_at")
        with self._transaction() as conn:
            rows = conn.execute(
                "UPDATE agent_tokens SET revoked_at = greatest($revoked_at, issued_at) "
                "WHERE agent_id = $agent_id AND revoked_at IS NULL RETURNING 1",
                {"revoked_at": revoked_at, "agent_id": agent_id},
            ).fetchall()
        return len(rows)

    def active_agent_tokens(self) -> list[AgentToken]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT token_hash, agent_id, scope, epoch_us(issued_at) FROM agent_tokens "
                "WHERE revoked_at IS NULL ORDER BY agent_id, token_hash"
            ).fetchall()
        return [
            AgentToken(token_hash, agent_id, scope_from_json(scope), _from_epoch_us(us), None)
            for token_hash, agent_id, scope, us in rows
        ]

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
            refused = [r[0] for r in conn.execute(_ISSUED_AMONG).fetchall()]
            if refused:
                raise IssuedInvoiceError(
                    f"invoices already issued cannot be replaced: {refused}; nothing was saved"
                )
            conn.execute(_DELETE_DRAFTS_AMONG)
            conn.execute(_INSERT_INVOICES)

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

    # -- invoice lifecycle ---------------------------------------------------------------
    def load_invoice(self, key: str) -> StoredInvoice | None:
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE key = $key", {"key": key}
            ).fetchone()
        return None if row is None else _stored_invoice(row)

    def load_invoices_ending_after(
        self, instant: datetime, status: str | None = None
    ) -> list[StoredInvoice]:
        require_aware(instant, "instant")
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE period_end > $instant "
                "AND ($status::VARCHAR IS NULL OR status = $status::VARCHAR) ORDER BY key",
                {"instant": instant, "status": status},
            ).fetchall()
        return [_stored_invoice(r) for r in rows]

    def issue_invoice(
        self, key: str, series: str, issued_at: datetime, render: IssueRenderer
    ) -> StoredInvoice:
        require_aware(issued_at, "issued_at")
        if not series:
            raise ValueError("series must not be empty")
        # One connection, one transaction at a time (and DuckDB locks its file against
        # other processes), so nothing can interleave between reading and writing.
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE key = $key", {"key": key}
            ).fetchone()
            if row is None:
                raise KeyError(f"no invoice {key!r}")
            draft = _stored_invoice(row)
            if draft.status != "draft":
                raise IssuedInvoiceError(f"invoice {key!r} is already issued")
            seq_row = conn.execute(
                "INSERT INTO invoice_sequences (series, last_number) VALUES ($series, 1) "
                "ON CONFLICT (series) DO UPDATE SET "
                "last_number = invoice_sequences.last_number + 1 RETURNING last_number",
                {"series": series},
            ).fetchone()
            assert seq_row is not None
            seq = int(seq_row[0])
            rendering = render(draft, seq)
            conn.execute(
                "INSERT INTO invoice_numbers (invoice_key, series, seq, number, issued_at) "
                "VALUES ($key, $series, $seq, $number, $issued_at)",
                {
                    "key": key,
                    "series": series,
                    "seq": seq,
                    "number": rendering.number,
                    "issued_at": issued_at,
                },
            )
            conn.execute(
                "UPDATE invoices SET status = 'issued', document = $document, "
                "updated_at = now() WHERE key = $key",
                {"document": rendering.document, "key": key},
            )
            for event in rendering.events:
                require_aware(event.created_at, f"event {event.event_id}: created_at")
                conn.execute(
                    "INSERT INTO billing_outbox (event_id, topic, kafka_key, value, created_at) "
                    "VALUES ($event_id, $topic, $key, $value, $created_at)",
                    {
                        "event_id": event.event_id,
                        "topic": event.topic,
                        "key": event.key,
                        "value": event.value,
                        "created_at": event.created_at,
                    },
                )
        return StoredInvoice(
            draft.key,
            draft.account_id,
            draft.period_start,
            draft.period_end,
            draft.currency,
            "issued",
            draft.total_minor,
            rendering.document,
        )

    def delete_drafts(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with self._transaction() as conn:
            rows = conn.execute(
                "DELETE FROM invoices WHERE list_contains($keys::VARCHAR[], key) "
                "AND status = 'draft' RETURNING 1",
                {"keys": list(keys)},
            ).fetchall()
        return len(rows)

    def invoice_numbers(self, series: str | None = None) -> list[InvoiceNumber]:
        query = "SELECT invoice_key, series, seq, number, epoch_us(issued_at) FROM invoice_numbers"
        params: dict[str, Any] = {}
        if series is not None:
            query += " WHERE series = $series"
            params["series"] = series
        with self._transaction() as conn:
            rows = conn.execute(query + " ORDER BY series, seq", params).fetchall()
        return [InvoiceNumber(k, s, int(q), n, _from_epoch_us(us)) for k, s, q, n, us in rows]

    def usage_batches(
        self, subscription_id: str, meter: str, start: datetime, end: datetime
    ) -> pl.DataFrame:
        require_aware(start, "start")
        require_aware(end, "end")
        params = {"sub": subscription_id, "meter": meter, "start": start, "end": end}
        with self._transaction():
            frame = self._frame(_USAGE_BATCHES, params)
        return frame.cast(pl.Schema(SOURCE_BATCH_SCHEMA))

    def pending_billing_events(self, limit: int = 1000) -> list[BillingEvent]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT event_id, topic, kafka_key, value, epoch_us(created_at) "
                "FROM billing_outbox WHERE published_at IS NULL "
                "ORDER BY created_at, event_id LIMIT $limit",
                {"limit": limit},
            ).fetchall()
        return [BillingEvent(e, t, k, v, _from_epoch_us(us)) for e, t, k, v, us in rows]

    def mark_billing_events_published(
        self, event_ids: Sequence[str], published_at: datetime
    ) -> int:
        require_aware(published_at, "published_at")
        with self._transaction() as conn:
            rows = conn.execute(
                "UPDATE billing_outbox SET published_at = $published_at "
                "WHERE list_contains($ids::VARCHAR[], event_id) AND published_at IS NULL "
                "RETURNING 1",
                {"published_at": published_at, "ids": list(event_ids)},
            ).fetchall()
        return len(rows)


@contextmanager
def _registered(conn: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> Iterator[None]:
    """``frame`` readable as the view ``name`` while the block runs."""
    conn.register(name, frame)
    try:
        yield
    finally:
        conn.unregister(name)


def _sources_of(partials: pl.DataFrame, new_keys: Sequence[Sequence[Any]]) -> pl.DataFrame:
    """One row per hour row the new batches (``new_keys``: rows of agent_id, seq, batch_id)
    added to, with their batch ids as a list (usage_sources)."""
    keys = pl.DataFrame(new_keys, schema=NEW_BATCH_SCHEMA, orient="row")
    return (
        partials.join(keys, on=list(BATCH_KEY), how="inner")
        .group_by(HOURLY_KEY)
        .agg(pl.col("batch_id").alias("batch_ids"))
    )


def _stored_invoice(row: Sequence[Any]) -> StoredInvoice:
    key, account, start_us, end_us, currency, status, total, doc = row
    return StoredInvoice(
        key,
        account,
        _from_epoch_us(start_us),
        _from_epoch_us(end_us),
        currency,
        status,
        int(total),
        doc,
    )
