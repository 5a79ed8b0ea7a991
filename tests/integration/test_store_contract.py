"""The Store contract, run against both adapters (PostgreSQL and DuckDB) via ``store``.

Given a migrated, empty store; when rating, the catalog or the invoicer write through the
port; then what they read back is exact, and a batch counts once whatever is repeated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import psycopg
import pytest

from aggregation import migrations
from aggregation.factory import open_store
from aggregation.pg_store import PgStore
from aggregation.ports import (
    BATCH_KEY_SCHEMA,
    CHANGED_SCHEMA,
    HOURLY_SCHEMA,
    LEDGER_SCHEMA,
    PARTIALS_SCHEMA,
    SOURCE_BATCH_SCHEMA,
    SPANS_SCHEMA,
    AgentToken,
    ConsumedOffset,
    IssuedInvoiceError,
    ReplaceConflictError,
    Store,
    StoredInvoice,
    UsageTotal,
    WriteOutcome,
)

pytestmark = pytest.mark.integration

H0 = datetime(2026, 10, 1, tzinfo=UTC)
RATED_AT = datetime(2026, 10, 2, 12, 0, 0, tzinfo=UTC)
TOPIC = "usage.samples.v1"
GROUP = "rating"
EVER = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
MAX_QUANTITY = 10**38 - 1  # the largest numeric(38,0)


def hour(n: int) -> datetime:
    return H0 + timedelta(hours=n)


def ledger(*keys: tuple[str, int], partition: int = 0, first_offset: int = 0) -> pl.DataFrame:
    """One ledger row per (agent_id, seq), at consecutive offsets."""
    rows = [
        (agent, seq, TOPIC, partition, first_offset + i, H0, 10)
        for i, (agent, seq) in enumerate(keys)
    ]
    return pl.DataFrame(rows, schema=LEDGER_SCHEMA, orient="row")


Part = tuple[str, int, str, str, int, int, int, int]  # agent, seq, sub, meter, hour, q, max, n


def partials(*parts: Part) -> pl.DataFrame:
    rows = [
        (agent, seq, sub, meter, hour(h), Decimal(q), Decimal(qmax), n)
        for agent, seq, sub, meter, h, q, qmax, n in parts
    ]
    return pl.DataFrame(rows, schema=PARTIALS_SCHEMA, orient="row")


def hourly(store: Store) -> list[tuple[str, str, datetime, int, int, int]]:
    """Every usage_hourly row as plain ints."""
    frame = store.usage_hourly(*EVER)
    return [(s, m, h, int(q), int(qmax), n) for s, m, h, q, qmax, n in frame.rows()]


def invoice(key: str, *, status: str = "draft", total: int = 100, doc: str = "{}") -> StoredInvoice:
    account, _, day = key.partition("/")
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    return StoredInvoice(key, account, start, end, "EUR", status, total, doc)


# -- schema -------------------------------------------------------------------------------


@pytest.fixture(
    params=["postgresql", "duckdb", pytest.param("timescaledb", marks=pytest.mark.timescaledb)]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty, unmigrated store, in each form open_store() accepts for files."""
    if request.param in ("postgresql", "timescaledb"):
        fixture = "pg_url" if request.param == "postgresql" else "timescale_url"
        url: str = request.getfixturevalue(fixture)
        return url
    return f"duckdb://{tmp_path / 'fresh.duckdb'}"


@pytest.fixture
def fresh_store(store_url: str) -> Iterator[Store]:
    store = open_store(store_url)
    try:
        yield store
    finally:
        store.close()


def test_migrate_applies_every_version_once(fresh_store: Store) -> None:
    versions = [m.version for m in migrations.discover("postgresql")]
    assert versions == [m.version for m in migrations.discover("duckdb")]
    assert fresh_store.migrate() == versions
    assert fresh_store.migrate() == []


def test_migrate_again_on_a_migrated_store_is_a_no_op(store: Store) -> None:
    assert store.migrate() == []
    assert store.ledger_count() == 0


def test_schema_survives_reopening(store_url: str) -> None:
    first = open_store(store_url)
    try:
        first.migrate()
        first.save_catalog("{}", "d", "catalog.yaml", H0)
    finally:
        first.close()
    second = open_store(store_url)
    try:
        assert second.migrate() == []
        loaded = second.load_catalog()
        assert loaded is not None
        assert loaded.version == 1
    finally:
        second.close()


@pytest.mark.parametrize(
    "url",
    ["mysql://x", "duckdb://relative.duckdb", "duckdb:memory:", "duckdb:///", "", "sqlite:///a"],
)
def test_open_store_names_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError, match="duckdb::memory:") as caught:
        open_store(url)
    assert repr(url) in str(caught.value)


def test_in_memory_duckdb_store() -> None:
    store = open_store("duckdb::memory:")
    try:
        assert store.migrate() == [m.version for m in migrations.discover("duckdb")]
        assert store.load_catalog() is None
    finally:
        store.close()


# -- catalog ------------------------------------------------------------------------------


def test_catalog_versions_are_kept_and_the_latest_is_loaded(store: Store) -> None:
    assert store.load_catalog() is None
    v1 = store.save_catalog('{"v": 1}', "digest-1", "/etc/catalog.yaml", H0)
    later = H0 + timedelta(days=1, microseconds=7)
    v2 = store.save_catalog('{"v": 2}', "digest-2", "/etc/catalog.yaml", later)
    assert v2 > v1

    latest = store.load_catalog()
    assert latest is not None
    assert (latest.version, latest.document, latest.digest, latest.source) == (
        v2,
        '{"v": 2}',
        "digest-2",
        "/etc/catalog.yaml",
    )
    assert latest.applied_at == later
    assert latest.applied_at.tzinfo is UTC


# -- write_rated: exactly once --------------------------------------------------------------


def test_a_batch_counts_once_across_calls(store: Store) -> None:
    first = store.write_rated(
        ledger(("agent-1", 1)),
        partials(("agent-1", 1, "sub-1", "cpu", 0, 100, 7, 3)),
        [ConsumedOffset(GROUP, TOPIC, 0, 1)],
        RATED_AT,
    )
    assert first == WriteOutcome(new_batches=1, duplicate_batches=0, hourly_rows=1)
    before = hourly(store)

    # Redelivered later (a replay or a retry): same identity, nothing counted again.
    again = store.write_rated(
        ledger(("agent-1", 1), first_offset=5),
        partials(("agent-1", 1, "sub-1", "cpu", 0, 100, 7, 3)),
        [ConsumedOffset(GROUP, TOPIC, 0, 6)],
        RATED_AT,
    )
    assert again == WriteOutcome(new_batches=0, duplicate_batches=1, hourly_rows=0)
    assert hourly(store) == before == [("sub-1", "cpu", hour(0), 100, 7, 3)]
    assert store.ledger_count() == 1
    assert store.committed_offsets(GROUP, TOPIC) == {0: 6}


def test_a_batch_twice_in_one_ledger_frame_counts_once(store: Store) -> None:
    outcome = store.write_rated(
        ledger(("agent-1", 1), ("agent-2", 1), ("agent-1", 1)),
        partials(
            ("agent-1", 1, "sub-1", "cpu", 0, 100, 7, 3),
            ("agent-2", 1, "sub-2", "cpu", 0, 5, 5, 1),
        ),
        [ConsumedOffset(GROUP, TOPIC, 0, 3)],
        RATED_AT,
    )
    assert outcome == WriteOutcome(new_batches=2, duplicate_batches=1, hourly_rows=2)
    assert hourly(store) == [
        ("sub-1", "cpu", hour(0), 100, 7, 3),
        ("sub-2", "cpu", hour(0), 5, 5, 1),
    ]
    assert store.ledger_count() == 2


def test_a_batch_with_its_partials_twice_in_one_call_counts_once(store: Store) -> None:
    part: Part = ("agent-1", 1, "sub-1", "cpu", 0, 100, 7, 3)
    outcome = store.write_rated(
        ledger(("agent-1", 1), ("agent-1", 1)), partials(part, part), [], RATED_AT
    )
    assert outcome == WriteOutcome(new_batches=1, duplicate_batches=1, hourly_rows=1)
    assert hourly(store) == [("sub-1", "cpu", hour(0), 100, 7, 3)]


def test_partial_sums_add_up_across_calls(store: Store) -> None:
    first = store.write_rated(
        ledger(("agent-1", 1), ("agent-2", 1)),
        partials(
            ("agent-1", 1, "sub-1", "cpu", 0, 10, 4, 3),
            ("agent-2", 1, "sub-1", "cpu", 0, 5, 9, 2),
            ("agent-2", 1, "sub-1", "ram", 0, 1, 1, 1),
        ),
        [],
        RATED_AT,
    )
    assert first.hourly_rows == 2  # the two parts of (sub-1, cpu, hour 0) became one row
    second = store.write_rated(
        ledger(("agent-1", 2)),
        partials(
            ("agent-1", 2, "sub-1", "cpu", 0, 7, 6, 1),
            ("agent-1", 2, "sub-1", "cpu", 1, 3, 3, 1),
        ),
        [],
        RATED_AT + timedelta(minutes=1),
    )
    assert second == WriteOutcome(new_batches=1, duplicate_batches=0, hourly_rows=2)
    assert hourly(store) == [
        ("sub-1", "cpu", hour(0), 22, 9, 6),
        ("sub-1", "cpu", hour(1), 3, 3, 1),
        ("sub-1", "ram", hour(0), 1, 1, 1),
    ]


def test_quantities_beyond_int64_are_exact(store: Store) -> None:
    huge = 2**70
    store.write_rated(
        ledger(("agent-1", 1), ("agent-1", 2)),
        partials(
            ("agent-1", 1, "sub-1", "mem.byte_seconds", 0, huge, huge - 1, 1),
            ("agent-1", 2, "sub-1", "mem.byte_seconds", 0, huge + 1, 2**65, 1),
        ),
        [],
        RATED_AT,
    )
    frame = store.usage_hourly(*EVER)
    assert frame.schema == pl.Schema(HOURLY_SCHEMA)
    assert frame["quantity"].to_list() == [Decimal(2 * huge + 1)]
    assert frame["quantity_max"].to_list() == [Decimal(huge - 1)]
    assert store.usage_totals(*EVER) == [
        UsageTotal("sub-1", "mem.byte_seconds", 2 * huge + 1, huge - 1, 2)
    ]


def test_offsets_never_move_backwards(store: Store) -> None:
    store.write_rated(
        ledger(),
        partials(),
        [ConsumedOffset(GROUP, TOPIC, 0, 10), ConsumedOffset(GROUP, TOPIC, 1, 5)],
        RATED_AT,
    )
    outcome = store.write_rated(
        ledger(),
        partials(),
        [
            ConsumedOffset(GROUP, TOPIC, 0, 7),  # behind what is stored: ignored
            ConsumedOffset(GROUP, TOPIC, 1, 8),
            ConsumedOffset(GROUP, TOPIC, 1, 6),  # the same partition twice: the highest wins
            ConsumedOffset(GROUP, TOPIC, 2, 0),
            ConsumedOffset("other-group", TOPIC, 0, 99),
            ConsumedOffset(GROUP, "other-topic", 0, 42),
        ],
        RATED_AT,
    )
    assert outcome == WriteOutcome(new_batches=0, duplicate_batches=0, hourly_rows=0)
    assert store.committed_offsets(GROUP, TOPIC) == {0: 10, 1: 8, 2: 0}
    assert store.committed_offsets("other-group", TOPIC) == {0: 99}
    assert store.committed_offsets(GROUP, "other-topic") == {0: 42}
    assert store.committed_offsets("nobody", TOPIC) == {}


def test_an_empty_write_is_valid(store: Store) -> None:
    outcome = store.write_rated(ledger(), partials(), [], RATED_AT)
    assert outcome == WriteOutcome(new_batches=0, duplicate_batches=0, hourly_rows=0)
    assert store.ledger_count() == 0
    assert store.usage_hourly(*EVER).is_empty()


def test_a_batch_without_partials_is_still_counted(store: Store) -> None:
    # Every sample of the batch was rejected downstream: the batch is still consumed.
    outcome = store.write_rated(ledger(("agent-1", 1)), partials(), [], RATED_AT)
    assert outcome == WriteOutcome(new_batches=1, duplicate_batches=0, hourly_rows=0)
    assert store.ledger_count() == 1


# -- write_rated: atomicity and bad input --------------------------------------------------


def _snapshot(store: Store) -> tuple[int, list[Any], dict[int, int]]:
    return store.ledger_count(), hourly(store), store.committed_offsets(GROUP, TOPIC)


def test_a_failure_inside_write_rated_changes_nothing(store: Store) -> None:
    store.write_rated(
        ledger(("agent-1", 1)),
        partials(("agent-1", 1, "sub-1", "cpu", 0, MAX_QUANTITY, 1, 1)),
        [ConsumedOffset(GROUP, TOPIC, 0, 1)],
        RATED_AT,
    )
    before = _snapshot(store)

    # The database itself refuses the write after the ledger rows went in: the hour row
    # of sub-1 would exceed numeric(38,0). Everything of the call must roll back.
    with pytest.raises(Exception, match=r"(?i)overflow"):
        store.write_rated(
            ledger(("agent-2", 1), ("agent-1", 2)),
            partials(
                ("agent-2", 1, "sub-2", "cpu", 0, 5, 5, 1),
                ("agent-1", 2, "sub-1", "cpu", 0, 1, 1, 1),
            ),
            [ConsumedOffset(GROUP, TOPIC, 0, 3)],
            RATED_AT,
        )
    assert _snapshot(store) == before

    # The store is still usable, and the batches that failed were not recorded as seen.
    outcome = store.write_rated(
        ledger(("agent-2", 1)),
        partials(("agent-2", 1, "sub-2", "cpu", 0, 5, 5, 1)),
        [ConsumedOffset(GROUP, TOPIC, 0, 3)],
        RATED_AT,
    )
    assert outcome == WriteOutcome(new_batches=1, duplicate_batches=0, hourly_rows=1)


def test_an_hour_row_summed_within_one_call_past_38_digits_is_refused(store: Store) -> None:
    # Two new batches of one call add to the same hour row: their sum alone exceeds
    # numeric(38,0). The store must refuse it (not wrap it), and write nothing.
    big = MAX_QUANTITY // 2 + 1
    with pytest.raises(Exception, match=r"(?i)overflow"):
        store.write_rated(
            ledger(("agent-1", 1), ("agent-2", 1)),
            partials(
                ("agent-1", 1, "sub-1", "cpu", 0, big, big, 1),
                ("agent-2", 1, "sub-1", "cpu", 0, big, big, 1),
            ),
            [ConsumedOffset(GROUP, TOPIC, 0, 2)],
            RATED_AT,
        )
    assert _snapshot(store) == (0, [], {})


def test_partials_of_many_batches_sum_per_hour_row_and_each_batch_is_a_source(
    store: Store,
) -> None:
    # Batches of one call (one of them already counted) share hour rows: the new ones are
    # summed per row, and each new batch is recorded as a source of its hours.
    store.write_rated(
        ledger(("agent-1", 1)), partials(("agent-1", 1, "sub-1", "cpu", 0, 7, 7, 1)), [], RATED_AT
    )
    outcome = store.write_rated(
        ledger(("agent-1", 1), ("agent-1", 2), ("agent-2", 1)),
        partials(
            ("agent-1", 1, "sub-1", "cpu", 0, 7, 7, 1),
            ("agent-1", 2, "sub-1", "cpu", 0, 3, 2, 2),
            ("agent-1", 2, "sub-1", "cpu", 1, 4, 4, 1),
            ("agent-2", 1, "sub-1", "cpu", 0, 5, 9, 3),
            ("agent-2", 1, "sub-2", "net", 0, 6, 6, 1),
        ),
        [],
        RATED_AT,
    )
    assert outcome == WriteOutcome(new_batches=2, duplicate_batches=1, hourly_rows=3)
    assert hourly(store) == [
        ("sub-1", "cpu", hour(0), 15, 9, 6),
        ("sub-1", "cpu", hour(1), 4, 4, 1),
        ("sub-2", "net", hour(0), 6, 6, 1),
    ]
    sources = store.usage_batches("sub-1", "cpu", hour(0), hour(2))
    assert sorted(sources.select("agent_id", "seq").rows()) == [
        ("agent-1", 1),
        ("agent-1", 2),
        ("agent-2", 1),
    ]


def _null_subscription() -> pl.DataFrame:
    return partials(("agent-1", 1, "sub-1", "cpu", 0, 1, 1, 1)).with_columns(
        subscription_id=pl.lit(None, pl.String())
    )


BAD_WRITES: dict[str, tuple[pl.DataFrame, pl.DataFrame, str]] = {
    "null in partials": (
        ledger(("agent-1", 1)),
        _null_subscription(),
        r"partials frame .*'subscription_id' has 1 null",
    ),
    "float quantity": (
        ledger(("agent-1", 1)),
        partials(("agent-1", 1, "sub-1", "cpu", 0, 1, 1, 1)).with_columns(
            pl.col("quantity").cast(pl.Float64)
        ),
        r"partials frame .*'quantity' is Float64, expected Decimal",
    ),
    "missing column": (
        ledger(("agent-1", 1)).drop("received_at"),
        partials(),
        r"ledger frame .*missing columns \['received_at'\]",
    ),
    "partials of an unknown batch": (
        ledger(("agent-1", 1)),
        partials(("agent-9", 4, "sub-1", "cpu", 0, 1, 1, 1)),
        r"batches missing from the ledger frame .*'agent-9', 4",
    ),
    "two different rows for one hour of a batch": (
        ledger(("agent-1", 1)),
        partials(
            ("agent-1", 1, "sub-1", "cpu", 0, 1, 1, 1),
            ("agent-1", 1, "sub-1", "cpu", 0, 2, 2, 1),
        ),
        r"different rows for the same",
    ),
    "hour_start off the hour": (
        ledger(("agent-1", 1)),
        partials(("agent-1", 1, "sub-1", "cpu", 0, 1, 1, 1)).with_columns(
            pl.col("hour_start") + pl.duration(minutes=30)
        ),
        r"not on a whole UTC hour",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_WRITES))
def test_bad_frames_are_refused_and_write_nothing(store: Store, case: str) -> None:
    before = _snapshot(store)
    ledger_frame, partials_frame, message = BAD_WRITES[case]
    with pytest.raises(ValueError, match=message):
        store.write_rated(
            ledger_frame, partials_frame, [ConsumedOffset(GROUP, TOPIC, 0, 9)], RATED_AT
        )
    assert _snapshot(store) == before


def test_naive_times_are_refused(store: Store) -> None:
    naive = datetime(2026, 10, 1)  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="rated_at must be a timezone-aware"):
        store.write_rated(ledger(), partials(), [], naive)
    with pytest.raises(ValueError, match="start must be a timezone-aware"):
        store.usage_hourly(naive, EVER[1])
    with pytest.raises(ValueError, match="applied_at must be a timezone-aware"):
        store.save_catalog("{}", "d", "s", naive)


# -- usage queries ------------------------------------------------------------------------

# Mixed case and punctuation: both adapters must sort bytewise, as Python does.
SUBSCRIPTIONS = ["sub-b", "Sub-a", "sub_a", "sub-a"]


@pytest.fixture
def four_hours(store: Store) -> Store:
    """Each subscription uses cpu in hours 0..3 (quantity 10*h + 1, max h) and ram in hour 2."""
    parts: list[Part] = []
    keys: list[tuple[str, int]] = []
    for i, sub in enumerate(SUBSCRIPTIONS):
        agent = f"agent-{i}"
        keys.append((agent, 1))
        parts.extend((agent, 1, sub, "cpu", h, 10 * h + 1, h, 1) for h in range(4))
        parts.append((agent, 1, sub, "ram", 2, 1000, 600, 2))
    store.write_rated(ledger(*keys), partials(*parts), [], RATED_AT)
    return store


def test_usage_hourly_range_is_half_open_and_sorted(four_hours: Store) -> None:
    frame = four_hours.usage_hourly(hour(1), hour(3))
    assert frame.schema == pl.Schema(HOURLY_SCHEMA)
    keys = frame.select("subscription_id", "meter", "hour_start").rows()
    expected = sorted(
        [(sub, "cpu", hour(h)) for sub in SUBSCRIPTIONS for h in (1, 2)]
        + [(sub, "ram", hour(2)) for sub in SUBSCRIPTIONS]
    )
    assert keys == expected
    assert frame.filter(pl.col("meter") == "cpu")["quantity"].to_list() == [
        Decimal(11),
        Decimal(21),
    ] * len(SUBSCRIPTIONS)


def test_usage_hourly_filters_by_subscription(four_hours: Store) -> None:
    frame = four_hours.usage_hourly(hour(0), hour(1), ["sub_a", "Sub-a", "nobody"])
    assert frame.select("subscription_id", "meter", "hour_start").rows() == [
        ("Sub-a", "cpu", hour(0)),
        ("sub_a", "cpu", hour(0)),
    ]
    empty = four_hours.usage_hourly(hour(0), hour(4), [])
    assert empty.is_empty()
    assert empty.schema == pl.Schema(HOURLY_SCHEMA)


def test_usage_totals_sum_and_max_over_the_range(four_hours: Store) -> None:
    totals = four_hours.usage_totals(hour(1), hour(4))
    assert totals == [
        UsageTotal(sub, meter, quantity, peak, samples)
        for sub in sorted(SUBSCRIPTIONS)
        for meter, quantity, peak, samples in (("cpu", 11 + 21 + 31, 3, 3), ("ram", 1000, 600, 2))
    ]
    assert four_hours.usage_totals(hour(0), hour(2), ["sub-b"]) == [
        UsageTotal("sub-b", "cpu", 1 + 11, 1, 2)
    ]
    assert four_hours.usage_totals(hour(4), hour(8)) == []


def test_usage_ranges_accept_any_utc_offset(four_hours: Store) -> None:
    berlin_summer = timezone(timedelta(hours=2))
    start = hour(1).astimezone(berlin_summer)
    end = hour(2).astimezone(berlin_summer)
    frame = four_hours.usage_hourly(start, end, ["sub-b"])
    assert frame.select("meter", "hour_start").rows() == [("cpu", hour(1))]


# -- invoices -----------------------------------------------------------------------------


def test_save_invoices_replaces_drafts_by_key(store: Store) -> None:
    store.save_invoices([invoice("acc-1/2026-10-01", doc="v1"), invoice("acc-2/2026-10-01")])
    store.save_invoices([invoice("acc-1/2026-10-01", total=250, doc="v2")])
    loaded = store.load_invoices()
    assert [(i.key, i.total_minor, i.document) for i in loaded] == [
        ("acc-1/2026-10-01", 250, "v2"),
        ("acc-2/2026-10-01", 100, "{}"),
    ]
    assert loaded[0] == invoice("acc-1/2026-10-01", total=250, doc="v2")
    assert loaded[0].period_start.tzinfo is UTC


def test_a_draft_can_be_issued_but_an_issued_invoice_never_changes(store: Store) -> None:
    store.save_invoices([invoice("acc-1/2026-10-01"), invoice("acc-2/2026-10-01")])
    store.save_invoices([invoice("acc-1/2026-10-01", status="issued", total=120)])
    before = store.load_invoices()

    with pytest.raises(IssuedInvoiceError, match="acc-1/2026-10-01"):
        store.save_invoices(
            [
                invoice("acc-2/2026-10-01", total=999),  # a draft: would be replaced...
                invoice("acc-1/2026-10-01", total=1),  # ...but this one is issued
                invoice("acc-3/2026-10-01"),
            ]
        )
    assert store.load_invoices() == before  # nothing of the call was written
    with pytest.raises(IssuedInvoiceError):
        store.save_invoices([invoice("acc-1/2026-10-01", status="issued", total=120)])


def test_load_invoices_filters_by_period_start(store: Store) -> None:
    store.save_invoices(
        [
            invoice("acc-2/2026-11-01"),
            invoice("acc-1/2026-10-01"),
            invoice("acc-2/2026-10-01"),
        ]
    )
    october = datetime(2026, 10, 1, tzinfo=UTC)
    assert [i.key for i in store.load_invoices(october)] == [
        "acc-1/2026-10-01",
        "acc-2/2026-10-01",
    ]
    same_instant = october.astimezone(timezone(timedelta(hours=-5)))
    assert [i.key for i in store.load_invoices(same_instant)] == [
        "acc-1/2026-10-01",
        "acc-2/2026-10-01",
    ]
    assert store.load_invoices(datetime(2026, 12, 1, tzinfo=UTC)) == []
    assert len(store.load_invoices()) == 3


def test_invoice_times_keep_their_instant(store: Store) -> None:
    berlin = timezone(timedelta(hours=2))
    start = datetime(2026, 10, 1, 0, 0, tzinfo=berlin)  # 2026-09-30T22:00Z
    end = datetime(2026, 11, 1, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    draft = StoredInvoice("acc-1/2026-10-01", "acc-1", start, end, "EUR", "draft", 5, "{}")
    store.save_invoices([draft])
    (loaded,) = store.load_invoices()
    assert loaded.period_start == datetime(2026, 9, 30, 22, 0, tzinfo=UTC)
    assert loaded.period_end == datetime(2026, 10, 31, 23, 0, tzinfo=UTC)
    assert loaded.period_start.tzinfo is UTC


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([invoice("a/2026-10-01"), invoice("a/2026-10-01")], "appears twice"),
        ([invoice("a/2026-10-01", status="paid")], "status 'paid' is not one of"),
    ],
)
def test_bad_invoices_are_refused(store: Store, bad: list[StoredInvoice], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.save_invoices(bad)
    assert store.load_invoices() == []


# -- PostgreSQL: two writers of the same batch at once --------------------------------------


def _wait_until_blocked(
    admin: psycopg.Connection[Any], writer: Future[Any], deadline_s: float = 30.0
) -> None:
    """Wait (bounded) until some session of this database waits for a row lock, or until
    the writer finished anyway (its result then tells what went wrong)."""
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up and not writer.done():
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
        if row is not None and row[0] > 0:
            return
        time.sleep(0.01)
    if not writer.done():
        raise AssertionError(f"no session blocked on the ledger row within {deadline_s} s")


@pytest.mark.parametrize("other_writer", ["commits", "rolls back"])
def test_pg_concurrent_writers_of_one_batch_count_it_once(
    pg_store: PgStore, pg_url: str, other_writer: str
) -> None:
    with (
        psycopg.connect(pg_url) as other,  # another worker, mid-transaction
        psycopg.connect(pg_url, autocommit=True) as admin,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        other.execute(
            "INSERT INTO batch_ledger VALUES ('agent-1', 1, %s, 0, 0, %s, 10, %s)",
            (TOPIC, H0, RATED_AT),
        )
        other.execute(
            "INSERT INTO usage_hourly VALUES ('sub-1', 'cpu', %s, 100, 7, 3, %s)",
            (hour(0), RATED_AT),
        )
        pending = pool.submit(
            pg_store.write_rated,
            ledger(("agent-1", 1)),
            partials(("agent-1", 1, "sub-1", "cpu", 0, 100, 7, 3)),
            [ConsumedOffset(GROUP, TOPIC, 0, 1)],
            RATED_AT,
        )
        _wait_until_blocked(admin, pending)
        if other_writer == "commits":
            other.commit()
        else:
            other.rollback()
        result = pending.result(timeout=60)

    if other_writer == "commits":
        assert result == WriteOutcome(new_batches=0, duplicate_batches=1, hourly_rows=0)
    else:
        assert result == WriteOutcome(new_batches=1, duplicate_batches=0, hourly_rows=1)
    assert pg_store.ledger_count() == 1
    assert hourly(pg_store) == [("sub-1", "cpu", hour(0), 100, 7, 3)]


# -- agent tokens ---------------------------------------------------------------------------

HASH_A1 = "a1" * 32
HASH_A2 = "a2" * 32
HASH_B1 = "b1" * 32


def test_agent_tokens_are_saved_listed_and_revoked_per_agent(store: Store) -> None:
    assert store.active_agent_tokens() == []
    store.save_agent_token(HASH_A2, "agent-a", ["srv-2", "srv-1", "srv-1"], H0)
    store.save_agent_token(HASH_A1, "agent-a", ["*"], H0 + timedelta(hours=1))
    store.save_agent_token(HASH_B1, "agent-b", ["srv-9"], H0)
    assert store.active_agent_tokens() == [
        AgentToken(HASH_A1, "agent-a", ("*",), H0 + timedelta(hours=1), None),
        AgentToken(HASH_A2, "agent-a", ("srv-1", "srv-2"), H0, None),  # sorted, deduplicated
        AgentToken(HASH_B1, "agent-b", ("srv-9",), H0, None),
    ]
    assert store.revoke_agent_tokens("agent-a", H0 + timedelta(days=1)) == 2
    assert store.revoke_agent_tokens("agent-a", H0 + timedelta(days=2)) == 0  # already revoked
    assert store.revoke_agent_tokens("nobody", H0) == 0
    assert [t.agent_id for t in store.active_agent_tokens()] == ["agent-b"]
    # A revoked token's hash stays taken: it can never be issued again.
    with pytest.raises(ValueError, match="already stored"):
        store.save_agent_token(HASH_A1, "agent-a", ["*"], H0)


@pytest.mark.parametrize(
    ("token_hash", "agent_id", "scope", "message"),
    [
        ("A1" * 32, "agent-a", ["*"], "64 lowercase hex"),
        ("a1" * 31, "agent-a", ["*"], "64 lowercase hex"),
        (HASH_A1, "", ["*"], "agent_id must not be empty"),
        (HASH_A1, "agent-a", [], "at least one resource id"),
        (HASH_A1, "agent-a", ["*", "srv-1"], "cannot be combined"),
        (HASH_A1, "agent-a", [""], "non-empty strings"),
        (HASH_A1, "agent-a", "srv-1", "not the string"),
    ],
)
def test_bad_agent_tokens_are_refused(
    store: Store, token_hash: str, agent_id: str, scope: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.save_agent_token(token_hash, agent_id, scope, H0)
    with pytest.raises(ValueError, match="naive"):
        store.save_agent_token(HASH_A1, "agent-a", ["*"], datetime(2026, 1, 1))  # noqa: DTZ001
    assert store.active_agent_tokens() == []


# -- resource spans -------------------------------------------------------------------------


def spans(*rows: tuple[str, str, str, datetime, datetime | None]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=SPANS_SCHEMA, orient="row")


def test_resource_spans_are_upserted_and_read_by_overlap(store: Store) -> None:
    written = store.write_resource_spans(
        spans(
            ("srv-2", "sub-1", "vps-s", hour(0), None),
            ("srv-1", "sub-1", "vps-s", hour(-48), hour(2)),
            ("srv-1", "sub-2", "vps-m", hour(2), None),
            ("srv-3", "sub-3", "vps-s", hour(5), hour(6)),
        )
    )
    assert written == 4
    # Closing a span is writing it again with its end; the plan may be corrected too.
    assert store.write_resource_spans(spans(("srv-2", "sub-1", "vps-l", hour(0), hour(3)))) == 1

    frame = store.resource_spans(hour(2), hour(4))
    assert frame.schema == pl.Schema(SPANS_SCHEMA)
    assert frame.rows() == [
        ("srv-1", "sub-2", "vps-m", hour(2), None),  # [h-48, h2) ends where the range starts
        ("srv-2", "sub-1", "vps-l", hour(0), hour(3)),
    ]
    assert store.resource_spans(*EVER, ["srv-1", "nobody"])["span_start"].to_list() == [
        hour(-48),
        hour(2),
    ]
    assert store.resource_spans(hour(6), hour(7), ["srv-3"]).is_empty()
    assert store.resource_spans(*EVER, []).is_empty()
    assert store.write_resource_spans(spans()) == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            spans(("srv-1", "sub-1", "p", hour(1), hour(1))),
            r"ending at or before their start .*'srv-1'",
        ),
        (
            spans(("srv-1", "sub-1", "p", hour(1), None), ("srv-1", "sub-2", "p", hour(1), None)),
            r"different rows for the same \(resource_id, span_start\)",
        ),
        (
            spans(("srv-1", "sub-1", "p", hour(1), None)).with_columns(
                plan_id=pl.lit(None, pl.String())
            ),
            r"column 'plan_id' has 1 null",
        ),
        (spans().drop("span_end"), r"missing columns \['span_end'\]"),
    ],
)
def test_bad_resource_spans_are_refused(store: Store, bad: pl.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.write_resource_spans(bad)
    assert store.resource_spans(*EVER).is_empty()


# -- PostgreSQL without TimescaleDB: native monthly partitions -------------------------------


def _partitions(conn: psycopg.Connection[Any], table: str) -> dict[str, int]:
    """Each partition of ``table`` (by name) with how many rows it holds."""
    names = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass ORDER BY 1",
        (table,),
    ).fetchall()
    counts: dict[str, int] = {}
    for (name,) in names:
        row = conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()
        assert row is not None
        counts[name] = int(row[0])
    return counts


def test_pg_partitions_by_month_are_created_on_demand(pg_store: PgStore, pg_url: str) -> None:
    assert pg_store.layout() == "partitioned"
    october_end = datetime(2026, 10, 31, 23, tzinfo=UTC)
    november = datetime(2026, 11, 1, tzinfo=UTC)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        partitioned = admin.execute(
            "SELECT partrelid::regclass::text, partstrat FROM pg_partitioned_table ORDER BY 1"
        ).fetchall()
        assert partitioned == [
            ("resource_spans", "r"),
            ("usage_hourly", "r"),
            ("usage_sources", "r"),
        ]
        assert _partitions(admin, "usage_hourly") == {"usage_hourly_default": 0}

        pg_store.write_rated(
            ledger(("agent-1", 1), ("agent-1", 2)),
            partials(
                ("agent-1", 1, "sub-1", "cpu", 0, 1, 1, 1),  # 2026-10-01T00Z
                ("agent-1", 2, "sub-1", "cpu", 743, 2, 2, 1),  # 2026-10-31T23Z
                ("agent-1", 2, "sub-1", "cpu", 744, 3, 3, 1),  # 2026-11-01T00Z
            ),
            [],
            RATED_AT,
        )
        assert hour(743) == october_end
        assert hour(744) == november
        assert _partitions(admin, "usage_hourly") == {
            "usage_hourly_default": 0,
            "usage_hourly_p2026_10": 2,
            "usage_hourly_p2026_11": 1,
        }
        assert _partitions(admin, "usage_sources") == {  # one row per hour row (schema 8)
            "usage_sources_default": 0,
            "usage_sources_p2026_10": 2,
            "usage_sources_p2026_11": 1,
        }
        bounds = admin.execute(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class "
            "WHERE relname = 'usage_hourly_p2026_11'"
        ).fetchone()
        assert bounds == (
            "FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-12-01 00:00:00+00')",
        )

        pg_store.write_resource_spans(
            spans(
                ("srv-1", "sub-1", "p", october_end, november),
                ("srv-1", "sub-1", "p", november, None),
            )
        )
        assert _partitions(admin, "resource_spans") == {
            "resource_spans_default": 0,
            "resource_spans_p2026_10": 1,
            "resource_spans_p2026_11": 1,
        }

        # The DEFAULT partition is the safety net for a writer that did not ask for its
        # month (here: raw SQL); the next write of that month moves those rows out.
        december = datetime(2026, 12, 5, tzinfo=UTC)
        admin.execute(
            "INSERT INTO usage_hourly VALUES ('sub-9', 'cpu', %s, 5, 5, 1, %s)",
            (december, RATED_AT),
        )
        assert _partitions(admin, "usage_hourly")["usage_hourly_default"] == 1
        pg_store.write_rated(
            ledger(("agent-1", 3)),
            partials(("agent-1", 3, "sub-9", "cpu", 24 * 65, 1, 1, 1)),  # 2026-12-05T00Z
            [],
            RATED_AT,
        )
        assert _partitions(admin, "usage_hourly") == {
            "usage_hourly_default": 0,
            "usage_hourly_p2026_10": 2,
            "usage_hourly_p2026_11": 1,
            "usage_hourly_p2026_12": 1,
        }
    assert hourly(pg_store)[-1] == ("sub-9", "cpu", december, 6, 5, 2)
    with pytest.raises(RuntimeError, match="needs TimescaleDB"):
        pg_store.set_usage_retention(timedelta(days=400))


def test_pg_usage_partitions_leave_room_for_hot_updates(pg_store: PgStore, pg_url: str) -> None:
    """Schema 7: every usage_hourly partition, the DEFAULT one and those created on demand,
    has fillfactor 70 (resource_spans keeps full pages: its rows are rarely updated)."""
    pg_store.write_rated(
        ledger(("agent-1", 1)),
        partials(("agent-1", 1, "sub-1", "cpu", 24 * 70, 1, 1, 1)),  # 2026-12-10
        [],
        RATED_AT,
    )
    pg_store.write_resource_spans(spans(("srv-1", "sub-1", "p", hour(0), None)))
    with psycopg.connect(pg_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT p.inhparent::regclass::text, c.relname, c.reloptions FROM pg_inherits AS p "
            "JOIN pg_class AS c ON c.oid = p.inhrelid "
            "WHERE p.inhparent IN ('usage_hourly'::regclass, 'resource_spans'::regclass)"
        ).fetchall()
    options = {name: (parent, reloptions) for parent, name, reloptions in rows}
    assert options["usage_hourly_p2026_12"] == ("usage_hourly", ["fillfactor=70"])
    assert options["usage_hourly_default"] == ("usage_hourly", ["fillfactor=70"])
    assert options["resource_spans_p2026_10"] == ("resource_spans", None)


def test_pg_migration_4_moves_existing_usage_into_month_partitions(pg_url: str) -> None:
    """A database at version 3 with usage in two months: version 4 partitions it, rows kept."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute(migrations.SCHEMA_MIGRATIONS_DDL)
        for migration in migrations.discover("postgresql")[:3]:
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (%s, %s, now())",
                    (migration.version, migration.name),
                )
        conn.execute(
            "INSERT INTO usage_hourly VALUES ('sub-1', 'cpu', %s, 7, 7, 1, %s), "
            "('sub-1', 'cpu', %s, 8, 8, 1, %s)",
            (hour(0), RATED_AT, hour(744), RATED_AT),
        )
        store = PgStore(pg_url)
        try:
            assert store.migrate() == [m.version for m in migrations.discover("postgresql")[3:]]
            assert store.layout() == "partitioned"
            assert hourly(store) == [
                ("sub-1", "cpu", hour(0), 7, 7, 1),
                ("sub-1", "cpu", hour(744), 8, 8, 1),
            ]
        finally:
            store.close()
        assert _partitions(conn, "usage_hourly") == {
            "usage_hourly_default": 0,
            "usage_hourly_p2026_10": 1,
            "usage_hourly_p2026_11": 1,
        }
        indexes = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index "
            "WHERE indrelid = 'usage_hourly'::regclass ORDER BY 1"
        ).fetchall()
        assert indexes == [("usage_hourly_hour_start_idx",), ("usage_hourly_pkey",)]


# -- re-rating and late usage (issue 3, items 4 and 7) ----------------------------------------


def test_usage_changed_since_lists_the_hours_touched_after_an_instant(store: Store) -> None:
    later = RATED_AT + timedelta(days=3)
    store.write_rated(ledger(("a", 1)), partials(("a", 1, "s1", "m", 0, 5, 5, 1)), [], RATED_AT)
    store.write_rated(
        ledger(("a", 2)),
        partials(("a", 2, "s1", "m", 0, 1, 1, 1), ("a", 2, "s2", "m", 3, 7, 7, 1)),
        [],
        later,
    )
    # A duplicate delivered even later touches nothing.
    store.write_rated(
        ledger(("a", 1)), partials(("a", 1, "s1", "m", 0, 5, 5, 1)), [], later + timedelta(1)
    )

    changed = store.usage_changed_since(RATED_AT)

    assert changed.schema == pl.Schema(CHANGED_SCHEMA)
    assert changed.rows() == [("s1", "m", hour(0), later), ("s2", "m", hour(3), later)]
    assert store.usage_changed_since(later).is_empty()
    assert store.usage_changed_since(RATED_AT - timedelta(seconds=1)).height == 2
    with pytest.raises(ValueError, match="naive"):
        store.usage_changed_since(datetime(2026, 10, 1))  # noqa: DTZ001


def _batches(*keys: tuple[str, int]) -> pl.DataFrame:
    return pl.DataFrame(list(keys), schema=BATCH_KEY_SCHEMA, orient="row")


@pytest.fixture
def rated_twice(store: Store) -> Store:
    """Batches (a, 1) and (a, 2) counted into hours 0..2 of s1 (and hour 5, outside the
    re-rated range)."""
    store.write_rated(
        ledger(("a", 1), ("a", 2)),
        partials(
            ("a", 1, "s1", "m", 0, 10, 10, 1),
            ("a", 1, "s1", "m", 1, 20, 20, 1),
            ("a", 2, "s1", "m", 1, 5, 5, 1),
            ("a", 2, "s1", "m", 2, 6, 6, 1),
            ("a", 2, "s1", "m", 5, 9, 9, 1),
        ),
        [],
        RATED_AT,
    )
    return store


def test_replace_hourly_replaces_the_hours_and_keeps_the_ledger(rated_twice: Store) -> None:
    store = rated_twice
    applied_at = RATED_AT + timedelta(days=1)
    # The re-rating: (a, 1)'s hour 1 moved to s2; hour 2 of (a, 2) unchanged; hour 0 the same.
    new = partials(
        ("a", 1, "s1", "m", 0, 10, 10, 1),
        ("a", 1, "s2", "m", 1, 20, 20, 1),
        ("a", 2, "s1", "m", 1, 5, 5, 1),
        ("a", 2, "s1", "m", 2, 6, 6, 1),
    )

    changed = store.replace_hourly(hour(0), hour(3), new, _batches(("a", 1), ("a", 2)), applied_at)

    assert changed == 2  # s1 hour 1 updated (25 -> 5), s2 hour 1 inserted
    assert hourly(store) == [
        ("s1", "m", hour(0), 10, 10, 1),
        ("s1", "m", hour(1), 5, 5, 1),
        ("s1", "m", hour(2), 6, 6, 1),
        ("s1", "m", hour(5), 9, 9, 1),
        ("s2", "m", hour(1), 20, 20, 1),
    ]
    assert store.usage_changed_since(RATED_AT).select("subscription_id", "hour_start").rows() == [
        ("s1", hour(1)),
        ("s2", hour(1)),
    ]
    assert store.ledger_count() == 2
    assert store.usage_batches("s2", "m", *EVER)["seq"].to_list() == [1]
    assert store.usage_batches("s1", "m", hour(1), hour(2))["seq"].to_list() == [2]
    # A batch redelivered after the re-rating is still a duplicate: nothing changes.
    again = store.write_rated(
        ledger(("a", 1)), partials(("a", 1, "s1", "m", 1, 20, 20, 1)), [], applied_at
    )
    assert (again.new_batches, again.duplicate_batches) == (0, 1)
    assert ("s1", "m", hour(1), 5, 5, 1) in hourly(store)
    # The same re-rating again changes nothing; an empty one deletes the range.
    assert (
        store.replace_hourly(hour(0), hour(3), new, _batches(("a", 1), ("a", 2)), applied_at) == 0
    )
    assert store.replace_hourly(hour(0), hour(1), partials(), _batches(("a", 1)), applied_at) == 1
    assert hourly(store)[0][:3] == ("s1", "m", hour(1))


def test_replace_hourly_refuses_a_re_rating_that_misses_or_adds_batches(
    rated_twice: Store,
) -> None:
    store = rated_twice
    before = hourly(store)
    only_first = partials(("a", 1, "s1", "m", 0, 99, 99, 1))
    with pytest.raises(ReplaceConflictError, match=r"1 batch\(es\) counted .*\('a', 2\)"):
        store.replace_hourly(hour(0), hour(3), only_first, _batches(("a", 1)), RATED_AT)
    with pytest.raises(ReplaceConflictError, match=r"not counted yet.*\('b', 7\)"):
        store.replace_hourly(
            hour(0), hour(3), only_first, _batches(("a", 1), ("a", 2), ("b", 7)), RATED_AT
        )
    assert hourly(store) == before
    assert store.usage_changed_since(RATED_AT).is_empty()


@pytest.mark.parametrize(
    ("start", "end", "rows", "message"),
    [
        (hour(0), hour(1), [("a", 1, "s1", "m", 1, 1, 1, 1)], "not a whole hour of"),
        (hour(0) + timedelta(minutes=1), hour(2), [], "not on a whole UTC hour"),
        (hour(2), hour(2), [], "empty range"),
        (hour(0), hour(2), [("z", 1, "s1", "m", 1, 1, 1, 1)], "missing from the batches"),
    ],
)
def test_replace_hourly_refuses_bad_input(
    rated_twice: Store, start: datetime, end: datetime, rows: list[Part], message: str
) -> None:
    before = hourly(rated_twice)
    with pytest.raises(ValueError, match=message):
        rated_twice.replace_hourly(start, end, partials(*rows), _batches(("a", 1)), RATED_AT)
    assert hourly(rated_twice) == before


# -- provenance: usage_sources (schema 6) and legacy batch_usage rows ---------------------------


def _sources(store: Store, sub: str, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
    """usage_batches as (agent_id, seq, offset, hours), in its order."""
    frame = store.usage_batches(sub, "m", start, end)
    assert frame.schema == pl.Schema(SOURCE_BATCH_SCHEMA)
    return frame.select("agent_id", "seq", "offset", "hours").rows()


def test_usage_batches_lists_every_batch_of_hour_rows_written_by_several_calls(
    store: Store,
) -> None:
    store.write_rated(
        ledger(("a", 1), ("a", 2)),
        partials(
            ("a", 1, "s1", "m", 0, 1, 1, 1),
            ("a", 1, "s1", "m", 1, 1, 1, 1),
            ("a", 1, "s1", "m", 2, 1, 1, 1),
            ("a", 2, "s1", "m", 0, 1, 1, 1),
        ),
        [],
        RATED_AT,
    )
    # A second call adds two more batches to the same hour rows (and to another subscription).
    store.write_rated(
        ledger(("b", 1), ("a", 3), first_offset=2),
        partials(
            ("b", 1, "s1", "m", 0, 2, 2, 1),
            ("b", 1, "s1", "m", 1, 2, 2, 1),
            ("a", 3, "s1", "m", 2, 3, 3, 1),
            ("a", 3, "s2", "m", 3, 3, 3, 1),
        ),
        [],
        RATED_AT,
    )

    assert _sources(store, "s1", hour(0), hour(3)) == [
        ("a", 1, 0, 3),
        ("a", 2, 1, 1),
        ("b", 1, 2, 2),
        ("a", 3, 3, 1),
    ]
    assert _sources(store, "s1", hour(1), hour(2)) == [("a", 1, 0, 1), ("b", 1, 2, 1)]
    assert _sources(store, "s2", *EVER) == [("a", 3, 3, 1)]
    assert _sources(store, "s1", hour(3), hour(9)) == []
    assert store.usage_batches("s1", "other", *EVER).is_empty()
    row = store.usage_batches("s1", "m", hour(0), hour(1)).row(0, named=True)
    assert (row["topic"], row["partition"], row["received_at"]) == (TOPIC, 0, H0)


def test_duplicate_batches_add_no_sources(store: Store) -> None:
    # Within one call: a batch delivered twice, with its partial rows twice.
    first = partials(("a", 1, "s1", "m", 0, 5, 5, 1), ("a", 1, "s1", "m", 1, 6, 6, 1))
    store.write_rated(
        pl.concat([ledger(("a", 1)), ledger(("a", 1))]),
        pl.concat([first, first]),
        [],
        RATED_AT,
    )
    assert _sources(store, "s1", *EVER) == [("a", 1, 0, 2)]
    # Among calls: the same batch again, with a new one on the same hour rows.
    outcome = store.write_rated(
        ledger(("a", 1), ("a", 2)),
        pl.concat([first, partials(("a", 2, "s1", "m", 0, 7, 7, 1))]),
        [],
        RATED_AT,
    )
    assert (outcome.new_batches, outcome.duplicate_batches) == (1, 1)
    # Only duplicates: nothing new to record at all.
    store.write_rated(ledger(("a", 2), ("a", 1)), first, [], RATED_AT)
    assert _sources(store, "s1", *EVER) == [("a", 1, 0, 2), ("a", 2, 1, 1)]
    assert hourly(store) == [("s1", "m", hour(0), 12, 7, 2), ("s1", "m", hour(1), 6, 6, 1)]


def test_an_hour_row_left_unsummed_for_the_database_has_its_sources_once(store: Store) -> None:
    # rows x largest quantity may pass 38 digits, so the client leaves hour 0 unsummed (the
    # database's exact sum then adds it up, and it fits): still one source per batch and hour.
    big = MAX_QUANTITY // 2 + 1
    store.write_rated(
        ledger(("a", 1), ("b", 1), ("c", 1)),
        partials(
            ("a", 1, "s1", "m", 0, big, big, 1),
            ("b", 1, "s1", "m", 0, 1, 1, 1),
            ("c", 1, "s1", "m", 0, 2, 2, 1),
            ("a", 1, "s1", "m", 1, 5, 5, 1),
        ),
        [],
        RATED_AT,
    )
    assert hourly(store) == [("s1", "m", hour(0), big + 3, big, 3), ("s1", "m", hour(1), 5, 5, 1)]
    assert _sources(store, "s1", *EVER) == [("a", 1, 0, 2), ("b", 1, 1, 1), ("c", 1, 2, 1)]


def _run_sql(store_url: str, statements: list[str]) -> None:
    """Statements straight on the store's database (as an older Meterline would write)."""
    if store_url.startswith("duckdb://"):
        conn = duckdb.connect(store_url.removeprefix("duckdb://"))
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()
        return
    with psycopg.connect(store_url, autocommit=True, prepare_threshold=None) as pg:
        for statement in statements:
            pg.execute(statement)


def test_batch_usage_rows_of_version_5_are_still_sources_after_migrating_to_6(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store at version 5 whose batch_usage rows an older Meterline wrote: after version 6
    usage_batches still lists them, and re-rating sees them (and replaces them)."""
    discover = migrations.discover
    with monkeypatch.context() as patched:
        patched.setattr(migrations, "discover", lambda dialect: discover(dialect)[:5])
        old = open_store(store_url)
        try:
            assert old.migrate() == [1, 2, 3, 4, 5]
        finally:
            old.close()
    at = "TIMESTAMPTZ '2026-10-01 00:00:00+00'"
    later = f"{at} + INTERVAL '1 hour'"
    ledger_rows = (
        'INSERT INTO batch_ledger (agent_id, seq, topic, partition, "offset", received_at, '
        f"sample_count, rated_at) VALUES ('old', 1, '{TOPIC}', 0, 0, {at}, 1, {at}), "
        f"('old', 2, '{TOPIC}', 0, 1, {at}, 1, {at})"
    )
    hourly_rows = (
        f"INSERT INTO usage_hourly VALUES ('s1', 'm', {at}, 10, 10, 1, {at}), "
        f"('s1', 'm', {later}, 20, 20, 1, {at})"
    )
    legacy_sources = (
        f"INSERT INTO batch_usage VALUES ('old', 1, 's1', 'm', {at}), "
        f"('old', 1, 's1', 'm', {later}), ('old', 2, 's1', 'm', {later})"
    )
    _run_sql(store_url, [ledger_rows, hourly_rows, legacy_sources])
    store = open_store(store_url)
    try:
        assert store.migrate() == list(range(6, len(discover("postgresql")) + 1))
        store.write_rated(
            ledger(("new", 1), first_offset=2),
            partials(("new", 1, "s1", "m", 1, 1, 1, 1), ("new", 1, "s1", "m", 2, 2, 2, 1)),
            [],
            RATED_AT,
        )
        assert _sources(store, "s1", *EVER) == [
            ("old", 1, 0, 2),
            ("old", 2, 1, 1),
            ("new", 1, 2, 2),
        ]
        assert _sources(store, "s1", hour(0), hour(1)) == [("old", 1, 0, 1)]

        # A re-rating without the legacy batches would lose them: refused.
        rerated = partials(("new", 1, "s1", "m", 1, 1, 1, 1), ("new", 1, "s1", "m", 2, 2, 2, 1))
        with pytest.raises(
            ReplaceConflictError, match=r"2 batch\(es\) counted .*\('old', 1\), \('old', 2\)"
        ):
            store.replace_hourly(hour(0), hour(3), rerated, _batches(("new", 1)), RATED_AT)
        with pytest.raises(ReplaceConflictError, match=r"1 batch\(es\) counted .*\('old', 1\)"):
            store.replace_hourly(hour(0), hour(1), partials(), _batches(("old", 2)), RATED_AT)

        # With them it replaces the hours (same sums: no usage row changes), and their sources
        # with them: (old, 1) now only in hour 0, so its legacy row of hour 1 must be gone.
        everything = _batches(("old", 1), ("old", 2), ("new", 1))
        redone = partials(
            ("old", 1, "s1", "m", 0, 10, 10, 1),
            ("old", 2, "s1", "m", 1, 20, 20, 1),
            ("new", 1, "s1", "m", 1, 1, 1, 1),
            ("new", 1, "s1", "m", 2, 2, 2, 1),
        )
        assert store.replace_hourly(hour(0), hour(3), redone, everything, RATED_AT) == 0
        assert _sources(store, "s1", *EVER) == [
            ("old", 1, 0, 1),
            ("old", 2, 1, 1),
            ("new", 1, 2, 2),
        ]
        # The rewritten sources are checked as before.
        with pytest.raises(ReplaceConflictError, match=r"1 batch\(es\) counted .*\('old', 2\)"):
            store.replace_hourly(hour(1), hour(2), partials(), _batches(("new", 1)), RATED_AT)
        assert store.ledger_count() == 3
    finally:
        store.close()
