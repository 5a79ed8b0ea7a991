"""The Store on PostgreSQL (and TimescaleDB) with psycopg 3: the only module importing psycopg.

One connection in autocommit mode; every operation is one short explicit transaction, so the
adapter also works against a server where all clients share one backend session (PGlite
with TimescaleDB). Bulk rows travel as arrays (``INSERT ... SELECT ... FROM unnest(...)``):
a handful of round trips per call, never one statement per row, and no COPY (which PGlite
does not support). write_rated's arrays are built whole-column from Polars buffers
(``aggregation.pg_arrays``), not element by element.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
from psycopg.abc import DumperKey
from psycopg.adapt import Dumper, PyFormat
from psycopg.pq import Format

from aggregation import migrations
from aggregation.agent_tokens import check_agent_token, scope_from_json
from aggregation.frames import (
    BATCH_KEY,
    NEW_BATCH_SCHEMA,
    RatedWrite,
    check_invoices,
    prepare_rated,
    require_aware,
    sum_per_hour_with_sources,
)
from aggregation.lifecycle_events import check_events, latest_offsets, require_spans_of
from aggregation.pg_arrays import PgArray, int4_array, int8_array, text_array, timestamptz_array
from aggregation.ports import (
    CHANGED_SCHEMA,
    EVENTS_SCHEMA,
    HOURLY_SCHEMA,
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

# Any constant works; it only has to be the same for every Meterline process.
_MIGRATION_LOCK_KEY = 0x6D657465726C696E  # "meterlin"

# (1) Insert the batches not seen before; RETURNING names exactly those, with the surrogate
# batch_id each got (schema 6). A concurrent writer of the same batch waits on the ledger
# key, then skips it, so each batch counts once.
_INSERT_LEDGER = """
INSERT INTO batch_ledger
    (agent_id, seq, topic, partition, "offset", received_at, sample_count, rated_at)
SELECT b.agent_id, b.seq, b.topic, b.partition, b."offset", b.received_at, b.sample_count,
       %(rated_at)s
FROM unnest(%(agent_id)b::text[], %(seq)b::bigint[], %(topic)b::text[],
            %(partition)b::integer[], %(offset)b::bigint[],
            %(received_at)b::timestamptz[], %(sample_count)b::bigint[])
     AS b(agent_id, seq, topic, partition, "offset", received_at, sample_count)
ON CONFLICT (agent_id, seq) DO NOTHING
RETURNING agent_id, seq, batch_id
"""

# (2) Add into usage_hourly the partial rows of the new batches only (the client keeps
# those after (1) and sums them per hour row across the call first: an upsert may touch
# each row once; the GROUP BY here is the server's exact numeric sum, which raises on
# overflow), and record which batches this call added to each hour row (usage_sources,
# schema 6, for `meterline explain` and re-rating): one row per hour row, its batch ids a
# slice [lo:hi] of one flat bigint[] the client ordered by hour row. No GROUP BY for it
# (an array_agg over the partial rows cost more than the upsert), and slicing a null-free
# fixed-width array is O(1) per row. Rows with lo > hi are the extra rows of an hour row
# the client left unsummed (see aggregation.frames.HourlySources).
_ADD_HOURLY_AND_SOURCES = """
WITH upserted AS (
    INSERT INTO usage_hourly AS h
        (subscription_id, meter, hour_start, quantity, quantity_max, sample_count,
         updated_at)
    SELECT p.subscription_id, p.meter, p.hour_start, sum(p.quantity), max(p.quantity_max),
           sum(p.sample_count), %(rated_at)s
    FROM unnest(%(h_subscription_id)b::text[], %(h_meter)b::text[],
                %(h_hour_start)b::timestamptz[], %(h_quantity)b::text[]::numeric[],
                %(h_quantity_max)b::text[]::numeric[], %(h_sample_count)b::bigint[])
         AS p(subscription_id, meter, hour_start, quantity, quantity_max, sample_count)
    GROUP BY p.subscription_id, p.meter, p.hour_start
    ON CONFLICT (subscription_id, meter, hour_start) DO UPDATE SET
        quantity = h.quantity + excluded.quantity,
        quantity_max = greatest(h.quantity_max, excluded.quantity_max),
        sample_count = h.sample_count + excluded.sample_count,
        updated_at = excluded.updated_at
    RETURNING 1
), sources AS (
    INSERT INTO usage_sources (subscription_id, meter, hour_start, batch_ids)
    SELECT s.subscription_id, s.meter, s.hour_start, (%(u_batch_id)b::bigint[])[s.lo:s.hi]
    FROM unnest(%(h_subscription_id)b::text[], %(h_meter)b::text[],
                %(h_hour_start)b::timestamptz[], %(h_lo)b::integer[], %(h_hi)b::integer[])
         AS s(subscription_id, meter, hour_start, lo, hi)
    WHERE s.lo <= s.hi
)
SELECT count(*) FROM upserted
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

# Re-rating (replace_hourly), under the ledger lock. Batches counted into the hours but
# missing from the re-rating (usage_sources, and batch_usage rows of versions before 6);
# and batches of the re-rating not counted (yet). Up to three of each, with how many there
# are.
_REPLACE_MISSING = """
SELECT agent_id, seq, count(*) OVER () FROM (
    SELECT l.agent_id, l.seq
    FROM usage_sources AS s CROSS JOIN LATERAL unnest(s.batch_ids) AS b(batch_id)
    JOIN batch_ledger AS l ON l.batch_id = b.batch_id
    WHERE s.hour_start >= %(start)s AND s.hour_start < %(end)s
    UNION
    SELECT agent_id, seq FROM batch_usage
    WHERE hour_start >= %(start)s AND hour_start < %(end)s
    EXCEPT
    SELECT * FROM unnest(%(b_agent_id)b::text[], %(b_seq)b::bigint[])
) AS m ORDER BY agent_id, seq LIMIT 3
"""
_REPLACE_UNCOUNTED = """
SELECT b.agent_id, b.seq, count(*) OVER ()
FROM unnest(%(b_agent_id)b::text[], %(b_seq)b::bigint[]) AS b(agent_id, seq)
WHERE NOT EXISTS (
    SELECT 1 FROM batch_ledger AS l WHERE l.agent_id = b.agent_id AND l.seq = b.seq)
ORDER BY b.agent_id, b.seq LIMIT 3
"""
# The new hour rows (summed by the database: exact, raises on overflow) replace the old
# ones: changed rows are updated, equal rows left alone, rows not recomputed deleted; and
# the sources of the hours are rewritten: their usage_sources and (legacy) batch_usage rows
# deleted, one usage_sources row per new hour row written (every batch of the re-rating is
# in the ledger: checked before). Returns rows deleted, rows inserted or updated.
_REPLACE_HOURLY = """
WITH parts AS (
    SELECT * FROM unnest(%(p_agent_id)b::text[], %(p_seq)b::bigint[],
                         %(p_subscription_id)b::text[], %(p_meter)b::text[],
                         %(p_hour_start)b::timestamptz[], %(p_quantity)b::text[]::numeric[],
                         %(p_quantity_max)b::text[]::numeric[], %(p_sample_count)b::bigint[])
         AS p(agent_id, seq, subscription_id, meter, hour_start, quantity, quantity_max,
              sample_count)
), fresh AS (
    SELECT subscription_id COLLATE "C" AS subscription_id, meter COLLATE "C" AS meter,
           hour_start, sum(quantity) AS quantity, max(quantity_max) AS quantity_max,
           sum(sample_count) AS sample_count
    FROM parts GROUP BY 1, 2, 3
), deleted AS (
    DELETE FROM usage_hourly AS h
    WHERE h.hour_start >= %(start)s AND h.hour_start < %(end)s
      AND NOT EXISTS (SELECT 1 FROM fresh AS f WHERE f.subscription_id = h.subscription_id
                      AND f.meter = h.meter AND f.hour_start = h.hour_start)
    RETURNING 1
), upserted AS (
    INSERT INTO usage_hourly AS h
        (subscription_id, meter, hour_start, quantity, quantity_max, sample_count, updated_at)
    SELECT subscription_id, meter, hour_start, quantity, quantity_max, sample_count,
           %(updated_at)s
    FROM fresh
    ON CONFLICT (subscription_id, meter, hour_start) DO UPDATE SET
        quantity = excluded.quantity,
        quantity_max = excluded.quantity_max,
        sample_count = excluded.sample_count,
        updated_at = excluded.updated_at
    WHERE (h.quantity, h.quantity_max, h.sample_count)
          IS DISTINCT FROM (excluded.quantity, excluded.quantity_max, excluded.sample_count)
    RETURNING 1
), unsourced AS (
    DELETE FROM usage_sources WHERE hour_start >= %(start)s AND hour_start < %(end)s
), unsourced_legacy AS (
    DELETE FROM batch_usage WHERE hour_start >= %(start)s AND hour_start < %(end)s
), sourced AS (
    INSERT INTO usage_sources (subscription_id, meter, hour_start, batch_ids)
    SELECT p.subscription_id, p.meter, p.hour_start, array_agg(l.batch_id ORDER BY l.batch_id)
    FROM parts AS p JOIN batch_ledger AS l ON l.agent_id = p.agent_id AND l.seq = p.seq
    GROUP BY p.subscription_id, p.meter, p.hour_start
)
SELECT (SELECT count(*) FROM deleted), (SELECT count(*) FROM upserted)
"""

# The batches behind some hours of one (subscription, meter), with how many of the hours
# each added to: usage_sources (schema 6) and the batch_usage rows of older versions. A batch
# is listed once per hour it added to (write_rated records new batches only, and a
# re-rating replaces both tables' rows of its hours), so count(*) counts hours.
_USAGE_BATCHES = """
SELECT agent_id, seq, topic, partition, "offset", received_at, count(*)
FROM (
    SELECT l.agent_id, l.seq, l.topic, l.partition, l."offset", l.received_at, s.hour_start
    FROM usage_sources AS s CROSS JOIN LATERAL unnest(s.batch_ids) AS b(batch_id)
    JOIN batch_ledger AS l ON l.batch_id = b.batch_id
    WHERE s.subscription_id = %(sub)s AND s.meter = %(meter)s
      AND s.hour_start >= %(start)s AND s.hour_start < %(end)s
    UNION ALL
    SELECT l.agent_id, l.seq, l.topic, l.partition, l."offset", l.received_at, u.hour_start
    FROM batch_usage AS u JOIN batch_ledger AS l ON l.agent_id = u.agent_id AND l.seq = u.seq
    WHERE u.subscription_id = %(sub)s AND u.meter = %(meter)s
      AND u.hour_start >= %(start)s AND u.hour_start < %(end)s
) AS u
GROUP BY agent_id, seq, topic, partition, "offset", received_at
ORDER BY topic, partition, "offset", agent_id, seq
"""

# The tables partitioned (or chunked) by hour_start: usage and its sources (schema 8).
_USAGE_TABLES = ("usage_hourly", "usage_sources")

# Partitioned natively? Is TimescaleDB installed? (Its views exist only then.)
_LAYOUT = """
SELECT to_regclass('usage_hourly') IN (SELECT partrelid FROM pg_partitioned_table),
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
"""
_IS_HYPERTABLE = """
SELECT to_regclass('usage_hourly') IN (
    SELECT format('%I.%I', hypertable_schema, hypertable_name)::regclass
    FROM timescaledb_information.hypertables)
"""

# Upsert by key; closing a span is writing it again with its end.
_WRITE_SPANS = """
INSERT INTO resource_spans AS s (resource_id, subscription_id, plan_id, span_start, span_end)
SELECT * FROM unnest(%(resource_id)b::text[], %(subscription_id)b::text[], %(plan_id)b::text[],
                     %(span_start)b::timestamptz[], %(span_end)b::timestamptz[])
ON CONFLICT (resource_id, span_start) DO UPDATE SET
    subscription_id = excluded.subscription_id,
    plan_id = excluded.plan_id,
    span_end = excluded.span_end
"""

_INVOICE_COLUMNS = (
    "key, account_id, period_start, period_end, currency, status, total_minor, document"
)

# Lifecycle events (schema 5): the first stored of each (resource_id, event_id) wins.
_INSERT_EVENTS = """
INSERT INTO resource_events
    (resource_id, event_id, kind, plan_id, subscription_id, occurred_at, agent_id,
     received_at, stored_at)
SELECT resource_id, event_id, kind, plan_id, subscription_id, occurred_at, agent_id,
       received_at, %(stored_at)s
FROM unnest(%(resource_id)b::text[], %(event_id)b::text[], %(kind)b::text[],
            %(plan_id)b::text[], %(subscription_id)b::text[], %(occurred_at)b::timestamptz[],
            %(agent_id)b::text[], %(received_at)b::timestamptz[])
     AS u(resource_id, event_id, kind, plan_id, subscription_id, occurred_at, agent_id,
          received_at)
ON CONFLICT (resource_id, event_id) DO NOTHING
RETURNING resource_id
"""

_SELECT_EVENTS = (
    "SELECT resource_id, event_id, kind, plan_id, subscription_id, occurred_at, agent_id, "
    "received_at FROM resource_events"
)

# The spans of the re-derived resources that their events no longer give.
_DELETE_STALE_SPANS = """
DELETE FROM resource_spans AS s
WHERE s.resource_id = ANY(%(resource_ids)b::text[])
  AND NOT EXISTS (
    SELECT 1 FROM unnest(%(resource_id)b::text[], %(span_start)b::timestamptz[])
                  AS d(resource_id, span_start)
    WHERE d.resource_id = s.resource_id AND d.span_start = s.span_start)
"""


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
        self._conninfo = conninfo
        self._closed = False
        self._live = self._connect()
        # One connection serves one transaction at a time, whichever thread asks.
        self._lock = threading.Lock()
        # Time layout of the schema (see layout()), read once after migrating; and the
        # month partitions known to exist, so a write asks for a new month only once.
        self._layout: str | None = None
        self._known_months: set[tuple[str, datetime]] = set()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        # No server-side prepared statements: PGlite shares one backend session between all
        # connections, where psycopg's per-connection names (_pg3_0, ...) would collide.
        conn = psycopg.connect(self._conninfo, autocommit=True, prepare_threshold=None)
        conn.adapters.register_dumper(PgArray, _PgArrayDumper)
        conn.execute("SET TIME ZONE 'UTC'")
        return conn

    @property
    def _conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The connection. Once it broke (server restarted, session dropped), the call that
        met it raised OperationalError; the next call opens a new one (and raises
        OperationalError itself while the server refuses): callers retry, with backoff."""
        if self._live.closed and not self._closed:
            self._live = self._connect()
        return self._live

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._live.close()

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
            self._layout = None
            self._known_months.clear()
        return applied_now

    def layout(self) -> str:
        """How usage_hourly and resource_spans are laid out in time: ``"timescaledb"``
        (hypertables), ``"partitioned"`` (native monthly range partitions) or ``"plain"``
        (a schema before version 4)."""
        with self._lock:
            return self._current_layout()

    def _current_layout(self) -> str:
        if self._layout is None:
            with self._conn.transaction():
                row = self._conn.execute(_LAYOUT).fetchone()
                assert row is not None
                partitioned, has_timescale = bool(row[0]), bool(row[1])
                hypertable = False
                if has_timescale and not partitioned:
                    found = self._conn.execute(_IS_HYPERTABLE).fetchone()
                    hypertable = found is not None and bool(found[0])
            self._layout = (
                "partitioned" if partitioned else "timescaledb" if hypertable else "plain"
            )
        return self._layout

    def _ensure_month_partitions(self, tables: Sequence[str], instants: pl.Series) -> None:
        """On the partitioned layout, create the month partitions of each of ``tables`` that
        rows at ``instants`` need and that this store has not seen yet, in their own short
        transaction (so a write that fails later does not undo them). Rows of a month
        without a partition would still land in the DEFAULT partition."""
        if instants.is_empty() or self._current_layout() != "partitioned":
            return
        months = instants.dt.truncate("1mo").unique().to_list()
        missing = [(t, m) for t in tables for m in months if (t, m) not in self._known_months]
        if not missing:
            return
        with self._conn.transaction():
            for table in dict.fromkeys(t for t, _ in missing):
                self._conn.execute(
                    "SELECT meterline_ensure_month_partitions(%s, %s::timestamptz[])",
                    (table, [m for t, m in missing if t == table]),
                )
        self._known_months.update(missing)

    def set_usage_retention(self, keep: timedelta | None) -> int | None:
        """TimescaleDB only: keep usage_hourly chunks, and the usage_sources chunks that
        explain them, for ``keep`` (retention policies that drop older chunks), or keep
        everything (``None``, the default: billable usage is never dropped unless
        configured). Returns the job id of usage_hourly's policy, or None. Must exceed the
        longest period that may still be re-closed."""
        with self._lock:
            if self._current_layout() != "timescaledb":
                raise RuntimeError(
                    "a usage retention policy needs TimescaleDB; this database uses the "
                    f"{self._current_layout()!r} layout (drop old month partitions instead)"
                )
            jobs: list[int] = []
            with self._conn.transaction():
                for table in _USAGE_TABLES:
                    self._conn.execute(
                        "SELECT remove_retention_policy(%s, if_exists => true)", (table,)
                    )
                    if keep is not None:
                        row = self._conn.execute(
                            "SELECT add_retention_policy(%s, drop_after => %s)", (table, keep)
                        ).fetchone()
                        assert row is not None
                        jobs.append(int(row[0]))
            return jobs[0] if jobs else None

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
        with self._lock:
            self._ensure_month_partitions(_USAGE_TABLES, write.partials["hour_start"])
        with self._lock, self._conn.transaction():
            if write.ledger.height:
                params = _ledger_params(write.ledger)
                params["rated_at"] = rated_at
                new_keys = self._conn.execute(_INSERT_LEDGER, params).fetchall()
                new_batches = len(new_keys)
                fresh = _partials_of(write, new_keys)
                if fresh.height:
                    params = _hourly_params(fresh)
                    params["rated_at"] = rated_at
                    row = self._conn.execute(_ADD_HOURLY_AND_SOURCES, params).fetchone()
                    assert row is not None
                    hourly_rows = int(row[0])
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

    def usage_changed_since(self, instant: datetime) -> pl.DataFrame:
        require_aware(instant, "instant")
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                "SELECT subscription_id, meter, hour_start, updated_at FROM usage_hourly "
                "WHERE updated_at > %s ORDER BY subscription_id, meter, hour_start",
                (instant,),
            ).fetchall()
        return pl.DataFrame(rows, schema=CHANGED_SCHEMA, orient="row")

    def replace_hourly(
        self,
        start: datetime,
        end: datetime,
        partials: pl.DataFrame,
        batches: pl.DataFrame,
        updated_at: datetime,
    ) -> int:
        replacement = prepare_replacement(start, end, partials, batches, updated_at)
        params: dict[str, Any] = {
            "start": start,
            "end": end,
            "updated_at": updated_at,
            "b_agent_id": replacement.batches["agent_id"].to_list(),
            "b_seq": replacement.batches["seq"].to_list(),
            **_partials_params(replacement.partials),
        }
        with self._lock:
            self._ensure_month_partitions(_USAGE_TABLES, replacement.partials["hour_start"])
        with self._lock, self._conn.transaction():
            # SHARE conflicts with the ROW EXCLUSIVE lock write_rated's INSERT takes: rating
            # writes wait until this commits, and this waits for those in flight.
            self._conn.execute("LOCK TABLE batch_ledger IN SHARE MODE")
            missing = self._conn.execute(_REPLACE_MISSING, params).fetchall()
            uncounted = self._conn.execute(_REPLACE_UNCOUNTED, params).fetchall()
            replace_conflict(missing, uncounted)
            row = self._conn.execute(_REPLACE_HOURLY, params).fetchone()
        assert row is not None
        return int(row[0]) + int(row[1])

    def ledger_count(self) -> int:
        with self._lock, self._conn.transaction():
            row = self._conn.execute("SELECT count(*) FROM batch_ledger").fetchone()
        assert row is not None
        return int(row[0])

    # -- resource spans ----------------------------------------------------------------------
    def write_resource_spans(self, spans: pl.DataFrame) -> int:
        spans = check_spans(spans)
        if spans.is_empty():
            return 0
        params = {c: spans[c].to_list() for c in SPANS_SCHEMA}
        with self._lock:
            self._ensure_month_partitions(("resource_spans",), spans["span_start"])
            with self._conn.transaction():
                cursor = self._conn.execute(_WRITE_SPANS, params)
        return cursor.rowcount

    def resource_spans(
        self, start: datetime, end: datetime, resource_ids: Sequence[str] | None = None
    ) -> pl.DataFrame:
        require_aware(start, "start")
        require_aware(end, "end")
        params: dict[str, Any] = {"start": start, "end": end}
        query = (
            "SELECT resource_id, subscription_id, plan_id, span_start, span_end "
            "FROM resource_spans WHERE span_start < %(end)s "
            "AND (span_end IS NULL OR span_end > %(start)s)"
        )
        if resource_ids is not None:
            params["resource_ids"] = list(resource_ids)
            query += " AND resource_id = ANY(%(resource_ids)b::text[])"
        query += " ORDER BY resource_id, span_start"
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(query, params).fetchall()
        return pl.DataFrame(rows, schema=SPANS_SCHEMA, orient="row")

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
        touched: list[str] = []
        new_events = 0
        spans = pl.DataFrame(schema=SPANS_SCHEMA)
        with self._lock:
            # Span starts are event instants: the months of the new events are the only
            # ones a derived span may need a partition for.
            self._ensure_month_partitions(("resource_spans",), events["occurred_at"])
            with self._conn.transaction():
                if events.height:
                    params: dict[str, Any] = {c: events[c].to_list() for c in EVENTS_SCHEMA}
                    params["stored_at"] = stored_at
                    rows = self._conn.execute(_INSERT_EVENTS, params).fetchall()
                    new_events = len(rows)
                    touched = sorted({r[0] for r in rows})
                if touched:
                    stored = pl.DataFrame(
                        self._conn.execute(
                            _SELECT_EVENTS + " WHERE resource_id = ANY(%(ids)b::text[]) "
                            "ORDER BY resource_id, occurred_at, event_id",
                            {"ids": touched},
                        ).fetchall(),
                        schema=EVENTS_SCHEMA,
                        orient="row",
                    )
                    spans = check_spans(derive(stored))
                    require_spans_of(spans, touched)
                    self._conn.execute(
                        _DELETE_STALE_SPANS,
                        {
                            "resource_ids": touched,
                            "resource_id": spans["resource_id"].to_list(),
                            "span_start": spans["span_start"].to_list(),
                        },
                    )
                    if spans.height:
                        self._conn.execute(
                            _WRITE_SPANS, {c: spans[c].to_list() for c in SPANS_SCHEMA}
                        )
                if consumed:
                    self._conn.execute(
                        _WRITE_OFFSETS,
                        {
                            "group_id": [o.group_id for o in consumed],
                            "topic": [o.topic for o in consumed],
                            "partition": [o.partition for o in consumed],
                            "next_offset": [o.next_offset for o in consumed],
                            "rated_at": stored_at,
                        },
                    )
        return LifecycleOutcome(new_events, handed_in - new_events, len(touched), spans.height)

    def lifecycle_events(self, resource_ids: Sequence[str] | None = None) -> pl.DataFrame:
        params: dict[str, Any] = {}
        query = _SELECT_EVENTS
        if resource_ids is not None:
            params["ids"] = list(resource_ids)
            query += " WHERE resource_id = ANY(%(ids)b::text[])"
        query += " ORDER BY resource_id, occurred_at, event_id"
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(query, params).fetchall()
        return pl.DataFrame(rows, schema=EVENTS_SCHEMA, orient="row")

    # -- agent tokens ----------------------------------------------------------------------
    def save_agent_token(
        self, token_hash: str, agent_id: str, scope: Sequence[str], issued_at: datetime
    ) -> None:
        scope_json = check_agent_token(token_hash, agent_id, scope, issued_at)
        with self._lock, self._conn.transaction():
            row = self._conn.execute(
                "INSERT INTO agent_tokens (token_hash, agent_id, scope, issued_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (token_hash) DO NOTHING RETURNING 1",
                (token_hash, agent_id, scope_json, issued_at),
            ).fetchone()
        if row is None:
            raise ValueError(f"token hash {token_hash[:12]}... is already stored")

    def revoke_agent_tokens(self, agent_id: str, revoked_at: datetime) -> int:
        require_aware(revoked_at, "revoked_at")
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                "UPDATE agent_tokens SET revoked_at = greatest(%s, issued_at) "
                "WHERE agent_id = %s AND revoked_at IS NULL RETURNING 1",
                (revoked_at, agent_id),
            ).fetchall()
        return len(rows)

    def active_agent_tokens(self) -> list[AgentToken]:
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                "SELECT token_hash, agent_id, scope, issued_at FROM agent_tokens "
                "WHERE revoked_at IS NULL ORDER BY agent_id, token_hash"
            ).fetchall()
        return [
            AgentToken(token_hash, agent_id, scope_from_json(scope), _utc(issued_at), None)
            for token_hash, agent_id, scope, issued_at in rows
        ]

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

    # -- invoice lifecycle ---------------------------------------------------------------
    def load_invoice(self, key: str) -> StoredInvoice | None:
        with self._lock, self._conn.transaction():
            row = self._conn.execute(
                f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE key = %s", (key,)
            ).fetchone()
        return None if row is None else _stored_invoice(row)

    def load_invoices_ending_after(
        self, instant: datetime, status: str | None = None
    ) -> list[StoredInvoice]:
        require_aware(instant, "instant")
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE period_end > %s "
                "AND (%s::text IS NULL OR status = %s::text) ORDER BY key",
                (instant, status, status),
            ).fetchall()
        return [_stored_invoice(r) for r in rows]

    def issue_invoice(
        self, key: str, series: str, issued_at: datetime, render: IssueRenderer
    ) -> StoredInvoice:
        require_aware(issued_at, "issued_at")
        if not series:
            raise ValueError("series must not be empty")
        with self._lock, self._conn.transaction():
            row = self._conn.execute(
                f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE key = %s FOR UPDATE", (key,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no invoice {key!r}")
            draft = _stored_invoice(row)
            if draft.status != "draft":
                raise IssuedInvoiceError(f"invoice {key!r} is already issued")
            # The counter row stays locked until commit: concurrent issuers queue here.
            seq_row = self._conn.execute(
                "INSERT INTO invoice_sequences AS s (series, last_number) VALUES (%s, 1) "
                "ON CONFLICT (series) DO UPDATE SET last_number = s.last_number + 1 "
                "RETURNING last_number",
                (series,),
            ).fetchone()
            assert seq_row is not None
            seq = int(seq_row[0])
            rendering = render(draft, seq)
            self._conn.execute(
                "INSERT INTO invoice_numbers (invoice_key, series, seq, number, issued_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                (key, series, seq, rendering.number, issued_at),
            )
            self._conn.execute(
                "UPDATE invoices SET status = 'issued', document = %s, updated_at = now() "
                "WHERE key = %s",
                (rendering.document, key),
            )
            for event in rendering.events:
                require_aware(event.created_at, f"event {event.event_id}: created_at")
                self._conn.execute(
                    "INSERT INTO billing_outbox "
                    "(event_id, topic, kafka_key, value, created_at) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (event.event_id, event.topic, event.key, event.value, event.created_at),
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
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                "DELETE FROM invoices WHERE key = ANY(%s::text[]) AND status = 'draft' RETURNING 1",
                (list(keys),),
            ).fetchall()
        return len(rows)

    def invoice_numbers(self, series: str | None = None) -> list[InvoiceNumber]:
        query = "SELECT invoice_key, series, seq, number, issued_at FROM invoice_numbers"
        params: tuple[Any, ...] = ()
        if series is not None:
            query += " WHERE series = %s"
            params = (series,)
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(query + " ORDER BY series, seq", params).fetchall()
        return [InvoiceNumber(k, s, int(q), n, _utc(at)) for k, s, q, n, at in rows]

    def usage_batches(
        self, subscription_id: str, meter: str, start: datetime, end: datetime
    ) -> pl.DataFrame:
        require_aware(start, "start")
        require_aware(end, "end")
        params = {"sub": subscription_id, "meter": meter, "start": start, "end": end}
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(_USAGE_BATCHES, params).fetchall()
        return pl.DataFrame(rows, schema=SOURCE_BATCH_SCHEMA, orient="row")

    def pending_billing_events(self, limit: int = 1000) -> list[BillingEvent]:
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                "SELECT event_id, topic, kafka_key, value, created_at FROM billing_outbox "
                "WHERE published_at IS NULL ORDER BY created_at, event_id LIMIT %s",
                (limit,),
            ).fetchall()
        return [BillingEvent(e, t, k, v, _utc(at)) for e, t, k, v, at in rows]

    def mark_billing_events_published(
        self, event_ids: Sequence[str], published_at: datetime
    ) -> int:
        require_aware(published_at, "published_at")
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                "UPDATE billing_outbox SET published_at = %s "
                "WHERE event_id = ANY(%s::text[]) AND published_at IS NULL RETURNING 1",
                (published_at, list(event_ids)),
            ).fetchall()
        return len(rows)


def _stored_invoice(row: Sequence[Any]) -> StoredInvoice:
    key, account, start, end, currency, status, total, doc = row
    return StoredInvoice(key, account, _utc(start), _utc(end), currency, status, int(total), doc)


def _partials_params(partials: pl.DataFrame) -> dict[str, Any]:
    return {
        "p_agent_id": partials["agent_id"].to_list(),
        "p_seq": partials["seq"].to_list(),
        "p_subscription_id": partials["subscription_id"].to_list(),
        "p_meter": partials["meter"].to_list(),
        "p_hour_start": partials["hour_start"].to_list(),
        "p_quantity": partials["quantity"].cast(pl.String).to_list(),
        "p_quantity_max": partials["quantity_max"].cast(pl.String).to_list(),
        "p_sample_count": partials["sample_count"].to_list(),
    }


def _ledger_params(ledger: pl.DataFrame) -> dict[str, Any]:
    """The ledger frame as binary unnest() arrays: one conversion per column, none per row."""
    return {
        "agent_id": text_array(ledger["agent_id"]),
        "seq": int8_array(ledger["seq"]),
        "topic": text_array(ledger["topic"]),
        "partition": int4_array(ledger["partition"]),
        "offset": int8_array(ledger["offset"]),
        "received_at": timestamptz_array(ledger["received_at"]),
        "sample_count": int8_array(ledger["sample_count"]),
    }


def _partials_of(write: RatedWrite, new_keys: Sequence[Sequence[Any]]) -> pl.DataFrame:
    """The partial rows of the batches the ledger insert just counted (``new_keys``: rows of
    agent_id, seq, batch_id), each with its batch's ``batch_id``."""
    keys = pl.DataFrame(new_keys, schema=NEW_BATCH_SCHEMA, orient="row")
    return write.partials.join(keys, on=list(BATCH_KEY), how="inner")


def _hourly_params(fresh: pl.DataFrame) -> dict[str, Any]:
    """Binary unnest() arrays of _ADD_HOURLY_AND_SOURCES: the partial rows of the new
    batches summed per hour row across the call (several times fewer rows to upsert), the
    batch ids of every hour row as one flat array, and each hour row's slice of it.
    Quantities travel as exact decimal text."""
    sums = sum_per_hour_with_sources(fresh)
    hourly = sums.hourly
    return {
        "h_subscription_id": text_array(hourly["subscription_id"]),
        "h_meter": text_array(hourly["meter"]),
        "h_hour_start": timestamptz_array(hourly["hour_start"]),
        "h_quantity": text_array(hourly["quantity"]),
        "h_quantity_max": text_array(hourly["quantity_max"]),
        "h_sample_count": int8_array(hourly["sample_count"]),
        "h_lo": int4_array(hourly["lo"]),
        "h_hi": int4_array(hourly["hi"]),
        "u_batch_id": int8_array(sums.batch_ids),
    }


class _PgArrayDumper(Dumper):
    """Sends a PgArray's prebuilt binary array as it is, typed with its array OID."""

    format = Format.BINARY

    def get_key(self, obj: Any, format: PyFormat) -> DumperKey:  # noqa: ARG002
        return (PgArray, obj.oid)

    def upgrade(self, obj: Any, format: PyFormat) -> Dumper:  # noqa: ARG002
        dumper = _PgArrayDumper(PgArray)
        dumper.oid = obj.oid
        return dumper

    def dump(self, obj: Any) -> bytes:
        data: bytes = obj.data
        return data
