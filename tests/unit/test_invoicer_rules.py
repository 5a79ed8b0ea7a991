"""Billing rules (BILLING-SEMANTICS §8): windows, hour alignment, catalog validation, and a
rule edited after issue turning into adjustment lines (real DuckDB store)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from aggregation.factory import open_store
from aggregation.ports import UsageTotal
from invoicer.close import closable_at, close_period
from invoicer.invoice import Invoice
from invoicer.issue import issue_invoices
from invoicer.rules import complement, merge_windows, rule_windows, usage_with_rules
from rating.catalog import BillingRule
from rating.catalog_file import CatalogError, parse_catalog, parse_catalog_yaml
from tests.golden.builders import utc
from tests.golden.casefiles import load_case, window_totals, write_usage

CASE = "b-billing-rule-outage"
EGRESS_LINE = "acme/2026-11-01/acme-vps/usage/net.egress.bytes"


def test_windows_merge_and_complement() -> None:
    a, b, c = utc(2026, 11, 1), utc(2026, 11, 2), utc(2026, 11, 3)
    d = utc(2026, 11, 4)
    assert merge_windows([(b, c), (a, b), (c, d)]) == [(a, d)]
    assert complement([(b, c)], a, d) == [(a, b), (c, d)]
    assert complement([(a, d)], a, d) == []
    rules = [
        BillingRule("r1", "x", a, c),
        BillingRule("r2", "x", b, None),  # open-ended: clipped to the window
        BillingRule("r3", "x", utc(2025, 1, 1), utc(2025, 2, 1)),  # outside
    ]
    assert rule_windows(rules, b, d) == [(b, d)]


def test_a_non_hour_aligned_boundary_takes_effect_at_the_next_bucket_start() -> None:
    case = load_case(CASE)
    period = case.period

    def fetch(start: datetime, end: datetime, ids: Sequence[str]) -> list[UsageTotal]:
        return window_totals(case.usage, start, end, ids)

    totals = window_totals(case.usage, period.start, period.end, ["acme-vps"])
    ruled = usage_with_rules(case.catalog, period.start, period.end, totals, fetch)
    egress = ruled.exclusions[("acme-vps", "net.egress.bytes")]
    # [10:30, 12:30) excludes the buckets starting at 11:00 and 12:00, not 10:00
    assert egress.full.quantity - egress.billable.quantity == 600 * 10**9
    assert egress.rule_ids == ("incident-42",)
    peak = ruled.exclusions[("acme-vps", "ipv4.count")]
    assert (peak.full.quantity_max, peak.billable.quantity_max) == (6, 2)


def test_no_rule_no_query() -> None:
    case = load_case("u1-graduated")
    period = case.period
    total = UsageTotal("x", "net.egress.bytes", 1, 1, 1)

    def fetch(start: datetime, end: datetime, ids: Sequence[str]) -> list[UsageTotal]:
        raise AssertionError("no rule, no query")

    ruled = usage_with_rules(case.catalog, period.start, period.end, [total], fetch)
    assert (ruled.totals, ruled.exclusions) == ([total], {})


def _catalog_text() -> str:
    return (Path(__file__).parents[1] / "golden" / "cases" / CASE / "catalog.yaml").read_text(
        encoding="utf-8"
    )


@pytest.mark.parametrize(
    ("replacement", "path", "message"),
    [
        ("match: {account: acme}", "billing_rules[0].match.resource", "not supported"),
        ("match: {account: acme}", "billing_rules[0].match.labels", "not supported"),
        ("match: {account: acme}", "billing_rules[0].match.account", "unknown account"),
        ('to: "2026-11-12T12:30:00Z"', "billing_rules[0].to", "not after 'from'"),
    ],
)
def test_rules_that_cannot_be_applied_are_refused_naming_the_field(
    replacement: str, path: str, message: str
) -> None:
    new = {
        "billing_rules[0].match.resource": "match: {account: acme, resource: srv-1}",
        "billing_rules[0].match.labels": "match: {labels: {env: prod}}",
        "billing_rules[0].match.account": "match: {account: acmee}",
        "billing_rules[0].to": 'to: "2026-11-12T09:00:00Z"',
    }[path]
    text = _catalog_text().replace(replacement, new, 1)
    with pytest.raises(CatalogError) as raised:
        parse_catalog(parse_catalog_yaml(text, "c.yaml"), "c.yaml")
    assert any(p.path == path and message in p.message for p in raised.value.problems)


def test_editing_a_rule_recloses_the_draft_and_after_issue_makes_adjustments() -> None:
    case = load_case(CASE)
    store = open_store("duckdb::memory:")
    try:
        store.migrate()
        write_usage(store, case.usage, rated_at=case.period.end)
        now = closable_at(case.catalog, case.account_id, case.period)

        def egress(invoices: Sequence[Invoice]) -> int:
            lines = [x for i in invoices for x in i.lines if x.key == EGRESS_LINE]
            assert len(lines) == 1
            return lines[0].amount_minor

        first = close_period(store, case.catalog, case.year, case.month, now)
        assert egress(first.invoices) == 800
        # Editing the rule before issue recomputes the draft: the range now also takes
        # the 10:00 bucket (300 GB more excluded) -> 500 GB billable -> 4.00.
        rule = case.catalog.billing_rules["incident-42"]
        wider = replace(
            case.catalog,
            billing_rules={
                **case.catalog.billing_rules,
                "incident-42": replace(rule, start=utc(2026, 11, 12, 10)),
            },
        )
        second = close_period(store, wider, case.year, case.month, now)
        assert egress(second.invoices) == 500
        acme = next(i for i in second.invoices if i.account_id == "acme")
        issue_invoices(store, [acme.key], now)

        # After issue: dropping the rule re-rates the whole period -> 1,400 GB billable =
        # 14.00 and 6 IPv4 = 9.00, so +9.00 and +6.00 in an adjustment draft.
        unruled = replace(case.catalog, billing_rules={})
        third = close_period(store, unruled, case.year, case.month, now)
        adjustment = next(i for i in third.invoices if i.key == f"{acme.key}/adj-1")
        assert {line.key: line.amount_minor for line in adjustment.lines} == {
            "acme/2026-11-01/acme-vps/usage/ipv4.count": 600,
            EGRESS_LINE: 900,
        }
        assert adjustment.document_type == "adjustment"
        assert acme.key in third.untouched
    finally:
        store.close()
