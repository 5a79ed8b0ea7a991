"""CSV and HTML exports, issued documents and adjustment arithmetic (pure, no store)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aggregation.ports import StoredInvoice, UsageTotal
from invoicer.adjustments import adjustment_invoice, base_key, is_adjustment_key
from invoicer.close import rate_account_period
from invoicer.documents import to_stored_invoice
from invoicer.exports import CSV_COLUMNS, parse_document, to_csv, to_html
from invoicer.issue import IssueError, invoice_number, render_issued, series_for
from invoicer.periods import calendar_month
from invoicer.taxes import REVERSE_CHARGE_NOTE
from rating.catalog_file import read_catalog_file

CATALOG = read_catalog_file(Path(__file__).parents[1] / "e2e" / "catalog.yaml").catalog
OCTOBER = calendar_month(2026, 10, "Europe/Berlin")
USAGE_LINE = "acme/2026-10-01/acme-vps/usage/net.egress.bytes"
ISSUED_AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


def stored(gb: int) -> StoredInvoice:
    total = UsageTotal("acme-vps", "net.egress.bytes", gb * 10**9, gb * 10**9, 1)
    return to_stored_invoice(rate_account_period(CATALOG, "acme", OCTOBER, [total]))


def hostile(document: dict[str, Any]) -> dict[str, Any]:
    document["account"]["name"] = '<script>alert("x")</script> & Co'
    document["lines"][0]["description"] = '=HYPERLINK("http://evil")'
    return document


def test_csv_has_stable_columns_one_row_per_line_and_money_as_strings() -> None:
    document = json.loads(stored(1500).document)
    text = to_csv(document)
    assert text == to_csv(json.loads(stored(1500).document))  # deterministic
    assert text.endswith("\r\n")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [r["line_key"] for r in rows] == [line["key"] for line in document["lines"]]
    usage = next(r for r in rows if r["line_key"] == USAGE_LINE)
    assert (usage["amount"], usage["amount_minor"], usage["unit_price"]) == ("5.00", "500", "0.01")
    assert usage["invoice_number"] == ""  # a draft has none
    assert usage["service_start"] == "2026-09-30T22:00:00Z"


def test_csv_neutralises_formulas_but_not_negative_amounts() -> None:
    document = hostile(json.loads(stored(1500).document))
    document["lines"][0]["amount"] = "-1.00"
    rows = list(csv.DictReader(io.StringIO(to_csv(document), newline="")))
    assert rows[0]["description"] == '\'=HYPERLINK("http://evil")'
    assert rows[0]["amount"] == "-1.00"


def test_html_escapes_everything_and_groups_by_subscription() -> None:
    page = to_html(hostile(json.loads(stored(1500).document)))
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co" in page
    for external in ("<link", "src=", "href=", "url(", "@import"):  # no external assets
        assert external not in page
    assert page.index("Subscription acme-backup") < page.index("Subscription acme-vps")
    assert "DRAFT" in page
    assert "<td class='num'>17.60 EUR</td>" in page  # total: 8.13 + 0.32 + 4.15 + 5.00


def test_an_issued_document_carries_number_and_instant_and_only_that_changes() -> None:
    draft = stored(1500)
    rendering = render_issued(draft, "ML-2026-000007", ISSUED_AT)
    before, after = json.loads(draft.document), json.loads(rendering.document)
    assert {k for k in after if after[k] != before.get(k)} == {"status", "number", "issued_at"}
    assert (after["status"], after["number"], after["issued_at"]) == (
        "issued",
        "ML-2026-000007",
        "2026-11-02T09:30:00Z",
    )
    page = to_html(parse_document(rendering.document))
    assert "Invoice ML-2026-000007" in page
    assert "DRAFT" not in page


@pytest.mark.parametrize("issuer", ["", "ml", "ML-X", "1ML", "ABCDEFGHIJKLM"])
def test_bad_issuers_are_refused(issuer: str) -> None:
    with pytest.raises(IssueError, match="issuer"):
        series_for(issuer, ISSUED_AT)


def test_numbers_are_padded_and_series_follow_the_utc_year() -> None:
    assert series_for("ML", datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == "ML-2026"
    assert invoice_number("ML-2027", 1) == "ML-2027-000001"
    assert invoice_number("ML-2027", 1234567) == "ML-2027-1234567"
    with pytest.raises(IssueError):
        invoice_number("ML-2027", 0)


def issued(invoice: StoredInvoice) -> StoredInvoice:
    document = render_issued(invoice, "ML-2026-000001", ISSUED_AT).document
    return StoredInvoice(
        invoice.key,
        invoice.account_id,
        invoice.period_start,
        invoice.period_end,
        invoice.currency,
        "issued",
        invoice.total_minor,
        document,
    )


def test_adjustments_are_differences_of_rounded_lines_per_key() -> None:
    base = issued(stored(1500))  # 500 GB billable: 5.00
    fresh = rate_account_period(
        CATALOG,
        "acme",
        OCTOBER,
        [UsageTotal("acme-vps", "net.egress.bytes", 1_500_456_789_012, 1, 1)],
    )  # 500.456789012 GB billable: 5.00456789012 -> 5.00: no change in cents
    assert adjustment_invoice(base, [], fresh) is None

    fresh = rate_account_period(
        CATALOG, "acme", OCTOBER, [UsageTotal("acme-vps", "net.egress.bytes", 1_501 * 10**9, 1, 1)]
    )
    adjustment = adjustment_invoice(base, [], fresh)
    assert adjustment is not None
    assert adjustment.key == "acme/2026-10-01/adj-1"
    assert [(line.key, line.amount_minor) for line in adjustment.lines] == [(USAGE_LINE, 1)]

    # The account lost all business in the period: everything invoiced is credited.
    credit = adjustment_invoice(base, [], None)
    assert credit is not None
    assert credit.document_type == "credit_note"
    assert credit.total_minor == -base.total_minor
    assert all(line.description.endswith("(no longer due)") for line in credit.lines)


def test_adjustment_keys() -> None:
    assert is_adjustment_key("acme/2026-10-01/adj-2")
    assert not is_adjustment_key("acme/2026-10-01")
    assert base_key("acme/2026-10-01/adj-2") == "acme/2026-10-01"


def _golden_document(name: str) -> dict[str, Any]:
    from invoicer.documents import invoice_to_json
    from tests.golden.casefiles import load_case, rate_case

    return dict(json.loads(invoice_to_json(rate_case(load_case(name)))))


def test_csv_carries_tier_tax_rate_jurisdiction_applies_to_and_notes() -> None:
    rows = list(csv.DictReader(io.StringIO(to_csv(_golden_document("t-tax-per-rate")), newline="")))
    tax = [r for r in rows if r["kind"] == "tax"]
    assert tax
    assert all(r["tax_rate"] and r["jurisdiction"] for r in tax)
    reverse = list(
        csv.DictReader(
            io.StringIO(to_csv(_golden_document("t-reverse-charge-with-discount")), newline="")
        )
    )
    assert {r["invoice_notes"] for r in reverse} == {REVERSE_CHARGE_NOTE}
    discount = next(r for r in reverse if r["kind"] == "discount")
    assert discount["applies_to"] == "fr-sarl/2026-10-26/fr-backup/recurring"
    tiers = list(csv.DictReader(io.StringIO(to_csv(_golden_document("u1-graduated")), newline="")))
    assert [r["tier"] for r in tiers] == ["1", "2"]


def test_html_shows_tax_below_the_subtotal_with_rate_and_the_reverse_charge_note() -> None:
    page = to_html(_golden_document("t-reverse-charge-with-discount"))
    assert page.index(">Subtotal<") < page.index("Tax 0 %") < page.index(">Total<")
    assert f"<p class='note'>{REVERSE_CHARGE_NOTE}</p>" in page
    assert "applies to fr-sarl/2026-10-26/fr-backup/recurring" in page
    per_rate = to_html(_golden_document("t-tax-per-rate"))
    assert "Tax 19 % DE" in per_rate
    assert "tier 2" in to_html(_golden_document("u1-graduated"))
