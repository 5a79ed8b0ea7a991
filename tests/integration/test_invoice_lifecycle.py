"""The invoice lifecycle on both stores: close -> issue (gapless numbers, frozen) -> late usage
-> adjustment drafts (and credit notes), with the invoice.issued event in the outbox.

Given ACME (Europe/Berlin) of tests/e2e/catalog.yaml with 500 GB of October egress (inside
the 1,000 GB allowance), when October is closed and issued and 800 GB more of October
arrive late, then the next close drafts `acme/2026-10-01/adj-1` with one adjustment line of
(1,300 - 1,000) GB x 0.0100 = 3.00 for October's service period: the whole period re-rated
minus what was invoiced, never the late part priced on its own.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

from aggregation.pg_store import PgStore
from aggregation.ports import (
    LEDGER_SCHEMA,
    PARTIALS_SCHEMA,
    IssuedInvoiceError,
    IssueRendering,
    Store,
    StoredInvoice,
)
from invoicer.close import close_period
from invoicer.issue import issue_invoices, render_issued
from rating.catalog import Catalog
from rating.catalog_file import read_catalog_file

pytestmark = pytest.mark.integration

CATALOG_FILE = Path(__file__).parents[1] / "e2e" / "catalog.yaml"
OCT_CLOSE = datetime(2026, 11, 1, 3, tzinfo=UTC)  # Berlin's October ended 23:00Z; grace 2 h
NOV_CLOSE = datetime(2026, 12, 1, 3, tzinfo=UTC)
ISSUED_AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
GB = 10**9
KEY = "acme/2026-10-01"
USAGE_LINE = "acme/2026-10-01/acme-vps/usage/net.egress.bytes"


def catalog(tmp_path: Path, unit_price: str = "0.0100") -> Catalog:
    text = CATALOG_FILE.read_text().replace(
        'unit_price: {EUR: "0.0100"}', f'unit_price: {{EUR: "{unit_price}"}}'
    )
    path = tmp_path / f"catalog-{unit_price}.yaml"
    path.write_text(text)
    return read_catalog_file(path).catalog


def write_usage(
    store: Store, agent: str, seq: int, hour: datetime, quantity: int, sub: str = "acme-vps"
) -> None:
    """One new batch of `quantity` egress bytes for subscription `sub` in `hour`."""
    ledger = pl.DataFrame(
        [(agent, seq, "usage.samples.v1", 0, seq, hour, 1)], schema=LEDGER_SCHEMA, orient="row"
    )
    partials = pl.DataFrame(
        [
            (
                agent,
                seq,
                sub,
                "net.egress.bytes",
                hour,
                Decimal(quantity),
                Decimal(quantity),
                1,
            )
        ],
        schema=PARTIALS_SCHEMA,
        orient="row",
    )
    outcome = store.write_rated(ledger, partials, [], hour + timedelta(hours=1))
    assert outcome.new_batches == 1


def document(store: Store, key: str) -> dict[str, Any]:
    stored = store.load_invoice(key)
    assert stored is not None
    loaded = json.loads(stored.document)
    assert isinstance(loaded, dict)
    return loaded


def lines(store: Store, key: str) -> dict[str, dict[str, Any]]:
    found = document(store, key)["lines"]
    assert isinstance(found, list)
    return {line["key"]: line for line in found}


def test_issue_numbers_freezes_and_queues_the_event(store: Store, tmp_path: Path) -> None:
    cat = catalog(tmp_path)
    write_usage(store, "agent-a", 1, datetime(2026, 10, 10, 8, tzinfo=UTC), 500 * GB)
    close_period(store, cat, 2026, 10, OCT_CLOSE)
    draft = store.load_invoice(KEY)
    assert draft is not None
    assert draft.status == "draft"

    result = issue_invoices(store, [KEY], ISSUED_AT)

    (issued,) = result.issued
    doc = document(store, KEY)
    assert (issued.status, doc["status"], doc["number"]) == ("issued", "issued", "ML-2026-000001")
    assert doc["issued_at"] == "2026-11-02T09:30:00Z"
    assert doc["lines"] == json.loads(draft.document)["lines"]  # the lines are as drafted
    assert [(n.invoice_key, n.series, n.seq, n.number) for n in store.invoice_numbers()] == [
        (KEY, "ML-2026", 1, "ML-2026-000001")
    ]
    # Frozen: the store refuses any change, and closing again leaves it as it is.
    with pytest.raises(IssuedInvoiceError):
        store.save_invoices([draft])
    again = close_period(store, cat, 2026, 10, OCT_CLOSE)
    assert again.untouched == (KEY,)
    assert again.stored == ()  # nothing changed since the issue: no adjustment either
    assert store.load_invoice(KEY) == issued
    # Issuing twice is refused before anything is numbered.
    with pytest.raises(ValueError, match="already issued"):
        issue_invoices(store, [KEY], ISSUED_AT)
    assert len(store.invoice_numbers()) == 1

    (event,) = store.pending_billing_events()
    value = json.loads(event.value)
    assert (event.event_id, event.topic, event.key) == (
        "invoice.issued/ML-2026-000001",
        "billing.events.v1",
        "acme",
    )
    assert value["number"] == "ML-2026-000001"
    assert value["account"] == "acme"
    assert value["total_minor"] == doc["total_minor"] == issued.total_minor
    assert value["period"]["start"] == "2026-09-30T22:00:00Z"
    assert value["issued_at"] == "2026-11-02T09:30:00Z"
    assert store.mark_billing_events_published([event.event_id], ISSUED_AT) == 1
    assert store.mark_billing_events_published([event.event_id], ISSUED_AT) == 0
    assert store.pending_billing_events() == []


def test_a_failed_issue_leaves_no_gap_and_no_duplicate(store: Store, tmp_path: Path) -> None:
    close_period(store, catalog(tmp_path), 2026, 10, OCT_CLOSE)
    seen: list[int] = []

    def crash(draft: StoredInvoice, seq: int) -> IssueRendering:
        seen.append(seq)
        raise RuntimeError("crash after the number was taken")

    with pytest.raises(RuntimeError, match="crash"):
        store.issue_invoice(KEY, "ML-2026", ISSUED_AT, crash)
    assert seen == [1]
    stored = store.load_invoice(KEY)
    assert stored is not None
    assert stored.status == "draft"
    assert store.invoice_numbers() == []
    assert store.pending_billing_events() == []

    issue_invoices(store, [KEY], ISSUED_AT)
    assert [n.number for n in store.invoice_numbers()] == ["ML-2026-000001"]
    with pytest.raises(KeyError):
        store.issue_invoice("nobody/2026-10-01", "ML-2026", ISSUED_AT, crash)


def test_late_usage_after_issue_becomes_adjustment_lines(store: Store, tmp_path: Path) -> None:
    cat = catalog(tmp_path)
    write_usage(store, "agent-a", 1, datetime(2026, 10, 10, 8, tzinfo=UTC), 500 * GB)
    close_period(store, cat, 2026, 10, OCT_CLOSE)
    invoiced = lines(store, KEY)[USAGE_LINE]
    assert invoiced["amount_minor"] == 0  # 500 GB, all inside the 1,000 GB allowance
    issue_invoices(store, [KEY], ISSUED_AT)

    # 800 GB of October arrive late, as a new batch.
    write_usage(store, "agent-a", 2, datetime(2026, 10, 30, 20, tzinfo=UTC), 800 * GB)
    result = close_period(store, cat, 2026, 10, OCT_CLOSE + timedelta(days=5))

    assert [s.key for s in result.stored] == [f"{KEY}/adj-1"]
    adjustment = document(store, f"{KEY}/adj-1")
    assert (adjustment["document_type"], adjustment["adjusts"]) == ("adjustment", KEY)
    assert adjustment["status"] == "draft"
    assert adjustment["period"] == document(store, KEY)["period"]
    (line,) = adjustment["lines"]
    assert line["key"] == USAGE_LINE
    assert line["kind"] == "adjustment"
    assert (line["amount_minor"], line["amount"]) == (300, "3.00")  # (1,300 - 1,000) x 0.01
    assert line["quantity"] == "300"  # billable GB added
    assert line["usage_quantity"] == "1300"  # the whole period's usage, re-rated
    assert line["service_period"] == invoiced["service_period"]  # the original service period
    assert adjustment["total_minor"] == 300
    assert store.load_invoice(KEY) is not None
    assert document(store, KEY)["number"] == "ML-2026-000001"  # the issued one is untouched

    # Closing again is idempotent: the same draft, byte for byte.
    before = store.load_invoice(f"{KEY}/adj-1")
    close_period(store, cat, 2026, 10, OCT_CLOSE + timedelta(days=6))
    assert store.load_invoice(f"{KEY}/adj-1") == before

    # Issued, then more late usage: adj-2 carries only what adj-1 did not.
    issue_invoices(store, [f"{KEY}/adj-1"], ISSUED_AT + timedelta(days=6))
    write_usage(store, "agent-b", 1, datetime(2026, 10, 31, 10, tzinfo=UTC), 250 * GB)
    # The next month's close picks it up too (October is within the lookback window).
    november = close_period(store, cat, 2026, 11, NOV_CLOSE)
    assert f"{KEY}/adj-2" in [s.key for s in november.stored]
    assert KEY in november.untouched
    (line2,) = document(store, f"{KEY}/adj-2")["lines"]
    assert (line2["key"], line2["amount_minor"], line2["usage_quantity"]) == (
        USAGE_LINE,
        250,
        "1550",
    )
    assert [n.number for n in store.invoice_numbers()] == ["ML-2026-000001", "ML-2026-000002"]


def test_a_lower_re_rating_drafts_a_credit_note(store: Store, tmp_path: Path) -> None:
    write_usage(store, "agent-a", 1, datetime(2026, 10, 10, 8, tzinfo=UTC), 3000 * GB)
    close_period(store, catalog(tmp_path), 2026, 10, OCT_CLOSE)
    assert lines(store, KEY)[USAGE_LINE]["amount_minor"] == 2000  # 2,000 GB x 0.0100
    issue_invoices(store, [KEY], ISSUED_AT)

    # Contract pricing corrected after issue: 0.0040 per GB.
    close_period(store, catalog(tmp_path, "0.0040"), 2026, 10, OCT_CLOSE + timedelta(days=3))
    credit = document(store, f"{KEY}/adj-1")
    assert credit["document_type"] == "credit_note"
    (line,) = credit["lines"]
    assert (line["key"], line["amount_minor"], line["amount"]) == (USAGE_LINE, -1200, "-12.00")
    assert credit["total_minor"] == -1200

    # The correction is withdrawn before the credit note was issued: the draft goes away.
    again = close_period(store, catalog(tmp_path), 2026, 10, OCT_CLOSE + timedelta(days=4))
    assert again.stored == ()
    assert store.load_invoice(f"{KEY}/adj-1") is None
    assert store.delete_drafts([KEY, "nobody/2026-10-01"]) == 0  # issued and unknown: kept


def test_pg_a_killed_connection_while_issuing_leaves_no_gap(
    pg_url: str, pg_store: PgStore, tmp_path: Path
) -> None:
    close_period(pg_store, catalog(tmp_path), 2026, 10, OCT_CLOSE)
    victim = PgStore(pg_url)
    try:

        def kill_my_backend(draft: StoredInvoice, seq: int) -> IssueRendering:
            # The server loses this session mid-transaction: a real crash of the issuer.
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND state = 'idle in transaction'"
                )
            return render_issued(draft, f"ML-2026-{seq:06d}", ISSUED_AT)

        with pytest.raises(psycopg.OperationalError):
            victim.issue_invoice(KEY, "ML-2026", ISSUED_AT, kill_my_backend)
    finally:
        victim.close()
    stored = pg_store.load_invoice(KEY)
    assert stored is not None
    assert stored.status == "draft"
    issue_invoices(pg_store, [KEY], ISSUED_AT)
    assert [n.number for n in pg_store.invoice_numbers()] == ["ML-2026-000001"]


def test_pg_concurrent_issuers_share_one_gapless_series(pg_url: str, pg_store: PgStore) -> None:
    period = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    keys = [f"acc-{i:02d}/2026-10-01" for i in range(12)]
    pg_store.save_invoices(
        [
            StoredInvoice(
                key,
                key.split("/", maxsplit=1)[0],
                *period,
                "EUR",
                "draft",
                100,
                json.dumps(draft_doc(key)),
            )
            for key in keys
        ]
    )
    errors: list[BaseException] = []

    def issue(my_keys: list[str]) -> None:
        store = PgStore(pg_url)
        try:
            issue_invoices(store, my_keys, ISSUED_AT)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=issue, args=(keys[i::3],)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    numbers = pg_store.invoice_numbers("ML-2026")
    assert [n.seq for n in numbers] == list(range(1, 13))
    assert sorted(n.invoice_key for n in numbers) == keys
    assert len({n.number for n in numbers}) == 12


def draft_doc(key: str) -> dict[str, object]:
    return {
        "key": key,
        "status": "draft",
        "account": {"id": key.split("/", maxsplit=1)[0], "name": "A"},
        "currency": "EUR",
        "period": {
            "start": "2026-10-01T00:00:00Z",
            "end": "2026-11-01T00:00:00Z",
            "local_start": "2026-10-01",
            "local_end": "2026-11-01",
            "timezone": "UTC",
        },
        "lines": [],
        "total_minor": 100,
        "total": "1.00",
    }


def test_usage_batches_name_the_batches_behind_hours(store: Store) -> None:
    h = datetime(2026, 10, 10, 8, tzinfo=UTC)
    write_usage(store, "agent-a", 1, h, 5)
    write_usage(store, "agent-a", 2, h + timedelta(hours=1), 7)
    write_usage(store, "agent-b", 1, h + timedelta(hours=5), 9)
    frame = store.usage_batches("acme-vps", "net.egress.bytes", h, h + timedelta(hours=5))
    assert [
        (r["agent_id"], r["seq"], r["offset"], r["hours"]) for r in frame.iter_rows(named=True)
    ] == [
        ("agent-a", 1, 1, 1),
        ("agent-a", 2, 2, 1),
    ]
    assert store.usage_batches("acme-vps", "cpu", h, h + timedelta(days=1)).height == 0


def test_issued_invoices_ending_after_an_instant(store: Store, tmp_path: Path) -> None:
    close_period(store, catalog(tmp_path), 2026, 10, OCT_CLOSE)
    october_end = datetime(2026, 10, 31, 23, tzinfo=UTC)
    assert [s.key for s in store.load_invoices_ending_after(october_end - timedelta(1))] == [KEY]
    assert store.load_invoices_ending_after(october_end) == []
    assert store.load_invoices_ending_after(october_end - timedelta(1), status="issued") == []
    issue_invoices(store, [KEY], ISSUED_AT)
    (issued,) = store.load_invoices_ending_after(october_end - timedelta(1), status="issued")
    assert issued.key == KEY


GRADUATED = Path(__file__).parents[1] / "golden" / "cases" / "u1-graduated" / "catalog.yaml"


def test_late_usage_across_a_tier_bound_re_rates_the_whole_period(store: Store) -> None:
    """U1's tiers: 1,000 GB included, 9,000 GB at 0.0100, beyond at 0.0050. 9,500 GB are
    invoiced (8,500 billable: 85.00 in tier 1); 2,000 GB more arrive late: the period now has
    10,500 billable GB, so tier 1 grows by 5.00 to its 90.00 and tier 2 appears with
    1,500 GB = 7.50. Pricing the late 2,000 GB alone would have said 20.00."""
    cat = read_catalog_file(GRADUATED).catalog
    write_usage(store, "a", 1, datetime(2026, 10, 5, tzinfo=UTC), 9500 * GB, sub="acme-net")
    close_period(store, cat, 2026, 10, OCT_CLOSE)
    invoiced = {k: v["amount_minor"] for k, v in lines(store, KEY).items()}
    assert sorted(invoiced.values()) == [8500]
    issue_invoices(store, [KEY], ISSUED_AT)

    write_usage(store, "a", 2, datetime(2026, 10, 20, tzinfo=UTC), 2000 * GB, sub="acme-net")
    close_period(store, cat, 2026, 10, OCT_CLOSE + timedelta(days=3))

    adjustment = document(store, f"{KEY}/adj-1")
    amounts = {line["key"]: line["amount_minor"] for line in adjustment["lines"]}
    (tier_1,) = invoiced
    assert amounts.pop(tier_1) == 500
    assert list(amounts.values()) == [750]  # the new tier-2 line
    assert adjustment["total_minor"] == 1250
    assert all(line["kind"] == "adjustment" for line in adjustment["lines"])
