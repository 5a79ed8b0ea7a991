"""Period close (BILLING-SEMANTICS §10): grace, refusal, idempotence, one draft per account.

The close service runs against the real embedded store (DuckDB in memory), not a fake.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from aggregation.factory import open_store
from aggregation.ports import Store, UsageTotal
from invoicer.close import (
    PeriodNotClosableError,
    closable_at,
    close_period,
    rate_account_period,
)
from invoicer.lines import ChargeConfigurationError
from invoicer.periods import PeriodError, calendar_month
from rating.catalog import Account, Catalog, Subscription
from tests.golden.builders import ACME, EGRESS, backup, catalog, server, utc, vps_s
from tests.golden.casefiles import UsageRow, write_usage

GLOBEX = Account("globex", "Globex Corp.", "EUR", "America/New_York")
IDLE = Account("idle", "Idle Ltd", "EUR", "UTC")
OCTOBER_BERLIN = calendar_month(2026, 10, "Europe/Berlin")
OCTOBER_NY = calendar_month(2026, 10, "America/New_York")


def two_accounts() -> Catalog:
    return catalog(
        plans=[vps_s(), backup()],
        accounts=[ACME, GLOBEX, IDLE],
        subscriptions=[
            Subscription("acme-vps", "acme", "vps-s", utc(2026, 9, 1)),
            Subscription("acme-backup", "acme", "backup", utc(2026, 10, 10, 22)),
            Subscription("globex-backup", "globex", "backup", utc(2026, 1, 1)),
        ],
        resources=[
            server("srv-1", "acme-vps", (utc(2026, 10, 3, 10, 20), utc(2026, 10, 5, 8, 10)))
        ],
    )


CATALOG = two_accounts()
USAGE = [
    UsageRow("acme-vps", EGRESS.name, utc(2026, 10, 2, 9), 12_345_678_901_234, 1, 1),
    UsageRow("acme-vps", EGRESS.name, utc(2026, 11, 2, 9), 999 * 10**9, 1, 1),  # November
]


@pytest.fixture
def store() -> Iterator[Store]:
    s = open_store("duckdb::memory:")
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def test_rate_account_period_builds_the_lines_of_every_subscription() -> None:
    totals = [UsageTotal("acme-vps", EGRESS.name, 12_345_678_901_234, 1, 1)]

    invoice = rate_account_period(CATALOG, "acme", OCTOBER_BERLIN, totals)

    assert invoice.key == "acme/2026-10-01"
    assert [(line.key, line.amount_minor) for line in invoice.lines] == [
        ("acme/2026-10-01/acme-backup/recurring", 813),
        ("acme/2026-10-01/acme-vps/hourly/srv-1", 32),
        ("acme/2026-10-01/acme-vps/usage/net.egress.bytes", 11346),
    ]
    assert invoice.subtotal_minor == invoice.total_minor == 813 + 32 + 11346
    assert invoice.status == "draft"


def test_usage_of_other_accounts_and_of_unpriced_meters_is_not_on_the_invoice() -> None:
    totals = [
        UsageTotal("globex-backup", EGRESS.name, 10**15, 1, 1),
        UsageTotal("acme-vps", "cpu.usage.millicpu_seconds", 10**9, 1, 1),
    ]

    invoice = rate_account_period(CATALOG, "acme", OCTOBER_BERLIN, totals)

    assert all(line.kind.value != "usage" for line in invoice.lines)


def test_the_same_usage_total_given_twice_is_refused() -> None:
    totals = [UsageTotal("acme-vps", EGRESS.name, 1, 1, 1)] * 2

    with pytest.raises(ValueError, match=r"'acme-vps', meter 'net\.egress\.bytes' given twice"):
        rate_account_period(CATALOG, "acme", OCTOBER_BERLIN, totals)


def test_usage_of_a_subscription_not_active_in_the_period_is_billed_not_lost() -> None:
    ended = catalog(
        plans=[vps_s()],
        accounts=[ACME],
        subscriptions=[Subscription("old", "acme", "vps-s", utc(2026, 1, 1), utc(2026, 9, 1))],
    )
    totals = [UsageTotal("old", EGRESS.name, 3 * 10**12, 1, 1)]

    (line,) = rate_account_period(ended, "acme", OCTOBER_BERLIN, totals).lines

    assert (line.service_start, line.service_end) == (OCTOBER_BERLIN.start, OCTOBER_BERLIN.end)
    assert line.included_quantity == 0  # no active time, no allowance
    assert line.amount_minor == 3000


def test_an_unknown_plan_or_account_is_named() -> None:
    broken = catalog(
        accounts=[ACME], subscriptions=[Subscription("s", "acme", "gone", utc(2026, 1, 1))]
    )
    with pytest.raises(ChargeConfigurationError, match="unknown plan 'gone'"):
        rate_account_period(broken, "acme", OCTOBER_BERLIN, [])
    with pytest.raises(ChargeConfigurationError, match="unknown account 'nobody'"):
        rate_account_period(broken, "nobody", OCTOBER_BERLIN, [])


def test_closable_at_is_period_end_plus_the_largest_grace() -> None:
    slow = replace(EGRESS, grace=timedelta(hours=6))

    assert closable_at(CATALOG, "acme", OCTOBER_BERLIN) == utc(2026, 11, 1, 1)
    assert closable_at(CATALOG, "globex", OCTOBER_NY) == utc(2026, 11, 1, 6)
    with_slow_meter = replace(CATALOG, meters={slow.name: slow})
    assert closable_at(with_slow_meter, "acme", OCTOBER_BERLIN) == utc(2026, 11, 1, 5)


def test_close_refuses_before_every_period_has_passed_its_grace_and_changes_nothing(
    store: Store,
) -> None:
    write_usage(store, USAGE, rated_at=utc(2026, 11, 1))
    now = utc(2026, 11, 1, 2)  # past acme's 01:00Z, before globex's 06:00Z (New York)

    with pytest.raises(PeriodNotClosableError) as excinfo:
        close_period(store, CATALOG, 2026, 10, now)

    message = str(excinfo.value)
    assert "period 2026-10 cannot be closed yet at 2026-11-01T02:00:00Z" in message
    assert "globex closable from 2026-11-01T06:00:00Z" in message
    assert "grace 2 h" in message
    assert "acme closable" not in message
    assert [p[0] for p in excinfo.value.pending] == ["globex"]
    assert store.load_invoices() == []


def test_close_saves_one_draft_per_account_with_business_in_its_own_period(store: Store) -> None:
    write_usage(store, USAGE, rated_at=utc(2026, 11, 1))

    result = close_period(store, CATALOG, 2026, 10, utc(2026, 11, 1, 6))

    saved = store.load_invoices()
    assert [s.key for s in saved] == ["acme/2026-10-01", "globex/2026-10-01"]  # idle: no draft
    assert [s.key for s in result.stored] == [s.key for s in saved]
    acme, globex = saved
    assert (acme.period_start, acme.period_end) == (OCTOBER_BERLIN.start, OCTOBER_BERLIN.end)
    assert (globex.period_start, globex.period_end) == (OCTOBER_NY.start, OCTOBER_NY.end)
    assert acme.total_minor == 813 + 32 + 11346  # November's usage is not in October
    assert globex.total_minor == 1200
    assert all(s.status == "draft" for s in saved)
    assert acme.document == result.stored[0].document


def test_closing_twice_saves_the_same_bytes(store: Store) -> None:
    write_usage(store, USAGE, rated_at=utc(2026, 11, 1))

    first = close_period(store, CATALOG, 2026, 10, utc(2026, 11, 2))
    second = close_period(store, CATALOG, 2026, 10, utc(2026, 12, 24, 13, 37))

    assert [s.document for s in first.stored] == [s.document for s in second.stored]
    assert [s.document for s in store.load_invoices()] == [s.document for s in first.stored]


def test_close_refuses_a_naive_clock(store: Store) -> None:
    with pytest.raises(PeriodError, match="naive"):
        close_period(store, CATALOG, 2026, 10, datetime(2026, 12, 1))  # noqa: DTZ001
