"""Discounts, commitments and taxes on top of the charge lines (BILLING-SEMANTICS §6-§7)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import pytest

from aggregation.ports import UsageTotal
from invoicer.close import rate_account_period
from invoicer.discounts import allocate, decimal_to_minor
from invoicer.invoice import Invoice, LineKind
from invoicer.periods import calendar_month
from invoicer.taxes import REVERSE_CHARGE_NOTE
from rating.catalog import (
    Account,
    Campaign,
    Catalog,
    ChargeKind,
    DiscountKind,
    Plan,
    RecurringCharge,
    Subscription,
    TaxKind,
    TaxProfile,
    UsageCharge,
)
from tests.golden.builders import EGRESS, catalog, d, utc

NOVEMBER = calendar_month(2026, 11, "UTC")
WEB = Plan(
    "web",
    "Web",
    recurring=RecurringCharge({"EUR": d("10.00")}),
    usage=(UsageCharge(EGRESS.name, {"EUR": d("0.0100")}),),
)
ACC = Account("acc", "Acc", "EUR", "UTC")
OCTOBER_1 = utc(2026, 10, 1)


def invoice(
    *campaigns: Campaign,
    account: Account = ACC,
    start: datetime = OCTOBER_1,
    end: datetime | None = None,
    egress_gb: int | None = None,
) -> Invoice:
    base = catalog(
        plans=[WEB], accounts=[account], subscriptions=[Subscription("s", "acc", "web", start, end)]
    )
    cat = Catalog(
        base.meters,
        base.plans,
        base.accounts,
        base.subscriptions,
        base.resources,
        {c.id: c for c in campaigns},
    )
    totals = []
    if egress_gb is not None:
        totals.append(UsageTotal("s", EGRESS.name, egress_gb * 10**9, 0, 1))
    return rate_account_period(cat, "acc", NOVEMBER, totals)


def amounts(inv: Invoice) -> dict[str, int]:
    return {line.key.removeprefix("acc/2026-11-01/"): line.amount_minor for line in inv.lines}


def test_largest_remainder_worked_example() -> None:
    # 5.00 over 4.15, 4.15, 0.32: exact 240.72, 240.72, 18.56 cents
    assert allocate(500, [415, 415, 32]) == [241, 241, 18]


def test_allocation_edge_cases() -> None:
    assert allocate(0, [0, 0]) == [0, 0]
    assert allocate(3, [1, 1, 1]) == [1, 1, 1]
    assert allocate(1, [1, 1, 1]) == [1, 0, 0]  # ties: the earlier weight
    with pytest.raises(ValueError, match="sum to 0"):
        allocate(1, [0, 0])
    with pytest.raises(ValueError, match="negative"):
        allocate(-1, [1])


def test_campaigns_apply_in_id_order_to_what_the_previous_left() -> None:
    first = Campaign("a", "A", DiscountKind.PERCENTAGE, percent=d("60"))
    second = Campaign("b", "B", DiscountKind.PERCENTAGE, percent=d("60"))

    assert amounts(invoice(second, first)) == {
        "s/recurring": 1000,
        "s/recurring/discount/a": -600,
        "s/recurring/discount/b": -240,
    }


def test_a_fixed_campaign_never_takes_a_scope_below_zero() -> None:
    big = Campaign("big", "Big", DiscountKind.FIXED, amounts={"EUR": d("25.00")})

    inv = invoice(big, egress_gb=123)

    assert amounts(inv) == {
        "s/recurring": 1000,
        "s/recurring/discount/big": -1000,
        "s/usage/net.egress.bytes": 123,
        "s/usage/net.egress.bytes/discount/big": -123,
    }
    assert inv.total_minor == 0


def test_scope_by_charge_kind_and_meter() -> None:
    usage_only = Campaign(
        "u", "U", DiscountKind.PERCENTAGE, percent=d("50"), charge=ChargeKind.USAGE
    )
    meter_only = Campaign("m", "M", DiscountKind.PERCENTAGE, percent=d("10"), meter="ipv4.count")

    assert amounts(invoice(usage_only, meter_only, egress_gb=200)) == {
        "s/recurring": 1000,
        "s/usage/net.egress.bytes": 200,
        "s/usage/net.egress.bytes/discount/u": -100,
    }


def test_a_campaign_applies_to_periods_starting_in_its_range() -> None:
    inside = Campaign("in", "In", DiscountKind.PERCENTAGE, percent=d("10"), start=utc(2026, 11, 1))
    ended = Campaign("out", "Out", DiscountKind.PERCENTAGE, percent=d("10"), end=utc(2026, 11, 1))
    other_account = Campaign(
        "other", "Other", DiscountKind.PERCENTAGE, percent=d("10"), accounts=("someone",)
    )

    assert set(amounts(invoice(inside, ended, other_account))) == {
        "s/recurring",
        "s/recurring/discount/in",
    }


@pytest.mark.parametrize(("first_periods", "applies"), [(1, False), (2, True)])
def test_first_n_periods_count_from_the_subscriptions_first_period(
    first_periods: int, applies: bool
) -> None:
    welcome = Campaign(
        "w", "W", DiscountKind.PERCENTAGE, percent=d("10"), first_periods=first_periods
    )

    # the subscription started in October: November is its second period
    assert ("s/recurring/discount/w" in amounts(invoice(welcome))) is applies


def test_the_commitment_tops_up_the_subtotal_after_discounts() -> None:
    account = replace(ACC, commitment={"EUR": d("30.00")})
    half = Campaign("h", "H", DiscountKind.PERCENTAGE, percent=d("50"))

    inv = invoice(half, account=account)

    assert amounts(inv)["commitment"] == 2500
    assert inv.subtotal_minor == inv.total_minor == 3000


def test_no_commitment_without_an_active_subscription() -> None:
    account = replace(ACC, commitment={"EUR": d("30.00")})

    inv = invoice(account=account, start=utc(2026, 9, 1), end=utc(2026, 10, 1), egress_gb=100)

    assert amounts(inv) == {"s/usage/net.egress.bytes": 100}


def test_a_met_commitment_adds_nothing() -> None:
    account = replace(ACC, commitment={"EUR": d("10.00")})

    assert "commitment" not in amounts(invoice(account=account))


def test_tax_per_rate_is_rounded_once_on_the_sum() -> None:
    account = replace(ACC, tax=TaxProfile(TaxKind.RATE, d("19"), "DE"))

    inv = invoice(account=account, egress_gb=3)  # 10.00 + 0.03 = 10.03 -> 1.9057 -> 1.91

    assert amounts(inv)["tax/DE-19"] == 191
    assert (inv.subtotal_minor, inv.tax_minor, inv.total_minor) == (1003, 191, 1194)
    assert inv.notes == ()


def test_line_level_rounding_taxes_each_line() -> None:
    account = replace(ACC, tax=TaxProfile(TaxKind.RATE, d("19"), "DE", line_level_rounding=True))

    inv = invoice(account=account, egress_gb=3)  # 1.90 + 0.0057 -> 0.01

    assert amounts(inv)["s/recurring/tax"] == 190
    assert amounts(inv)["s/usage/net.egress.bytes/tax"] == 1
    assert inv.total_minor == 1003 + 191


@pytest.mark.parametrize("kind", [TaxKind.REVERSE_CHARGE, TaxKind.EXEMPT])
def test_zero_rated_profiles_show_a_zero_tax_line(kind: TaxKind) -> None:
    inv = invoice(account=replace(ACC, tax=TaxProfile(kind)))

    [tax] = [line for line in inv.lines if line.kind is LineKind.TAX]
    assert tax.amount_minor == 0
    assert inv.total_minor == inv.subtotal_minor == 1000
    if kind is TaxKind.REVERSE_CHARGE:
        assert inv.notes == (REVERSE_CHARGE_NOTE,)
        assert REVERSE_CHARGE_NOTE in tax.description
    else:
        assert inv.notes == ()


def test_decimal_to_minor_refuses_sub_minor_amounts() -> None:
    assert decimal_to_minor(d("5.00"), "EUR") == 500
    assert decimal_to_minor(d("5"), "JPY") == 5
    with pytest.raises(ValueError, match="more decimals"):
        decimal_to_minor(d("0.001"), "EUR")
