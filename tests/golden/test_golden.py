"""Worked examples of BILLING-SEMANTICS.md, as data: catalog + usage + period -> invoice.

Each case is checked twice: against the amounts written by hand from the design document
(``case.yaml``) and byte for byte against the whole expected document (``expected.json``).
"""

from __future__ import annotations

import pytest

from aggregation.factory import open_store
from invoicer.close import closable_at, close_period
from invoicer.documents import invoice_to_json
from invoicer.invoice import LineKind
from rating.money import format_minor
from tests.golden.casefiles import case_names, load_case, rate_case, write_usage

pytestmark = pytest.mark.golden

NAMES = case_names()


def test_the_design_examples_are_all_here() -> None:
    for required in (
        "r1-recurring-proration",
        "h1-hourly-started-hours",
        "h2-hourly-cap",
        "u-per-unit-allowance",
        "u1-graduated",
        "u2-volume-peak",
        "u3-gauge-storage",
        "u4-package",
        "acme-multi-line",
        "jpy-rounding",
        "kwd-exponent",
    ):
        assert required in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_amounts_match_the_design_document(name: str) -> None:
    case = load_case(name)
    invoice = rate_case(case)

    amounts = {line.key: format_minor(line.amount_minor, line.currency) for line in invoice.lines}
    assert amounts == case.amounts
    assert format_minor(invoice.total_minor, invoice.currency) == case.total
    assert invoice.subtotal_minor == sum(
        line.amount_minor for line in invoice.lines if line.kind is not LineKind.TAX
    )
    assert invoice.total_minor == sum(line.amount_minor for line in invoice.lines)


@pytest.mark.parametrize("name", NAMES)
def test_document_matches_expected_json(name: str) -> None:
    case = load_case(name)
    expected = case.expected_path.read_text(encoding="utf-8")

    assert invoice_to_json(rate_case(case)) + "\n" == expected


@pytest.mark.parametrize("name", NAMES)
def test_closing_through_the_store_saves_the_expected_document(name: str) -> None:
    case = load_case(name)
    store = open_store("duckdb::memory:")
    try:
        store.migrate()
        write_usage(store, case.usage, rated_at=case.period.end)
        now = closable_at(case.catalog, case.account_id, case.period)

        result = close_period(store, case.catalog, case.year, case.month, now)

        # other accounts of the catalog get their own drafts; the case is about one of them
        saved = [s for s in store.load_invoices() if s.account_id == case.account_id]
        closed = [i for i in result.invoices if i.account_id == case.account_id]
        assert [s.key for s in saved] == [i.key for i in closed]
        assert [s.document + "\n" for s in saved] == [
            case.expected_path.read_text(encoding="utf-8")
        ]
    finally:
        store.close()
