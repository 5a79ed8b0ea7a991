"""Properties of issue 4's arithmetic: period tilings, tier slicing, allocation, discounts,
commitments and taxes."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.ports import UsageTotal
from invoicer.close import rate_account_period
from invoicer.discounts import allocate
from invoicer.invoice import LineKind
from invoicer.lines import graduated_slices, package_blocks, volume_tier
from invoicer.periods import BillingSchedule, Period, account_period, period_label
from rating.catalog import (
    Account,
    BillingPeriod,
    Campaign,
    Catalog,
    ChargeKind,
    DiscountKind,
    HourlyCharge,
    PeriodPolicy,
    Plan,
    PricingModel,
    RecurringCharge,
    Resource,
    Span,
    Subscription,
    TaxKind,
    TaxProfile,
    Tier,
    TimezoneChange,
    UsageCharge,
)
from rating.money import exponent
from tests.golden.builders import EGRESS, catalog

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Pacific/Chatham",
)

# -- allocation -----------------------------------------------------------------------------


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=30), st.data())
def test_allocation_parts_sum_to_the_whole_and_stay_within_their_weights(
    weights: list[int], data: st.DataObject
) -> None:
    whole = sum(weights)
    total = data.draw(st.integers(0, whole)) if whole else 0

    parts = allocate(total, weights)

    assert sum(parts) == total
    for part, weight in zip(parts, weights, strict=True):
        assert 0 <= part <= weight
        exact = Fraction(total * weight, whole) if whole else Fraction(0)
        assert exact - 1 < part < exact + 1


# -- period tilings -------------------------------------------------------------------------

policies = st.one_of(
    st.just(BillingPeriod()),
    st.builds(lambda day: BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=day), st.integers(1, 31)),
    st.builds(
        lambda days: BillingPeriod(PeriodPolicy.DAYS_BEFORE_MONTH_END, days=days),
        st.integers(0, 27),
    ),
    st.builds(
        lambda anchor: BillingPeriod(PeriodPolicy.ANNIVERSARY, anchor=anchor),
        st.dates(date(2020, 1, 1), date(2030, 12, 31)),
    ),
)


@st.composite
def schedules(draw: st.DrawFn) -> BillingSchedule:
    changes = sorted(
        {
            (draw(st.integers(2025, 2028)), draw(st.integers(1, 12)))
            for _ in range(draw(st.integers(0, 3)))
        }
    )
    return BillingSchedule(
        draw(policies),
        draw(st.sampled_from(ZONES)),
        tuple(TimezoneChange(y, m, draw(st.sampled_from(ZONES))) for y, m in changes),
    )


instants = st.datetimes(
    datetime(2025, 1, 1),  # noqa: DTZ001 (hypothesis takes naive bounds)
    datetime(2029, 12, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)


@settings(max_examples=200, deadline=None)
@given(schedules(), instants, st.integers(1, 800))
def test_a_tiling_has_no_gaps_and_no_overlaps(
    schedule: BillingSchedule, start: datetime, days: int
) -> None:
    end = start + timedelta(days=days)

    tiles = schedule.tiling(start, end)

    assert tiles[0].start <= start < tiles[0].end
    assert tiles[-1].start < end <= tiles[-1].end
    for before, after in itertools.pairwise(tiles):
        assert before.end == after.start
    for tile in tiles:
        assert schedule.containing(tile.start) == tile
        assert schedule.containing(tile.end - timedelta(seconds=1)) == tile
        # one period per label: the label's period is the tile itself
        assert schedule.period(*schedule.label_of(tile.start)) == tile
        assert period_label(tile) == schedule.label_of(tile.start)
        assert 20 * 86_400 < tile.seconds < 40 * 86_400


# -- tiers ----------------------------------------------------------------------------------

quantities = st.fractions(min_value=0, max_value=10**7, max_denominator=10**9)


@st.composite
def tier_bounds(draw: st.DrawFn) -> list[Fraction | None]:
    raw = sorted(set(draw(st.lists(st.integers(1, 10**6), min_size=0, max_size=5))))
    return [*(Fraction(b) for b in raw), None]


@given(quantities, tier_bounds(), st.data())
def test_graduated_slices_add_up_to_the_billable_quantity(
    billable: Fraction, bounds: list[Fraction | None], data: st.DataObject
) -> None:
    prices = [Fraction(data.draw(st.integers(0, 1000)), 100) for _ in bounds]

    slices = graduated_slices(billable, bounds, prices)

    assert sum(s.quantity for s in slices) == billable
    assert all(s.quantity >= 0 for s in slices)
    for s in slices:
        if s.upper is not None:
            assert s.quantity <= s.upper - s.lower
    i = volume_tier(billable, bounds)
    assert bounds[i] is None or billable <= bounds[i]  # type: ignore[operator]
    assert i == 0 or billable > bounds[i - 1]  # type: ignore[operator]


@given(quantities, st.fractions(min_value=Fraction(1, 100), max_value=10**4))
def test_package_blocks_cover_the_quantity_with_less_than_one_spare(
    billable: Fraction, size: Fraction
) -> None:
    blocks = package_blocks(billable, size)

    assert blocks * size >= billable > (blocks - 1) * size or blocks == billable == 0


# -- whole invoices with discounts, commitments and taxes -----------------------------------

money = st.decimals(min_value=0, max_value=300, places=2, allow_nan=False, allow_infinity=False)


@st.composite
def invoice_inputs(draw: st.DrawFn) -> tuple[Catalog, Account, Period, list[UsageTotal]]:
    currency = draw(st.sampled_from(("EUR", "JPY", "KWD")))
    places = exponent(currency)
    amounts = st.decimals(
        min_value=0, max_value=300, places=places, allow_nan=False, allow_infinity=False
    )
    tz = draw(st.sampled_from(ZONES))
    tax = draw(
        st.one_of(
            st.none(),
            st.builds(
                lambda rate, line: TaxProfile(TaxKind.RATE, rate, "XX", line),
                st.decimals(0, 30, places=2, allow_nan=False, allow_infinity=False),
                st.booleans(),
            ),
            st.just(TaxProfile(TaxKind.REVERSE_CHARGE)),
            st.just(TaxProfile(TaxKind.EXEMPT)),
        )
    )
    account = Account(
        "acc",
        "Account",
        currency,
        tz,
        draw(policies),
        tax=tax,
        commitment={currency: draw(amounts)} if draw(st.booleans()) else {},
    )
    model = draw(st.sampled_from(list(PricingModel)))
    tiers = (
        Tier(Decimal(draw(st.integers(1, 5000))), {currency: draw(money)}),
        Tier(None, {currency: draw(money)}),
    )
    usage = UsageCharge(
        EGRESS.name,
        {currency: draw(money)} if model is PricingModel.PER_UNIT else {},
        draw(money),
        model,
        tiers if model in (PricingModel.GRADUATED, PricingModel.VOLUME) else (),
        None,
    )
    if model is PricingModel.PACKAGE:
        from rating.catalog import Package

        usage = UsageCharge(
            EGRESS.name, {}, draw(money), model, (), Package(Decimal(100), {currency: draw(money)})
        )
    plan = Plan(
        "p",
        "P",
        recurring=RecurringCharge({currency: draw(money)}),
        hourly=HourlyCharge({currency: draw(money)}),
        usage=(usage,),
    )
    period = account_period(account, 2026, draw(st.integers(1, 12)))
    start = period.start - timedelta(days=draw(st.integers(-20, 60)))
    subscription = Subscription("s", account.id, plan.id, start)
    resources = [
        Resource(f"r{n}", "s", "server", (Span(start + timedelta(hours=n)),))
        for n in range(draw(st.integers(0, 3)))
    ]
    campaigns = []
    for n in range(draw(st.integers(0, 3))):
        fixed = draw(st.booleans())
        campaigns.append(
            Campaign(
                f"c{n}",
                f"C{n}",
                DiscountKind.FIXED if fixed else DiscountKind.PERCENTAGE,
                percent=Decimal(draw(st.integers(1, 100))),
                amounts={currency: draw(amounts)},
                charge=draw(st.sampled_from([None, *ChargeKind])),
                first_periods=draw(st.one_of(st.none(), st.integers(1, 3))),
            )
        )
    cat = catalog(
        plans=[plan], accounts=[account], subscriptions=[subscription], resources=resources
    )
    cat = Catalog(
        cat.meters,
        cat.plans,
        cat.accounts,
        cat.subscriptions,
        cat.resources,
        {c.id: c for c in campaigns},
    )
    totals = [UsageTotal("s", EGRESS.name, draw(st.integers(0, 10**16)), 0, 1)]
    return cat, account, period, totals


@settings(max_examples=150, deadline=None)
@given(invoice_inputs())
def test_totals_are_exact_sums_of_once_rounded_lines_and_nothing_goes_below_zero(
    inputs: tuple[Catalog, Account, Period, list[UsageTotal]],
) -> None:
    cat, account, period, totals = inputs
    invoice = rate_account_period(cat, account.id, period, totals)

    before_tax = [line for line in invoice.lines if line.kind is not LineKind.TAX]
    taxes = [line for line in invoice.lines if line.kind is LineKind.TAX]
    assert invoice.subtotal_minor == sum(line.amount_minor for line in before_tax)
    assert invoice.total_minor == invoice.subtotal_minor + sum(t.amount_minor for t in taxes)
    by_key = {line.key: line for line in invoice.lines}
    discounted: dict[str, int] = {}
    for line in invoice.lines:
        if line.kind is LineKind.DISCOUNT:
            assert line.amount_minor < 0
            assert line.applies_to is not None
            discounted[line.applies_to] = discounted.get(line.applies_to, 0) + line.amount_minor
    for key, discount in discounted.items():
        assert by_key[key].amount_minor + discount >= 0  # never below zero
    minimum = account.commitment.get(account.currency)
    active = any(period.overlap_us(s.start, s.end) for s in cat.subscriptions.values())
    if minimum is not None and active:
        assert invoice.subtotal_minor >= minimum.scaleb(exponent(account.currency))
    if account.tax is not None and account.tax.kind is not TaxKind.RATE:
        assert all(t.amount_minor == 0 for t in taxes)
