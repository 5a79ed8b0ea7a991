"""The charges of one subscription in one period, each as an exactly computed, once-rounded line.

Scalar code on purpose: a handful of lines per subscription, each in exact ``Fraction``s until
``invoicer.exact`` renders it (BILLING-SEMANTICS §3-§5, §10 "Rounding").

- recurring: fee x active seconds / period seconds (R1);
- hourly, per resource: ceil(active seconds / 3600) started hours x rate, then the plan's cap
  for the currency, if any (H1, H2);
- usage, per meter priced by the plan: the period quantity in display units, minus the
  included allowance prorated like the fee, times the unit price (never below zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from aggregation.ports import UsageTotal
from invoicer.exact import decimal_text, fraction, minor_units, money_text, truncate
from invoicer.invoice import InvoiceLine, LineKind, line_key
from invoicer.periods import Period, to_utc
from rating.catalog import (
    Account,
    HourlyCharge,
    Meter,
    MeterKind,
    Plan,
    PlanSegment,
    PricingModel,
    RecurringCharge,
    Resource,
    Span,
    Subscription,
    Tier,
    UsageCharge,
)

US_PER_HOUR = 3_600 * 1_000_000
_ONE_US = timedelta(microseconds=1)


class ChargeConfigurationError(ValueError):
    """The catalog cannot price a charge (e.g. no price in the account's currency).

    BILLING-SEMANTICS §1: a missing price is a configuration error, never a silent zero.
    """


@dataclass(frozen=True, slots=True)
class SubscriptionPeriod:
    """One subscription of an account seen through one billing period."""

    account: Account
    subscription: Subscription
    plan: Plan
    period: Period
    # The plan segment seen, when the subscription has several in the period: then the
    # active range is the segment's, and line keys carry ``@{segment start in the period}``.
    segment: PlanSegment | None = None

    @property
    def currency(self) -> str:
        return self.account.currency

    @property
    def _bounds(self) -> tuple[datetime, datetime | None]:
        if self.segment is None:
            return self.subscription.start, self.subscription.end
        return self.segment.start, self.segment.end

    @property
    def active_range(self) -> tuple[datetime, datetime] | None:
        """The subscription's (or segment's) [start, end) clipped to the period, or None."""
        return self.period.clip(*self._bounds)

    @property
    def active_us(self) -> int:
        return self.period.overlap_us(*self._bounds)

    @property
    def active_fraction(self) -> Fraction:
        """Active share of the period: prorates the fee and the allowance alike."""
        return Fraction(self.active_us, self.period.microseconds)

    @property
    def service_period(self) -> tuple[datetime, datetime]:
        """The lines' service period: the active range, or the whole period for usage of a
        subscription that was not active in it (late usage stays visible, never lost)."""
        return self.active_range or (self.period.start, self.period.end)

    def key(self, charge: str, detail: str | None = None) -> str:
        owner = self.subscription.id
        if self.segment is not None:
            owner += "@" + segment_stamp(self.service_period[0])
        return line_key(self.account.id, self.period, owner, charge, detail)

    def price(self, prices: Mapping[str, Decimal], what: str) -> Fraction:
        """The charge's price in the account's currency, or a configuration error."""
        try:
            value = prices[self.currency]
        except KeyError:
            raise ChargeConfigurationError(
                f"plan {self.plan.id!r}: {what} has no {self.currency} price "
                f"(account {self.account.id!r}, subscription {self.subscription.id!r}); "
                f"priced in {', '.join(sorted(prices)) or 'no currency'}"
            ) from None
        return fraction(value)


def segment_stamp(instant: datetime) -> str:
    """``20261015T1200Z`` (seconds and microseconds only when not zero): distinguishes the
    line keys of a subscription's plan segments in one period."""
    instant = to_utc("segment start", instant)
    stamp = f"{instant:%Y%m%dT%H%M}"
    if instant.second or instant.microsecond:
        stamp += f"{instant:%S}"
    if instant.microsecond:
        stamp += f".{instant:%f}"
    return stamp + "Z"


def segments_in(subscription: Subscription, period: Period) -> tuple[PlanSegment, ...]:
    """The subscription's plan segments active in ``period``, in order. When none is (late
    usage of a subscription not active in the period), the one segment nearest to it: the
    last that starts before the period ends, or else the first."""
    segments = subscription.segments()
    active = tuple(s for s in segments if period.overlap_us(s.start, s.end) > 0)
    if active:
        return active
    before = [s for s in segments if s.start < period.end]
    return (before[-1] if before else segments[0],)


def usage_windows(
    segments: Sequence[PlanSegment], period: Period
) -> list[tuple[datetime, datetime]]:
    """The hour-start windows whose usage buckets each segment bills: a bucket belongs to
    the segment its ``hour_start`` is in (a change mid-hour bills that hour on the earlier
    plan); the first window starts with the period and the last ends with it, so the
    windows tile the period and no bucket is lost."""
    cuts = [s.start for s in segments[1:]]
    starts = [period.start, *cuts]
    ends = [*cuts, period.end]
    return list(zip(starts, ends, strict=True))


# -- pure arithmetic --------------------------------------------------------------------------


def prorate(amount: Fraction, active_us: int, period_us: int) -> Fraction:
    """``amount x active / period``, exact (R1: 12.00 x 505 h / 745 h)."""
    if period_us <= 0:
        raise ValueError("a period lasts longer than zero")
    if not 0 <= active_us <= period_us:
        raise ValueError(f"active time {active_us} us is outside 0..{period_us} us")
    return amount * Fraction(active_us, period_us)


def billable_hours(active_us: int) -> int:
    """Started hours: ceil(active time / 1 h) (H1: 165,000 s -> 46)."""
    if active_us < 0:
        raise ValueError(f"active time {active_us} us is negative")
    return -(-active_us // US_PER_HOUR)


def capped(amount: Fraction, cap: Fraction | None) -> Fraction:
    return amount if cap is None else min(amount, cap)


def merged_active_us(
    spans: Iterable[Span], window_start: datetime, window_end: datetime, where: str
) -> int:
    """Microseconds covered by the union of ``spans`` inside [window_start, window_end).

    Overlapping spans count once: a resource is never billed twice for the same instant.
    """
    clipped: list[tuple[datetime, datetime]] = []
    for span in spans:
        start = to_utc(f"{where} span start", span.start)
        end = None if span.end is None else to_utc(f"{where} span end", span.end)
        if end is not None and end < start:
            raise ChargeConfigurationError(
                f"{where}: span [{start.isoformat()}, {end.isoformat()}) ends before it starts"
            )
        lo = max(start, window_start)
        hi = window_end if end is None else min(end, window_end)
        if lo < hi:
            clipped.append((lo, hi))
    total_us = 0
    covered_until: datetime | None = None
    for lo, hi in sorted(clipped):
        start = lo if covered_until is None else max(lo, covered_until)
        if start < hi:
            total_us += (hi - start) // _ONE_US
            covered_until = hi
    return total_us


def display_quantity(meter: Meter, total: UsageTotal, period: Period) -> Fraction:
    """The period quantity in the meter's display unit, exact.

    counter: sum / base_per_display (bytes -> GB); gauge: base-unit-seconds /
    (base_per_display x period seconds) (byte-seconds -> GiB-month); peak: max level /
    base_per_display.
    """
    if meter.kind is MeterKind.COUNTER:
        return Fraction(total.quantity, meter.base_per_display)
    if meter.kind is MeterKind.GAUGE:
        return Fraction(total.quantity, meter.base_per_display * period.seconds)
    if meter.kind is MeterKind.PEAK:
        return Fraction(total.quantity_max, meter.base_per_display)
    raise ChargeConfigurationError(f"meter {meter.name!r}: unknown kind {meter.kind!r}")


def billable_quantity(used: Fraction, included: Fraction) -> Fraction:
    """Usage beyond the allowance, never below zero."""
    return max(Fraction(0), used - included)


# -- lines ------------------------------------------------------------------------------------


def _line(
    sp: SubscriptionPeriod,
    *,
    key: str,
    kind: LineKind,
    description: str,
    quantity: Fraction,
    unit: str,
    unit_price: Fraction,
    amount: Fraction,
    meter: str | None = None,
    resource_id: str | None = None,
    usage_quantity: Fraction | None = None,
    included_quantity: Fraction | None = None,
    cap: Fraction | None = None,
    tier: int | None = None,
    service: tuple[datetime, datetime] | None = None,
) -> InvoiceLine:
    precise = truncate(amount)
    start, end = service or sp.service_period
    return InvoiceLine(
        key=key,
        kind=kind,
        description=description,
        service_start=start,
        service_end=end,
        quantity=truncate(quantity),
        unit=unit,
        unit_price=truncate(unit_price),
        amount_precise=precise,
        amount_minor=minor_units(precise, sp.currency, f"line {key}"),
        currency=sp.currency,
        subscription_id=sp.subscription.id,
        plan_id=sp.plan.id,
        meter=meter,
        resource_id=resource_id,
        usage_quantity=None if usage_quantity is None else truncate(usage_quantity),
        included_quantity=None if included_quantity is None else truncate(included_quantity),
        cap=None if cap is None else truncate(cap),
        tier=tier,
    )


def _hours_text(us: int) -> str:
    hours = Fraction(us, US_PER_HOUR)
    return f"{decimal_text(truncate(hours, 4))} h"


def recurring_line(sp: SubscriptionPeriod, charge: RecurringCharge) -> InvoiceLine | None:
    """The period's fee, prorated by active seconds; None when not active in the period."""
    active_us = sp.active_us
    if active_us == 0:
        return None
    fee = sp.price(charge.fees, "recurring fee")
    period_us = sp.period.microseconds
    share = Fraction(active_us, period_us)
    description = f"{sp.plan.name}: recurring fee"
    if share != 1:
        description += f", prorated {_hours_text(active_us)} of {_hours_text(period_us)}"
    return _line(
        sp,
        key=sp.key("recurring"),
        kind=LineKind.RECURRING,
        description=description,
        quantity=share,
        unit="month",
        unit_price=fee,
        amount=prorate(fee, active_us, period_us),
    )


def hourly_lines(
    sp: SubscriptionPeriod, charge: HourlyCharge, resources: Sequence[Resource]
) -> list[InvoiceLine]:
    """One line per resource with started hours in the subscription's active range."""
    window = sp.active_range
    if window is None:
        return []
    rate = sp.price(charge.rates, "hourly rate")
    cap = fraction(charge.caps[sp.currency]) if sp.currency in charge.caps else None
    lines: list[InvoiceLine] = []
    for resource in sorted(resources, key=lambda r: r.id):
        active_us = merged_active_us(resource.spans, *window, where=f"resource {resource.id!r}")
        hours = billable_hours(active_us)
        if hours == 0:
            continue
        uncapped = rate * hours
        amount = capped(uncapped, cap)
        limited = cap is not None and amount < uncapped
        description = f"{sp.plan.name}: {resource.kind} {resource.id}, {hours} started hours"
        if limited:
            description += f", capped at {money_text(truncate(amount), sp.currency)}"
        lines.append(
            _line(
                sp,
                key=sp.key("hourly", resource.id),
                kind=LineKind.HOURLY,
                description=description,
                quantity=Fraction(hours),
                unit="hour",
                unit_price=rate,
                amount=amount,
                resource_id=resource.id,
                cap=cap if limited else None,
            )
        )
    return lines


def resource_hourly_lines(
    sp: SubscriptionPeriod,
    resources: Sequence[Resource],
    owner: Callable[[Resource, Span], tuple[str, str]],
    plan_for: Callable[[str], Plan],
) -> list[InvoiceLine]:
    """Hourly lines per resource and plan (BILLING-SEMANTICS §3): the resource's spans that
    belong to ``sp.subscription`` (``owner(resource, span)`` -> (subscription, plan), e.g.
    ``Catalog.span_owner``) are grouped by plan; each plan's spans are summed inside the
    subscription's active range, counted in started hours and capped on that plan
    (``plan_for(plan id)``, contract prices applied). A plan without an hourly charge bills
    nothing. When a resource has hours on several plans (a resize), each line's key ends in
    ``/{resource}@{plan}`` and its service period is the hull of that plan's spans;
    otherwise the key and service period are those of a plain hourly line."""
    window = sp.active_range
    if window is None:
        return []
    lines: list[InvoiceLine] = []
    for resource in sorted(resources, key=lambda r: r.id):
        by_plan: dict[str, list[Span]] = {}
        for span in resource.spans:
            subscription_id, plan_id = owner(resource, span)
            if subscription_id == sp.subscription.id:
                by_plan.setdefault(plan_id, []).append(span)
        found: list[tuple[SubscriptionPeriod, HourlyCharge, int, tuple[datetime, datetime]]] = []
        for plan_id in sorted(by_plan):
            plan = plan_for(plan_id)
            if plan.hourly is None:
                continue
            spans = by_plan[plan_id]
            where = f"resource {resource.id!r} on plan {plan_id!r}"
            hours = billable_hours(merged_active_us(spans, *window, where=where))
            if hours == 0:
                continue
            clipped = [
                (max(s.start, window[0]), window[1] if s.end is None else min(s.end, window[1]))
                for s in spans
            ]
            hull = (
                min(lo for lo, hi in clipped if lo < hi),
                max(hi for lo, hi in clipped if lo < hi),
            )
            found.append((replace(sp, plan=plan), plan.hourly, hours, hull))
        several = len(found) > 1
        for psp, charge, hours, hull in found:
            detail = f"{resource.id}@{psp.plan.id}" if several else resource.id
            lines.append(
                _hourly_line(
                    psp, charge, resource, hours, detail=detail, service=hull if several else None
                )
            )
    return lines


def _hourly_line(
    sp: SubscriptionPeriod,
    charge: HourlyCharge,
    resource: Resource,
    hours: int,
    *,
    detail: str,
    service: tuple[datetime, datetime] | None,
) -> InvoiceLine:
    rate = sp.price(charge.rates, "hourly rate")
    cap = fraction(charge.caps[sp.currency]) if sp.currency in charge.caps else None
    uncapped = rate * hours
    amount = capped(uncapped, cap)
    limited = cap is not None and amount < uncapped
    description = f"{sp.plan.name}: {resource.kind} {resource.id}, {hours} started hours"
    if limited:
        description += f", capped at {money_text(truncate(amount), sp.currency)}"
    return _line(
        sp,
        key=sp.key("hourly", detail),
        kind=LineKind.HOURLY,
        description=description,
        quantity=Fraction(hours),
        unit="hour",
        unit_price=rate,
        amount=amount,
        resource_id=resource.id,
        cap=cap if limited else None,
        service=service,
    )


def usage_line(
    sp: SubscriptionPeriod, charge: UsageCharge, meter: Meter, total: UsageTotal
) -> InvoiceLine:
    """Per-unit usage beyond the prorated allowance; a zero line when all of it is included
    (finance sees included usage)."""
    unit_price = sp.price(charge.unit_prices, f"usage of {charge.meter}")
    used = display_quantity(meter, total, sp.period)
    included = fraction(charge.included) * sp.active_fraction
    billable = billable_quantity(used, included)
    unit = meter.display_unit
    description = f"{sp.plan.name}: {meter.name}, {decimal_text(truncate(used, 6))} {unit} used"
    if included:
        description += f", {decimal_text(truncate(included, 6))} {unit} included"
    return _line(
        sp,
        key=sp.key("usage", meter.name),
        kind=LineKind.USAGE,
        description=description,
        quantity=billable,
        unit=unit,
        unit_price=unit_price,
        amount=billable * unit_price,
        meter=meter.name,
        usage_quantity=used,
        included_quantity=included,
    )


# -- pricing models (BILLING-SEMANTICS §5) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class TierSlice:
    """The part of a billable quantity priced at one tier."""

    tier: int  # 1-based
    lower: Fraction  # prorated bound the tier starts above
    upper: Fraction | None  # prorated inclusive bound; None = unbounded
    quantity: Fraction
    unit_price: Fraction


def prorated_bounds(tiers: Sequence[Tier], share: Fraction) -> list[Fraction | None]:
    """Each tier's ``up_to`` x the active share (§5: tier bounds prorate like the fee)."""
    return [None if t.up_to is None else fraction(t.up_to) * share for t in tiers]


def graduated_slices(
    billable: Fraction, bounds: Sequence[Fraction | None], prices: Sequence[Fraction]
) -> list[TierSlice]:
    """Every tier's share of ``billable``: units up to the first bound at its price, the
    next ones at the next tier's, ... (U1). Tiers beyond the quantity get 0."""
    slices: list[TierSlice] = []
    lower = Fraction(0)
    for i, (upper, price) in enumerate(zip(bounds, prices, strict=True)):
        top = billable if upper is None else min(billable, upper)
        slices.append(TierSlice(i + 1, lower, upper, max(Fraction(0), top - lower), price))
        if upper is None:
            break
        lower = upper
    return slices


def volume_tier(billable: Fraction, bounds: Sequence[Fraction | None]) -> int:
    """The 0-based tier the whole quantity falls in: the first whose (inclusive) bound
    it does not exceed (U2: peak 6 with 1-4, 5+ -> the second)."""
    for i, upper in enumerate(bounds):
        if upper is None or billable <= upper:
            return i
    raise ChargeConfigurationError("the last tier must be unbounded")


def package_blocks(billable: Fraction, size: Fraction) -> int:
    """Started blocks: ceil(billable / size) (U4: 250.3 GB / 100 GB -> 3)."""
    if size <= 0:
        raise ChargeConfigurationError(f"package size {size} must be above 0")
    blocks = billable / size
    return -(-blocks.numerator // blocks.denominator)


def usage_lines(
    sp: SubscriptionPeriod, charge: UsageCharge, meter: Meter, total: UsageTotal
) -> list[InvoiceLine]:
    """The usage charge's lines under its pricing model: ``per_unit`` and ``volume`` and
    ``package`` one line; ``graduated`` one line per tier (the first always, the others
    when they hold quantity), keys ending in ``/tier-N``."""
    if charge.model is PricingModel.PER_UNIT:
        return [usage_line(sp, charge, meter, total)]
    used = display_quantity(meter, total, sp.period)
    share = sp.active_fraction
    included = fraction(charge.included) * share
    billable = billable_quantity(used, included)
    unit = meter.display_unit
    what = f"usage of {charge.meter}"
    base = f"{sp.plan.name}: {meter.name}, {decimal_text(truncate(used, 6))} {unit} used"
    if included:
        base += f", {decimal_text(truncate(included, 6))} {unit} included"
    if charge.model is PricingModel.PACKAGE:
        if charge.package is None:
            raise ChargeConfigurationError(f"plan {sp.plan.id!r}: {what} has no package")
        price = sp.price(charge.package.prices, f"{what} (package price)")
        size = fraction(charge.package.size)
        blocks = package_blocks(billable, size)
        size_text = f"{decimal_text(charge.package.size)} {unit}"
        return [
            _line(
                sp,
                key=sp.key("usage", meter.name),
                kind=LineKind.USAGE,
                description=f"{base}, {blocks} started blocks of {size_text}",
                quantity=Fraction(blocks),
                unit=f"block of {size_text}",
                unit_price=price,
                amount=price * blocks,
                meter=meter.name,
                usage_quantity=used,
                included_quantity=included,
            )
        ]
    if not charge.tiers:
        raise ChargeConfigurationError(f"plan {sp.plan.id!r}: {what} has no tiers")
    prices = [sp.price(t.unit_prices, f"{what} tier {i + 1}") for i, t in enumerate(charge.tiers)]
    bounds = prorated_bounds(charge.tiers, share)
    if charge.model is PricingModel.VOLUME:
        i = volume_tier(billable, bounds)
        return [
            _line(
                sp,
                key=sp.key("usage", meter.name),
                kind=LineKind.USAGE,
                description=f"{base}, all {decimal_text(truncate(billable, 6))} {unit} at tier "
                f"{i + 1}{_bound_text(bounds[i - 1] if i else None, bounds[i])}",
                quantity=billable,
                unit=unit,
                unit_price=prices[i],
                amount=billable * prices[i],
                meter=meter.name,
                usage_quantity=used,
                included_quantity=included,
                tier=i + 1,
            )
        ]
    lines: list[InvoiceLine] = []
    for piece in graduated_slices(billable, bounds, prices):
        if piece.tier > 1 and piece.quantity == 0:
            continue
        lines.append(
            _line(
                sp,
                key=sp.key("usage", f"{meter.name}/tier-{piece.tier}"),
                kind=LineKind.USAGE,
                description=f"{base}; tier {piece.tier}"
                f"{_bound_text(piece.lower if piece.tier > 1 else None, piece.upper)}",
                quantity=piece.quantity,
                unit=unit,
                unit_price=piece.unit_price,
                amount=piece.quantity * piece.unit_price,
                meter=meter.name,
                usage_quantity=used,
                included_quantity=included,
                tier=piece.tier,
            )
        )
    return lines


def _bound_text(lower: Fraction | None, upper: Fraction | None) -> str:
    def text(value: Fraction) -> str:
        return decimal_text(truncate(value, 6))

    if lower is None and upper is None:
        return ""
    if lower is None:
        assert upper is not None
        return f" (up to {text(upper)})"
    if upper is None:
        return f" (above {text(lower)})"
    return f" (above {text(lower)} up to {text(upper)})"
