"""Line arithmetic (BILLING-SEMANTICS §3-§5): started hours, caps, proration, allowances."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from aggregation.ports import UsageTotal
from invoicer.exact import truncate
from invoicer.invoice import LineKind
from invoicer.lines import (
    ChargeConfigurationError,
    SubscriptionPeriod,
    billable_hours,
    billable_quantity,
    display_quantity,
    hourly_lines,
    merged_active_us,
    prorate,
    recurring_line,
    usage_line,
    usage_lines,
)
from invoicer.periods import calendar_month
from rating.catalog import (
    Account,
    HourlyCharge,
    Package,
    Plan,
    PriceOverride,
    PricingModel,
    RecurringCharge,
    Span,
    Subscription,
    Tier,
    UsageCharge,
)
from tests.golden.builders import ACME, EGRESS, IPV4, STORAGE, backup, d, server, utc, vps_s

OCTOBER = calendar_month(2026, 10, "Europe/Berlin")
HOUR_US = 3600 * 1_000_000


def recurring(plan: Plan) -> RecurringCharge:
    assert plan.recurring is not None
    return plan.recurring


def hourly(plan: Plan) -> HourlyCharge:
    assert plan.hourly is not None
    return plan.hourly


def sp(plan: Plan, start: str = "2026-09-01", end: str | None = None) -> SubscriptionPeriod:
    y, m, day = (int(x) for x in start.split("-"))
    sub_end = None
    if end is not None:
        ey, em, eday = (int(x) for x in end.split("-"))
        sub_end = utc(ey, em, eday)
    return SubscriptionPeriod(
        ACME, Subscription("acme-sub", "acme", plan.id, utc(y, m, day), sub_end), plan, OCTOBER
    )


@pytest.mark.parametrize(
    ("active_us", "hours"),
    [(0, 0), (1, 1), (HOUR_US - 1, 1), (HOUR_US, 1), (HOUR_US + 1, 2), (165_000_000_000, 46)],
)
def test_billable_hours_are_started_hours(active_us: int, hours: int) -> None:
    assert billable_hours(active_us) == hours


def test_r1_proration_is_exact_until_the_line_rounds() -> None:
    amount = prorate(Fraction(12), 505 * HOUR_US, 745 * HOUR_US)

    assert amount == Fraction(12 * 505, 745)


def test_prorate_refuses_more_active_time_than_the_period() -> None:
    with pytest.raises(ValueError, match="outside"):
        prorate(Fraction(12), 746 * HOUR_US, 745 * HOUR_US)


def test_r1_recurring_line() -> None:
    plan = backup()
    subscription = SubscriptionPeriod(
        ACME, Subscription("acme-backup", "acme", "backup", utc(2026, 10, 10, 22)), plan, OCTOBER
    )

    line = recurring_line(subscription, recurring(plan))

    assert line is not None
    assert line.kind is LineKind.RECURRING
    assert line.amount_minor == 813
    assert line.amount_precise == Decimal("8.134228187919")
    assert line.key == "acme/2026-10-01/acme-backup/recurring"
    assert (line.service_start, line.service_end) == (utc(2026, 10, 10, 22), OCTOBER.end)
    assert "505 h of 745 h" in line.description


def test_a_full_period_is_not_prorated() -> None:
    plan = backup()
    line = recurring_line(sp(plan), recurring(plan))

    assert line is not None
    assert line.amount_minor == 1200
    assert line.quantity == 1
    assert "prorated" not in line.description


def test_a_subscription_outside_the_period_gets_no_recurring_line() -> None:
    plan = backup()

    assert recurring_line(sp(plan, "2026-11-01"), recurring(plan)) is None
    assert recurring_line(sp(plan, "2026-01-01", "2026-09-30"), recurring(plan)) is None


def test_h1_and_h2_hourly_lines() -> None:
    plan = vps_s()
    resources = [
        server("srv-2", "acme-sub", (utc(2026, 9, 1), None)),
        server("srv-1", "acme-sub", (utc(2026, 10, 3, 10, 20), utc(2026, 10, 5, 8, 10))),
    ]

    lines = hourly_lines(sp(plan), hourly(plan), resources)

    assert [line.resource_id for line in lines] == ["srv-1", "srv-2"]
    h1, h2 = lines
    assert (h1.quantity, h1.amount_precise, h1.amount_minor, h1.cap) == (
        d("46"),
        d("0.322"),
        32,
        None,
    )
    assert (h2.quantity, h2.amount_precise, h2.amount_minor) == (d("745"), d("4.15"), 415)
    assert h2.cap == d("4.15")
    assert "capped at 4.15" in h2.description


def test_hourly_spans_count_only_while_the_subscription_is_active() -> None:
    plan = vps_s()
    # The server runs all month; the subscription only from 2026-10-20T00:00Z.
    resources = [server("srv-1", "acme-sub", (utc(2026, 9, 1), None))]

    (line,) = hourly_lines(sp(plan, "2026-10-20"), hourly(plan), resources)

    assert line.quantity == 11 * 24 + 23  # 2026-10-20T00:00Z .. 2026-10-31T23:00Z


def test_spans_are_summed_before_rounding_up_to_started_hours() -> None:
    plan = vps_s()
    resources = [
        server(
            "srv-1",
            "acme-sub",
            (utc(2026, 10, 3, 10, 0), utc(2026, 10, 3, 10, 20)),
            (utc(2026, 10, 4, 10, 0), utc(2026, 10, 4, 10, 20)),
            (utc(2026, 10, 5, 10, 0), utc(2026, 10, 5, 10, 20)),
        )
    ]

    (line,) = hourly_lines(sp(plan), hourly(plan), resources)

    assert line.quantity == 1  # 3 x 20 min = 1 h, not 3 started hours


def test_a_resource_without_time_in_the_period_gets_no_line() -> None:
    plan = vps_s()
    resources = [server("srv-1", "acme-sub", (utc(2026, 8, 1), utc(2026, 9, 1)))]

    assert hourly_lines(sp(plan), hourly(plan), resources) == []


def test_no_cap_in_the_currency_means_no_cap() -> None:
    plan = Plan("p", "P", hourly=HourlyCharge({"EUR": d("0.0070")}))
    resources = [server("srv-1", "acme-sub", (utc(2026, 9, 1), None))]

    (line,) = hourly_lines(sp(plan), hourly(plan), resources)

    assert line.amount_precise == d("5.215")
    assert line.amount_minor == 522
    assert line.cap is None


def test_a_cap_that_is_not_reached_is_not_shown() -> None:
    plan = Plan("p", "P", hourly=HourlyCharge({"EUR": d("0.0070")}, {"EUR": d("5.215")}))
    resources = [server("srv-1", "acme-sub", (utc(2026, 9, 1), None))]

    (line,) = hourly_lines(sp(plan), hourly(plan), resources)

    assert line.cap is None
    assert "capped" not in line.description


def test_overlapping_spans_count_once() -> None:
    window = (utc(2026, 10, 1), utc(2026, 10, 2))
    spans = [
        Span(utc(2026, 10, 1, 1), utc(2026, 10, 1, 3)),
        Span(utc(2026, 10, 1, 2), utc(2026, 10, 1, 4)),
        Span(utc(2026, 10, 1, 2, 30), utc(2026, 10, 1, 2, 45)),
        Span(utc(2026, 10, 1, 23), None),
    ]

    assert merged_active_us(spans, *window, where="srv") == 4 * HOUR_US


def test_a_reversed_span_is_a_configuration_error_naming_the_resource() -> None:
    with pytest.raises(ChargeConfigurationError, match="resource 'srv-9'"):
        merged_active_us(
            [Span(utc(2026, 10, 2), utc(2026, 10, 1))],
            OCTOBER.start,
            OCTOBER.end,
            where="resource 'srv-9'",
        )


def test_a_missing_price_is_a_configuration_error_never_a_zero() -> None:
    plan = vps_s("USD")
    resources = [server("srv-1", "acme-sub", (utc(2026, 9, 1), None))]

    with pytest.raises(ChargeConfigurationError, match="plan 'vps-s': hourly rate has no EUR"):
        hourly_lines(sp(plan), hourly(plan), resources)
    with pytest.raises(ChargeConfigurationError, match="recurring fee has no EUR"):
        recurring_line(sp(backup("USD")), RecurringCharge({"USD": d("1")}))


def total(meter: str, quantity: int, quantity_max: int = 0) -> UsageTotal:
    return UsageTotal("acme-sub", meter, quantity, quantity_max, 1)


def test_display_quantity_per_meter_kind() -> None:
    november = calendar_month(2026, 11, "UTC")
    held = 100 * 2**30 * 10 * 86_400  # 100 GiB for 10 days, in byte-seconds

    assert display_quantity(EGRESS, total(EGRESS.name, 12_345_678_901_234), OCTOBER) == Fraction(
        12_345_678_901_234, 10**9
    )
    assert display_quantity(STORAGE, total(STORAGE.name, held), november) == Fraction(100, 3)
    assert display_quantity(IPV4, total(IPV4.name, 40, quantity_max=6), OCTOBER) == 6


def test_billable_quantity_never_goes_below_zero() -> None:
    assert billable_quantity(Fraction(5), Fraction(10)) == 0
    assert billable_quantity(Fraction(15), Fraction(10)) == 5


def test_per_unit_usage_with_its_allowance() -> None:
    plan = vps_s()

    line = usage_line(sp(plan), plan.usage[0], EGRESS, total(EGRESS.name, 12_345_678_901_234))

    assert line.kind is LineKind.USAGE
    assert line.quantity == d("11345.678901234")
    assert line.usage_quantity == d("12345.678901234")
    assert line.included_quantity == 1000
    assert line.amount_minor == 11346
    assert line.key == "acme/2026-10-01/acme-sub/usage/net.egress.bytes"
    assert line.meter == "net.egress.bytes"


def test_the_allowance_is_prorated_like_the_fee() -> None:
    plan = vps_s()
    subscription = SubscriptionPeriod(
        ACME, Subscription("acme-sub", "acme", "vps-s", utc(2026, 10, 10, 22)), plan, OCTOBER
    )
    used = 700 * 10**9  # 700 GB; the allowance is 1000 GB x 505/745 = 677.85... GB

    line = usage_line(subscription, plan.usage[0], EGRESS, total(EGRESS.name, used))

    assert line.included_quantity == d("677.852348993288")
    assert line.quantity == d("22.147651006711")
    assert line.amount_precise == d("0.221476510067")
    assert line.amount_minor == 22


def test_usage_within_the_allowance_is_shown_at_zero() -> None:
    plan = vps_s()

    line = usage_line(sp(plan), plan.usage[0], EGRESS, total(EGRESS.name, 10**12))

    assert (line.quantity, line.amount_minor, line.usage_quantity) == (d("0"), 0, d("1000"))


def test_gauge_u3_in_a_utc_november() -> None:
    plan = Plan("storage", "Block storage", usage=(UsageCharge(STORAGE.name, {"EUR": d("0.05")}),))
    november = calendar_month(2026, 11, "UTC")
    subscription = SubscriptionPeriod(
        ACME.__class__("initech", "Initech", "EUR", "UTC"),
        Subscription("s", "initech", "storage", utc(2026, 10, 1)),
        plan,
        november,
    )

    line = usage_line(
        subscription, plan.usage[0], STORAGE, total(STORAGE.name, 100 * 2**30 * 864_000)
    )

    assert line.quantity == d("33.333333333333")
    assert line.amount_minor == 167
    assert line.unit == "GiB-month"


# -- pricing models (§5) --------------------------------------------------------------------

U1_TIERS = (
    Tier(d("9000"), {"EUR": d("0.0100")}),
    Tier(None, {"EUR": d("0.0050")}),
)


def tiered(model: PricingModel, tiers: tuple[Tier, ...], included: str = "0") -> Plan:
    return Plan(
        "egress",
        "Egress",
        usage=(UsageCharge(EGRESS.name, {}, d(included), model, tiers),),
    )


def egress_total(gb: str) -> UsageTotal:
    quantity = int(Decimal(gb) * 10**9)
    return UsageTotal("acme-sub", EGRESS.name, quantity, quantity, 1)


def test_graduated_u1_gives_one_line_per_tier() -> None:
    plan = tiered(PricingModel.GRADUATED, U1_TIERS, included="1000")
    lines = usage_lines(sp(plan), plan.usage[0], EGRESS, egress_total("12345.678901234"))

    assert [(line.key.rsplit("/", 1)[1], line.amount_minor, line.tier) for line in lines] == [
        ("tier-1", 9000, 1),
        ("tier-2", 1173, 2),
    ]
    assert lines[0].quantity == 9000
    assert lines[1].quantity == d("2345.678901234")


def test_graduated_below_the_first_bound_shows_only_the_first_tier() -> None:
    plan = tiered(PricingModel.GRADUATED, U1_TIERS, included="1000")
    lines = usage_lines(sp(plan), plan.usage[0], EGRESS, egress_total("500"))

    assert [(line.tier, line.quantity, line.amount_minor) for line in lines] == [(1, Decimal(0), 0)]


def test_graduated_bounds_are_prorated_like_the_allowance() -> None:
    plan = tiered(PricingModel.GRADUATED, U1_TIERS, included="1000")
    # active from 2026-10-16T00:00Z: 16 d + 23 h of October's 745 h
    sub = sp(plan, start="2026-10-16")
    share = sub.active_fraction
    lines = usage_lines(sub, plan.usage[0], EGRESS, egress_total("10000"))

    assert lines[0].included_quantity == truncate_12(1000 * share)
    assert lines[0].quantity == truncate_12(9000 * share)
    assert lines[1].quantity == truncate_12(10000 - 10000 * share)


def truncate_12(value: Fraction) -> Decimal:
    return truncate(value)


@pytest.mark.parametrize(
    ("peak", "tier", "amount"),
    [(0, 1, 0), (1, 1, 150), (4, 1, 600), (5, 2, 600), (6, 2, 720)],
)
def test_volume_prices_everything_at_the_tier_the_total_falls_in(
    peak: int, tier: int, amount: int
) -> None:
    tiers = (Tier(d("4"), {"EUR": d("1.50")}), Tier(None, {"EUR": d("1.20")}))
    plan = Plan(
        "ips", "IPs", usage=(UsageCharge(IPV4.name, {}, d("0"), PricingModel.VOLUME, tiers),)
    )
    total = UsageTotal("acme-sub", IPV4.name, 0, peak, 1)

    [line] = usage_lines(sp(plan), plan.usage[0], IPV4, total)

    assert (line.tier, line.amount_minor) == (tier, amount)
    assert line.key.endswith("/usage/ipv4.count")


@pytest.mark.parametrize(
    ("gb", "blocks"), [("0", 0), ("0.000000001", 1), ("100", 1), ("100.1", 2), ("250.3", 3)]
)
def test_package_prices_every_started_block(gb: str, blocks: int) -> None:
    plan = Plan(
        "packs",
        "Packs",
        usage=(
            UsageCharge(
                EGRESS.name,
                {},
                d("0"),
                PricingModel.PACKAGE,
                package=Package(d("100"), {"EUR": d("5.00")}),
            ),
        ),
    )
    [line] = usage_lines(sp(plan), plan.usage[0], EGRESS, egress_total(gb))

    assert (line.quantity, line.amount_minor) == (Decimal(blocks), 500 * blocks)
    assert line.unit == "block of 100 GB"


def test_a_tier_without_the_accounts_currency_is_a_configuration_error() -> None:
    tiers = (Tier(None, {"USD": d("1")}),)
    plan = tiered(PricingModel.GRADUATED, tiers)

    with pytest.raises(ChargeConfigurationError, match="tier 1 has no EUR price"):
        usage_lines(sp(plan), plan.usage[0], EGRESS, egress_total("1"))


def test_a_price_override_replaces_the_plans_charge_for_one_account() -> None:
    plan = vps_s()
    override = PriceOverride("vps-s", hourly=HourlyCharge({"EUR": d("0.0050")}))
    account = Account("acme", "ACME", "EUR", "Europe/Berlin", price_overrides={"vps-s": override})

    custom = account.plan_for(plan)

    assert custom.hourly == HourlyCharge({"EUR": d("0.0050")})
    assert custom.usage == plan.usage  # untouched
    assert ACME.plan_for(plan) is plan
