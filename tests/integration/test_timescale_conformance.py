"""TimescaleDB conformance: the store's Timescale layout on TimescaleDB itself (the PGlite
WASM build with TimescaleDB 2.23, started by ``tests/fixtures/timescale.py``).

Given an empty schema on TimescaleDB; when the store migrates, rating writes through
``write_rated``, the continuous aggregates refresh and the policies run (PGlite has no
background workers: ``CALL run_job(id)`` runs them); then usage_hourly and resource_spans
are hypertables, the aggregates equal the hourly rows summed per UTC day and month, and the
invoicer's queries and a period close give what they give on PostgreSQL.

Select alone with ``pytest -m timescaledb`` (the store contract suite runs there too).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

from aggregation import migrations
from aggregation.pg_store import PgStore
from aggregation.ports import LEDGER_SCHEMA, PARTIALS_SCHEMA, UsageTotal
from invoicer.close import close_period
from rating.catalog_file import load_catalog_file

pytestmark = [pytest.mark.integration, pytest.mark.timescaledb]

TOPIC = "usage.samples.v1"
RATED_AT = datetime(2026, 11, 2, tzinfo=UTC)
E2E_CATALOG = Path(__file__).parents[1] / "e2e" / "catalog.yaml"
EVER = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))

Part = tuple[str, str, datetime, int, int, int]  # subscription, meter, hour, q, max, n


def write(store: PgStore, agent: str, seq: int, *parts: Part) -> None:
    """One batch of ``agent`` with the given partial rows."""
    ledger = pl.DataFrame(
        [(agent, seq, TOPIC, 0, seq, RATED_AT, len(parts))], schema=LEDGER_SCHEMA, orient="row"
    )
    rows = [(agent, seq, s, m, h, Decimal(q), Decimal(x), n) for s, m, h, q, x, n in parts]
    partials = pl.DataFrame(rows, schema=PARTIALS_SCHEMA, orient="row")
    outcome = store.write_rated(ledger, partials, [], RATED_AT)
    assert outcome.new_batches == 1


@pytest.fixture
def admin(timescale_url: str, timescale_store: PgStore) -> Iterator[psycopg.Connection[Any]]:
    """A second connection for TimescaleDB's own views and procedures (autocommit: the
    refresh procedures refuse to run inside a transaction block)."""
    with psycopg.connect(timescale_url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        yield conn


def jobs(admin: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    """(procedure, hypertable or view) -> job id, for Meterline's policies."""
    rows = admin.execute(
        "SELECT proc_name, hypertable_name, job_id FROM timescaledb_information.jobs "
        "WHERE hypertable_schema = current_schema()"
    ).fetchall()
    return {(proc, table): int(job) for proc, table, job in rows}


def refresh(admin: psycopg.Connection[Any], *views: str) -> None:
    for view in views:
        admin.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")


def test_migration_makes_hypertables_aggregates_and_policies(
    timescale_store: PgStore, admin: psycopg.Connection[Any]
) -> None:
    assert timescale_store.layout() == "timescaledb"
    dimensions = admin.execute(
        "SELECT hypertable_name, column_name, time_interval "
        "FROM timescaledb_information.dimensions "
        "WHERE hypertable_schema = current_schema() ORDER BY 1"
    ).fetchall()
    assert dimensions == [
        ("resource_spans", "span_start", timedelta(days=7)),
        ("usage_hourly", "hour_start", timedelta(days=7)),
        ("usage_sources", "hour_start", timedelta(days=7)),
    ]
    aggregates = admin.execute(
        "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates "
        "WHERE view_schema = current_schema() ORDER BY 1"
    ).fetchall()
    assert aggregates == [("usage_daily", True), ("usage_monthly", True)]
    assert set(jobs(admin)) == {
        ("policy_compression", "usage_hourly"),
        ("policy_refresh_continuous_aggregate", "usage_daily"),
        ("policy_refresh_continuous_aggregate", "usage_monthly"),
    }
    segment_by = admin.execute(
        "SELECT attname FROM timescaledb_information.compression_settings "
        "WHERE hypertable_name = 'usage_hourly' AND hypertable_schema = current_schema() "
        "AND segmentby_column_index IS NOT NULL ORDER BY segmentby_column_index"
    ).fetchall()
    assert segment_by == [("subscription_id",), ("meter",)]


def test_continuous_aggregates_sum_hourly_usage_per_utc_day_and_month(
    timescale_store: PgStore, admin: psycopg.Connection[Any]
) -> None:
    start = datetime(2026, 10, 30, tzinfo=UTC)
    hours = [start + timedelta(hours=5 * i) for i in range(20)]  # into November
    write(
        timescale_store,
        "agent-1",
        1,
        *[("sub-1", "cpu", h, 10 + i, i, 2) for i, h in enumerate(hours)],
        *[("sub-2", "net", h, 2**70, 7, 1) for h in hours[::3]],
    )
    refresh(admin, "usage_daily", "usage_monthly")

    hourly = timescale_store.usage_hourly(*EVER)
    expected_daily = (
        hourly.group_by("subscription_id", "meter", pl.col("hour_start").dt.truncate("1d"))
        .agg(pl.col("quantity").sum(), pl.col("quantity_max").max(), pl.col("sample_count").sum())
        .sort("subscription_id", "meter", "hour_start")
        .rows()
    )
    daily = admin.execute(
        "SELECT subscription_id, meter, day_start, quantity, quantity_max, sample_count "
        "FROM usage_daily ORDER BY 1, 2, 3"
    ).fetchall()
    assert [(s, m, d.astimezone(UTC), q, x, int(n)) for s, m, d, q, x, n in daily] == [
        (s, m, d, q, x, n) for s, m, d, q, x, n in expected_daily
    ]
    assert len(daily) == 4 + 4  # sub-1 and sub-2 on Oct 30, 31, Nov 1, 2

    monthly = admin.execute(
        "SELECT subscription_id, meter, month_start, quantity, quantity_max, sample_count "
        "FROM usage_monthly ORDER BY 3, 1, 2"
    ).fetchall()
    november = datetime(2026, 11, 1, tzinfo=UTC)
    expected_monthly = [
        (t.subscription_id, t.meter, month, t.quantity, t.quantity_max, t.sample_count)
        for month, end in ((datetime(2026, 10, 1, tzinfo=UTC), november), (november, EVER[1]))
        for t in timescale_store.usage_totals(month, end)
    ]
    got = [(s, m, d, int(q), int(x), int(n)) for s, m, d, q, x, n in monthly]
    assert got == expected_monthly

    # Materialised only: late usage shows in the aggregates after the next refresh.
    write(timescale_store, "agent-1", 2, ("sub-1", "cpu", hours[0], 1000, 999, 1))
    total = "SELECT sum(quantity), max(quantity_max) FROM usage_daily WHERE meter = 'cpu'"
    before = admin.execute(total).fetchone()
    refresh(admin, "usage_daily")
    after = admin.execute(total).fetchone()
    assert before is not None
    assert after is not None
    assert after[0] - before[0] == 1000
    assert after[1] == 999


def test_refresh_policies_run_as_jobs(
    timescale_store: PgStore, admin: psycopg.Connection[Any]
) -> None:
    """No background workers in PGlite: the policy jobs run when called."""
    now_row = admin.execute("SELECT date_trunc('hour', now())").fetchone()
    assert now_row is not None
    recent = now_row[0].astimezone(UTC) - timedelta(days=2)
    write(timescale_store, "agent-1", 1, ("sub-1", "cpu", recent, 5, 5, 1))
    assert admin.execute("SELECT count(*) FROM usage_daily").fetchone() == (0,)
    for (proc, _), job in jobs(admin).items():
        if proc == "policy_refresh_continuous_aggregate":
            admin.execute("CALL run_job(%s)", (job,))
    assert admin.execute("SELECT quantity FROM usage_daily").fetchall() == [(Decimal(5),)]
    assert admin.execute("SELECT quantity FROM usage_monthly").fetchall() == [(Decimal(5),)]


def test_compressed_chunks_still_take_late_usage(
    timescale_store: PgStore, admin: psycopg.Connection[Any]
) -> None:
    old = datetime(2020, 3, 2, 10, tzinfo=UTC)  # long past the 30-day compression horizon
    write(timescale_store, "agent-1", 1, ("sub-1", "cpu", old, 10, 4, 2))
    write(timescale_store, "agent-1", 2, ("sub-1", "cpu", old + timedelta(days=10), 1, 1, 1))
    admin.execute("CALL run_job(%s)", (jobs(admin)["policy_compression", "usage_hourly"],))
    compressed = admin.execute(
        "SELECT count(*) FILTER (WHERE is_compressed), count(*) "
        "FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'usage_hourly' AND hypertable_schema = current_schema()"
    ).fetchone()
    assert compressed == (2, 2)

    # A late batch for the compressed hour: the upsert adds into the compressed row.
    write(timescale_store, "agent-2", 1, ("sub-1", "cpu", old, 5, 9, 1))
    assert timescale_store.usage_totals(old, old + timedelta(days=1)) == [
        UsageTotal("sub-1", "cpu", 15, 9, 3)
    ]
    assert timescale_store.ledger_count() == 3


def test_usage_retention_is_a_setting(
    timescale_store: PgStore, admin: psycopg.Connection[Any]
) -> None:
    now_row = admin.execute("SELECT date_trunc('hour', now())").fetchone()
    assert now_row is not None
    recent = now_row[0].astimezone(UTC) - timedelta(days=1)
    old = datetime(2020, 3, 2, 10, tzinfo=UTC)
    write(timescale_store, "agent-1", 1, ("sub-1", "cpu", old, 1, 1, 1))
    write(timescale_store, "agent-1", 2, ("sub-1", "cpu", recent, 2, 2, 1))

    job = timescale_store.set_usage_retention(timedelta(days=400))
    assert job is not None
    assert jobs(admin)["policy_retention", "usage_hourly"] == job
    assert timescale_store.set_usage_retention(timedelta(days=400)) != job  # replaced
    # The sources that explain usage_hourly's rows go with them (schema 8).
    for table in ("usage_hourly", "usage_sources"):
        admin.execute("CALL run_job(%s)", (jobs(admin)["policy_retention", table],))
    assert timescale_store.usage_hourly(*EVER)["hour_start"].to_list() == [recent]
    assert timescale_store.usage_batches("sub-1", "cpu", *EVER)["seq"].to_list() == [2]

    assert timescale_store.set_usage_retention(None) is None
    assert ("policy_retention", "usage_hourly") not in jobs(admin)
    assert ("policy_retention", "usage_sources") not in jobs(admin)


def test_period_close_of_the_e2e_catalog_on_timescale(timescale_store: PgStore) -> None:
    """The e2e story's usage, written straight to the store: the same invoice lines."""
    catalog = load_catalog_file(E2E_CATALOG)
    day = datetime(2026, 10, 4, tzinfo=UTC)
    meter = "net.egress.bytes"
    write(
        timescale_store,
        "agent-a",
        1,
        ("acme-vps", meter, day.replace(hour=10), 9_345_678_901_234, 5 * 10**12, 3),
        ("acme-vps", meter, day.replace(hour=11), 1_000_000_000_000, 10**12, 1),
    )
    write(
        timescale_store,
        "agent-b",
        1,
        ("acme-vps", meter, day.replace(hour=12), 2_000_000_000_000, 2 * 10**12, 1),
    )
    berlin_october = (datetime(2026, 9, 30, 22, tzinfo=UTC), datetime(2026, 10, 31, 23, tzinfo=UTC))
    assert timescale_store.usage_totals(*berlin_october, ["acme-vps", "acme-backup"]) == [
        UsageTotal("acme-vps", meter, 12_345_678_901_234, 5 * 10**12, 5)
    ]

    result = close_period(
        timescale_store, catalog, 2026, 10, now=datetime(2026, 11, 1, 3, tzinfo=UTC)
    )
    (invoice,) = result.invoices
    assert {line.key: line.amount_minor for line in invoice.lines} == {
        "acme/2026-10-01/acme-backup/recurring": 813,
        "acme/2026-10-01/acme-vps/hourly/srv-1": 32,
        "acme/2026-10-01/acme-vps/hourly/srv-2": 415,
        "acme/2026-10-01/acme-vps/usage/net.egress.bytes": 11346,
    }
    assert [i.key for i in timescale_store.load_invoices()] == [invoice.key]


def test_migration_4_turns_existing_usage_into_a_hypertable(timescale_url: str) -> None:
    """A database at version 3 with usage: version 4 migrates the rows into chunks."""
    hours = [datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 20, tzinfo=UTC)]
    with psycopg.connect(timescale_url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute(migrations.SCHEMA_MIGRATIONS_DDL)
        for migration in migrations.discover("postgresql")[:3]:
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (%s, %s, now())",
                    (migration.version, migration.name),
                )
        for h in hours:
            conn.execute(
                "INSERT INTO usage_hourly VALUES ('sub-1', 'cpu', %s, 7, 7, 1, %s)", (h, RATED_AT)
            )
        store = PgStore(timescale_url)
        try:
            assert store.migrate() == [m.version for m in migrations.discover("postgresql")[3:]]
            assert store.layout() == "timescaledb"
            assert store.usage_hourly(*EVER)["hour_start"].to_list() == hours
        finally:
            store.close()
        chunks = conn.execute(
            "SELECT count(*) FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'usage_hourly' AND hypertable_schema = current_schema()"
        ).fetchone()
        assert chunks == (2,)


def test_usage_hourly_chunks_leave_room_for_hot_updates(
    timescale_store: PgStore, admin: psycopg.Connection[Any]
) -> None:
    """Schema 7: the hypertable's fillfactor (70) reaches every chunk, old and new."""
    for i, day in enumerate((5, 25)):  # two 7-day chunks
        at = datetime(2026, 10, day, tzinfo=UTC)
        write(timescale_store, "agent-ff", i, ("sub-1", "cpu", at, 1, 1, 1))
    options = admin.execute(
        "SELECT c.reloptions FROM timescaledb_information.chunks AS k "
        "JOIN pg_class AS c ON c.oid = format('%I.%I', k.chunk_schema, k.chunk_name)::regclass "
        "WHERE k.hypertable_name = 'usage_hourly' AND k.hypertable_schema = current_schema()"
    ).fetchall()
    assert len(options) >= 2
    assert all("fillfactor=70" in (row[0] or []) for row in options), options
