"""Invoice documents: canonical JSON, the store mapper and the text summary."""

from __future__ import annotations

import json
from typing import Any

from aggregation.ports import UsageTotal
from invoicer.close import rate_account_period
from invoicer.documents import (
    SCHEMA,
    invoice_to_json,
    invoices_to_text,
    to_stored_invoice,
)
from invoicer.invoice import Invoice
from invoicer.periods import calendar_month
from invoicer.taxes import REVERSE_CHARGE_NOTE
from rating.catalog import Subscription
from tests.golden.builders import ACME, EGRESS, backup, catalog, server, utc, vps_s
from tests.golden.casefiles import load_case, rate_case

OCTOBER = calendar_month(2026, 10, "Europe/Berlin")
CATALOG = catalog(
    plans=[vps_s(), backup()],
    accounts=[ACME],
    subscriptions=[
        Subscription("acme-vps", "acme", "vps-s", utc(2026, 9, 1)),
        Subscription("acme-backup", "acme", "backup", utc(2026, 10, 10, 22)),
    ],
    resources=[
        server("srv-1", "acme-vps", (utc(2026, 10, 3, 10, 20), utc(2026, 10, 5, 8, 10))),
        server("srv-2", "acme-vps", (utc(2026, 9, 1), None)),
    ],
)
INVOICE = rate_account_period(
    CATALOG, "acme", OCTOBER, [UsageTotal("acme-vps", EGRESS.name, 12_345_678_901_234, 1, 1)]
)


def _no_floats(value: Any) -> None:
    assert not isinstance(value, float)
    if isinstance(value, dict):
        for item in value.values():
            _no_floats(item)
    elif isinstance(value, list):
        for item in value:
            _no_floats(item)


def test_the_document_is_canonical_json_without_floats() -> None:
    text = invoice_to_json(INVOICE)
    doc = json.loads(text)

    assert text == json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False)
    _no_floats(doc)
    assert doc["schema"] == SCHEMA
    assert doc["period"] == {
        "start": "2026-09-30T22:00:00Z",
        "end": "2026-10-31T23:00:00Z",
        "timezone": "Europe/Berlin",
        "local_start": "2026-10-01",
        "local_end": "2026-11-01",
        "seconds": 745 * 3600,
    }
    assert (doc["subtotal_minor"], doc["total_minor"], doc["total"]) == (12606, 12606, "126.06")


def test_a_line_carries_what_section_11_asks_for() -> None:
    doc = json.loads(invoice_to_json(INVOICE))
    h1 = next(line for line in doc["lines"] if line["key"].endswith("/hourly/srv-1"))

    assert h1 == {
        "key": "acme/2026-10-01/acme-vps/hourly/srv-1",
        "kind": "hourly",
        "description": "VPS S: server srv-1, 46 started hours",
        "service_period": {"start": "2026-09-30T22:00:00Z", "end": "2026-10-31T23:00:00Z"},
        "quantity": "46",
        "unit": "hour",
        "unit_price": "0.007",
        "amount_precise": "0.322",
        "amount_minor": 32,
        "amount": "0.32",
        "currency": "EUR",
        "usage_quantity": None,
        "included_quantity": None,
        "excluded_quantity": None,
        "cap": None,
        "tier": None,
        "applies_to": None,
        "tax_rate": None,
        "jurisdiction": None,
        "refs": {
            "account_id": None,
            "subscription_id": "acme-vps",
            "plan_id": "vps-s",
            "meter": None,
            "resource_id": "srv-1",
        },
    }


def test_the_stored_invoice_holds_the_document_and_the_utc_period() -> None:
    stored = to_stored_invoice(INVOICE)

    assert stored.key == "acme/2026-10-01"
    assert (stored.period_start, stored.period_end) == (OCTOBER.start, OCTOBER.end)
    assert (stored.currency, stored.status, stored.total_minor) == ("EUR", "draft", 12606)
    assert stored.document == invoice_to_json(INVOICE)


def test_the_text_summary_lists_every_line_and_the_total() -> None:
    text = invoices_to_text([INVOICE])

    assert text.splitlines()[0] == "Invoice acme/2026-10-01 (draft) - ACME GmbH, EUR"
    for line in INVOICE.lines:
        assert line.description in text
    assert text.splitlines()[-1].split() == ["Total", "EUR", "126.06"]
    assert all(row == row.rstrip() for row in text.splitlines())


def test_the_text_summary_of_nothing_says_so() -> None:
    assert invoices_to_text([]) == "No invoices."


def _golden(name: str) -> Invoice:
    return rate_case(load_case(name))


def test_tier_tax_rate_jurisdiction_applies_to_and_notes_are_rendered() -> None:
    tiered = json.loads(invoice_to_json(_golden("u1-graduated")))
    assert [line["tier"] for line in tiered["lines"]] == [1, 2]
    taxed = json.loads(invoice_to_json(_golden("t-tax-line-level")))
    tax = [line for line in taxed["lines"] if line["kind"] == "tax"]
    assert tax
    assert all(line["applies_to"] and line["tax_rate"] for line in tax)
    assert taxed["tax_minor"] == sum(line["amount_minor"] for line in tax)
    reverse = _golden("t-reverse-charge-with-discount")
    document = json.loads(invoice_to_json(reverse))
    assert document["notes"] == [REVERSE_CHARGE_NOTE]
    discount = next(line for line in document["lines"] if line["kind"] == "discount")
    assert discount["applies_to"] == "fr-sarl/2026-10-26/fr-backup/recurring"


def test_the_text_lists_tax_after_the_subtotal_and_prints_the_notes() -> None:
    rows = invoices_to_text([_golden("t-reverse-charge-with-discount")]).splitlines()
    subtotal = next(i for i, row in enumerate(rows) if row.split()[:1] == ["Subtotal"])
    tax = next(i for i, row in enumerate(rows) if row.strip().startswith("tax"))
    total = next(i for i, row in enumerate(rows) if row.split()[:1] == ["Total"])
    assert subtotal < tax < total
    assert rows[subtotal].split()[-1] == "10.50"
    assert rows[-1] == f"  Note: {REVERSE_CHARGE_NOTE}"
    assert "0 % on 10.50 EUR" in rows[tax + 1]
    assert "on fr-sarl/2026-10-26/fr-backup/recurring" in "\n".join(rows)
    tiers = invoices_to_text([_golden("u1-graduated")])
    assert "; tier 1" in tiers
    assert "; tier 2" in tiers
