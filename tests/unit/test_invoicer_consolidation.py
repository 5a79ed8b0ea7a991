"""Bill-to and resellers (BILLING-SEMANTICS §9): catalog refusals naming the account and the
field, one close producing every invoice (reproducibly), and per-issuer numbering."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from aggregation.factory import open_store
from invoicer.close import close_period
from invoicer.documents import invoices_to_text
from invoicer.issue import issue_invoices
from invoicer.lines import ChargeConfigurationError
from invoicer.preview import preview_invoice
from rating.catalog_file import CatalogError, parse_catalog, parse_catalog_yaml
from tests.golden.casefiles import CASES_DIR, load_case, write_usage

BASE = """
meters: []
plans:
  - {id: backup, name: Backup, recurring: {fee: {EUR: "12.00", USD: "13.00"}}}
  - {id: other, name: Other, recurring: {fee: {EUR: "1.00"}}}
accounts:
  - {id: payer, name: Payer, currency: EUR, timezone: UTC}
  - {id: hoster, name: Hoster, currency: EUR, timezone: UTC}
ACCOUNTS
subscriptions:
  - {id: s1, account: payer, plan: backup, start: "2026-01-01T00:00:00Z"}
SUBSCRIPTIONS
price_books:
  - id: book
    reseller: hoster
    plans: [{id: backup, name: Hoster backup, recurring: {fee: {EUR: "20.00"}}}]
"""


def problems(accounts: str, subscriptions: str = "") -> list[tuple[str, str]]:
    text = BASE.replace("ACCOUNTS", accounts).replace("SUBSCRIPTIONS", subscriptions)
    try:
        parse_catalog(parse_catalog_yaml(text, "c.yaml"), "c.yaml")
    except CatalogError as exc:
        return [(p.path, p.message) for p in exc.problems]
    return []


def test_a_valid_bill_to_and_reseller_catalog_is_accepted() -> None:
    assert (
        problems(
            "  - {id: a, name: A, currency: EUR, timezone: UTC, bill_to: payer}\n"
            "  - {id: c, name: C, currency: EUR, timezone: UTC, reseller: hoster}",
            "  - {id: c1, account: c, plan: backup, start: '2026-01-01T00:00:00Z'}",
        )
        == []
    )


@pytest.mark.parametrize(
    ("accounts", "subscriptions", "path", "words"),
    [
        (
            "  - {id: a, name: A, currency: EUR, timezone: UTC, bill_to: nobody}",
            "",
            "accounts[2].bill_to",
            "unknown account 'nobody'",
        ),
        (
            "  - {id: a, name: A, currency: USD, timezone: UTC, bill_to: payer}",
            "",
            "accounts[2].bill_to",
            "account 'a' is billed in USD but its payer 'payer' in EUR",
        ),
        (
            (
                "  - {id: a, name: A, currency: EUR, timezone: UTC, bill_to: b}\n"
                "  - {id: b, name: B, currency: EUR, timezone: UTC, bill_to: a}"
            ),
            "",
            "accounts[2].bill_to",
            "account 'a': bill_to forms a cycle (a -> b -> a)",
        ),
        (
            "  - {id: a, name: A, currency: EUR, timezone: UTC, bill_to: a}",
            "",
            "accounts[2].bill_to",
            "cycle (a -> a)",
        ),
        (
            "  - {id: c, name: C, currency: EUR, timezone: UTC, reseller: payer}",
            "",
            "accounts[2].reseller",
            "reseller 'payer' has no price book",
        ),
        (
            "  - {id: c, name: C, currency: EUR, timezone: UTC, reseller: hoster}",
            "  - {id: c1, account: c, plan: other, start: '2026-01-01T00:00:00Z'}",
            "accounts[2].reseller",
            "subscription 'c1' is on plan 'other', which price book 'book'",
        ),
        (
            "  - {id: c, name: C, currency: USD, timezone: UTC, reseller: hoster}",
            "  - {id: c1, account: c, plan: backup, start: '2026-01-01T00:00:00Z'}",
            "accounts[2].reseller",
            "price book 'book': plan 'backup' has no USD price",
        ),
        (
            "  - {id: c, name: C, currency: EUR, timezone: UTC, reseller: hoster, bill_to: payer}",
            "",
            "accounts[2].reseller",
            "either bill_to or reseller, not both",
        ),
    ],
)
def test_relations_that_cannot_be_billed_are_refused_at_apply(
    accounts: str, subscriptions: str, path: str, words: str
) -> None:
    found = problems(accounts, subscriptions)
    assert any(p == path and words in m for p, m in found), found


def test_one_close_bills_the_reseller_and_each_customer_reproducibly_with_own_numbers() -> None:
    case = load_case("r-reseller-platform-invoice")
    store = open_store("duckdb::memory:")
    try:
        store.migrate()
        write_usage(store, case.usage, rated_at=case.period.end)
        now = case.period.end + timedelta(days=1)
        first = close_period(store, case.catalog, case.year, case.month, now)
        second = close_period(store, case.catalog, case.year, case.month, now)
        assert [s.document for s in first.stored] == [s.document for s in second.stored]
        assert [(i.key, i.issuer) for i in first.invoices] == [
            ("cust-a/2026-10-01", "hoster"),
            ("cust-b/2026-10-01", "hoster"),
            ("hoster/2026-10-01", None),
        ]
        for name in ("r-reseller-customer-a", "r-reseller-customer-b"):
            expected = (CASES_DIR / name / "expected.json").read_text(encoding="utf-8")
            assert expected in {s.document + "\n" for s in first.stored}
        assert "issued by hoster" in invoices_to_text(first.invoices)

        result = issue_invoices(store, [i.key for i in first.invoices], now)
        numbers = {s.key: json.loads(s.document)["number"] for s in result.issued}
        year = now.year
        assert numbers == {
            "cust-a/2026-10-01": f"hoster-{year}-000001",
            "cust-b/2026-10-01": f"hoster-{year}-000002",
            "hoster/2026-10-01": f"ML-{year}-000001",
        }
    finally:
        store.close()


def test_a_payee_has_no_invoice_of_its_own() -> None:
    case = load_case("g-bill-to-consolidated")
    store = open_store("duckdb::memory:")
    try:
        store.migrate()
        write_usage(store, case.usage, rated_at=case.period.end)
        result = close_period(
            store, case.catalog, case.year, case.month, case.period.end + timedelta(days=1)
        )
        assert [i.key for i in result.invoices] == ["holding/2026-10-01"]
        payees = {line.account_id for line in result.invoices[0].lines}
        assert payees == {None, "subsidiary", "branch"}
    finally:
        store.close()


def test_preview_follows_bill_to_and_resellers() -> None:
    case = load_case("r-reseller-platform-invoice")
    store = open_store("duckdb::memory:")
    try:
        store.migrate()
        write_usage(store, case.usage, rated_at=case.period.end)
        inside = case.period.start + timedelta(days=20)
        reseller = preview_invoice(store, case.catalog, "hoster", inside)
        assert {line.account_id for line in reseller.lines} == {None, "cust-a", "cust-b"}
        customer = preview_invoice(store, case.catalog, "cust-a", inside)
        assert customer.issuer == "hoster"
        billed = load_case("g-bill-to-consolidated").catalog
        with pytest.raises(ChargeConfigurationError, match="invoiced to 'holding'"):
            preview_invoice(store, billed, "branch", inside)
    finally:
        store.close()
