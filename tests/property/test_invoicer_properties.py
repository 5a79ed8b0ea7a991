"""Properties of the invoicer over random catalogs, periods and usage."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import TypeVar
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.ports import UsageTotal
from invoicer.close import rate_account_period
from invoicer.documents import invoice_to_json
from invoicer.exact import minor_units, truncate
from invoicer.invoice import LineKind
from invoicer.lines import merged_active_us
from invoicer.periods import Period, calendar_month
from rating.catalog import (
    Account,
    Catalog,
    HourlyCharge,
    Plan,
    RecurringCharge,
    Resource,
    Span,
    Subscription,
    UsageCharge,
)
from rating.money import exponent, round_minor
from tests.golden.builders import EGRESS, IPV4, METERS, STORAGE, catalog

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",
    "America/Havana",
    "Asia/Kolkata",
    "Asia/Tokyo",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Asia/Kathmandu",
)
CURRENCIES = ("EUR", "JPY", "KWD")
MINUTE_US = 60 * 1_000_000
T = TypeVar("T")

# -- reference rounding -------------------------------------------------------------------


def half_away_from_zero(value: Fraction, currency: str) -> int:
    """Slow and obvious: round the exact value itself, half away from zero."""
    scaled = value * 10 ** exponent(currency)
    magnitude = abs(scaled)
    whole: int = magnitude.numerator // magnitude.denominator
    if magnitude - whole >= Fraction(1, 2):
        whole += 1
    return whole if scaled >= 0 else -whole


@given(
    st.fractions(min_value=Fraction(-(10**9)), max_value=Fraction(10**9), max_denominator=10**18),
    st.sampled_from(CURRENCIES),
)
def test_amount_minor_is_the_exact_value_rounded_once(value: Fraction, currency: str) -> None:
    precise = truncate(value)

    assert minor_units(precise, currency, "line") == half_away_from_zero(value, currency)
    assert round_minor(precise, currency) == half_away_from_zero(value, currency)


# -- periods ------------------------------------------------------------------------------


@given(st.integers(2000, 2037), st.integers(1, 12), st.sampled_from(ZONES))
def test_calendar_months_tile_time_and_start_at_the_local_first(
    year: int, month: int, tz: str
) -> None:
    period = calendar_month(year, month, tz)
    following = calendar_month(year + (month == 12), month % 12 + 1, tz)
    local = period.start.astimezone(ZoneInfo(tz))

    assert period.end == following.start
    assert (local.year, local.month, local.day) == (year, month, 1)
    assert (period.start - timedelta(seconds=1)).astimezone(ZoneInfo(tz)).day != 1
    assert 27 * 86_400 < period.seconds < 32 * 86_400
    assert period.seconds * 1_000_000 == period.microseconds


# -- spans --------------------------------------------------------------------------------

minute_spans = st.lists(
    st.tuples(st.integers(-2000, 2000), st.one_of(st.none(), st.integers(1, 600))),
    max_size=6,
)


@given(minute_spans, st.integers(-500, 500), st.integers(1, 1500))
def test_merged_active_time_equals_counting_covered_minutes(
    spans: list[tuple[int, int | None]], window_offset: int, window_minutes: int
) -> None:
    origin = datetime(2026, 10, 1, tzinfo=ZoneInfo("UTC"))
    built = [
        Span(
            origin + timedelta(minutes=s), None if n is None else origin + timedelta(minutes=s + n)
        )
        for s, n in spans
    ]
    lo, hi = window_offset, window_offset + window_minutes
    covered = {
        m for s, n in spans for m in range(max(s, lo), min(hi, 10**9 if n is None else s + n))
    }

    active = merged_active_us(
        built, origin + timedelta(minutes=lo), origin + timedelta(minutes=hi), where="r"
    )

    assert active == len(covered) * MINUTE_US


# -- whole invoices -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    catalog: Catalog
    period: Period
    totals: list[UsageTotal]


money = st.decimals(min_value=0, max_value=500, places=4, allow_nan=False, allow_infinity=False)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tz = draw(st.sampled_from(ZONES))
    currency = draw(st.sampled_from(CURRENCIES))
    period = calendar_month(2026, draw(st.integers(1, 12)), tz)
    account = Account("acc", "Account", currency, tz)

    plans: list[Plan] = []
    for n in range(draw(st.integers(1, 3))):
        usage = tuple(
            UsageCharge(meter.name, {currency: draw(money)}, draw(money))
            for meter in METERS
            if draw(st.booleans())
        )
        rate = draw(money)
        plans.append(
            Plan(
                f"plan-{n}",
                f"Plan {n}",
                recurring=RecurringCharge({currency: draw(money)}) if draw(st.booleans()) else None,
                hourly=HourlyCharge(
                    {currency: rate},
                    {currency: draw(money)} if draw(st.booleans()) else {},
                )
                if draw(st.booleans())
                else None,
                usage=usage,
            )
        )

    def instant() -> datetime:
        return period.start + timedelta(minutes=draw(st.integers(-60 * 24 * 40, 60 * 24 * 40)))

    subscriptions: list[Subscription] = []
    resources: list[Resource] = []
    totals: list[UsageTotal] = []
    for n in range(draw(st.integers(1, 4))):
        plan = draw(st.sampled_from(plans))
        start = instant()
        end = start + timedelta(minutes=draw(st.integers(1, 60 * 24 * 60)))
        sub = Subscription(
            f"sub-{n}", account.id, plan.id, start, end if draw(st.booleans()) else None
        )
        subscriptions.append(sub)
        for r in range(draw(st.integers(0, 3))):
            span_start = instant()
            span_end = span_start + timedelta(minutes=draw(st.integers(1, 60 * 24 * 40)))
            resources.append(
                Resource(
                    f"{sub.id}-srv-{r}",
                    sub.id,
                    "server",
                    (Span(span_start, span_end if draw(st.booleans()) else None),),
                )
            )
        for meter in (EGRESS, STORAGE, IPV4):
            if draw(st.booleans()):
                quantity = draw(st.integers(0, 10**18))
                peak = draw(st.integers(0, 10**6))
                totals.append(UsageTotal(sub.id, meter.name, quantity, peak, 1))
    return Scenario(
        catalog(plans=plans, accounts=[account], subscriptions=subscriptions, resources=resources),
        period,
        totals,
    )


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_an_invoice_is_the_exact_sum_of_its_once_rounded_lines(scenario: Scenario) -> None:
    invoice = rate_account_period(scenario.catalog, "acc", scenario.period, scenario.totals)

    assert invoice.subtotal_minor == sum(line.amount_minor for line in invoice.lines)
    assert invoice.total_minor == invoice.subtotal_minor
    doc = json.loads(invoice_to_json(invoice))
    assert doc["subtotal_minor"] == sum(line["amount_minor"] for line in doc["lines"])
    for line in invoice.lines:
        assert line.amount_minor == round_minor(line.amount_precise, line.currency)
        assert line.amount_precise >= 0
        assert scenario.period.start <= line.service_start < line.service_end
        assert line.service_end <= scenario.period.end
        plan = scenario.catalog.plans[line.plan_id]
        if line.kind is LineKind.HOURLY:
            assert plan.hourly is not None
            cap = plan.hourly.caps.get(line.currency)
            if cap is not None:
                assert line.amount_precise <= cap
            assert line.quantity * 3600 <= scenario.period.seconds + 3600
        if line.kind is LineKind.RECURRING:
            assert plan.recurring is not None
            assert line.amount_precise <= plan.recurring.fees[line.currency]
        if line.kind is LineKind.USAGE:
            assert line.quantity <= (line.usage_quantity or Decimal(0))


@settings(max_examples=75, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_closing_the_same_inputs_twice_gives_identical_json(
    scenario: Scenario, rnd: random.Random
) -> None:
    first = invoice_to_json(
        rate_account_period(scenario.catalog, "acc", scenario.period, scenario.totals)
    )

    def shuffled(mapping: Mapping[str, T]) -> dict[str, T]:
        items = list(mapping.items())
        rnd.shuffle(items)
        return dict(items)

    reordered = Catalog(
        meters=shuffled(scenario.catalog.meters),
        plans=shuffled(scenario.catalog.plans),
        accounts=shuffled(scenario.catalog.accounts),
        subscriptions=shuffled(scenario.catalog.subscriptions),
        resources=shuffled(scenario.catalog.resources),
    )
    totals = list(scenario.totals)
    rnd.shuffle(totals)

    second = invoice_to_json(rate_account_period(reordered, "acc", scenario.period, totals))

    assert second == first
