"""Discounts and commitments (BILLING-SEMANTICS §6), applied to an account's charge lines.

Everything here works on *rounded* charge lines in integer minor units: a discount takes
money off what the customer sees, so its parts add up exactly to the whole.

- A campaign's discount for a period is computed once over its scope (the charge lines it
  matches): a percentage of their rounded sum, rounded once; or a fixed amount, at most
  that sum (never below zero for its scope). It is then split across the scope's lines in
  proportion to their amounts by the largest-remainder method (:func:`allocate`), one
  negative ``discount`` line per charge line with a non-zero part, keyed
  ``{charge line key}/discount/{campaign id}``.
- Campaigns apply in id order; each sees the lines as the previous ones left them, so no
  line is ever discounted below zero.
- A minimum commitment tops the subtotal after discounts up with one ``commitment`` line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from invoicer.exact import fraction
from invoicer.invoice import InvoiceLine, LineKind
from invoicer.periods import BillingSchedule, Period
from rating.catalog import Account, Campaign, ChargeKind, DiscountKind, Subscription
from rating.money import exponent

CHARGE_KINDS = frozenset({LineKind.RECURRING, LineKind.HOURLY, LineKind.USAGE})


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` minor units in proportion to non-negative ``weights`` by the largest
    remainder: each part is the floor of its exact share, and the units left over go one
    each to the largest remainders (ties: the earlier weight). The parts sum to ``total``
    exactly, and no part exceeds its weight when ``total <= sum(weights)``."""
    if total < 0:
        raise ValueError(f"cannot allocate a negative total {total}")
    if any(w < 0 for w in weights):
        raise ValueError("weights must not be negative")
    whole = sum(weights)
    if total == 0:
        return [0] * len(weights)
    if whole == 0:
        raise ValueError(f"cannot allocate {total} over weights that sum to 0")
    floors = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    left = total - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def minor_to_decimal(amount_minor: int, currency: str) -> Decimal:
    return Decimal(amount_minor).scaleb(-exponent(currency))


def decimal_to_minor(amount: Decimal, currency: str) -> int:
    """An amount given at most at the currency's precision, in minor units (exact)."""
    scale: int = 10 ** exponent(currency)
    scaled = fraction(amount) * scale
    if scaled.denominator != 1:
        raise ValueError(f"{amount} {currency} has more decimals than {currency} has")
    return scaled.numerator


def _round_half_up(value: Fraction) -> int:
    """Half away from zero, to an integer."""
    sign = -1 if value < 0 else 1
    doubled = abs(value) * 2 + 1  # floor(|v| + 1/2) = floor((2|v| + 1) / 2)
    return sign * (doubled.numerator // (doubled.denominator * 2))


def in_scope(campaign: Campaign, line: InvoiceLine) -> bool:
    if line.kind not in CHARGE_KINDS:
        return False
    if campaign.plan_id is not None and line.plan_id != campaign.plan_id:
        return False
    if campaign.charge is not None and line.kind.value != ChargeKind(campaign.charge).value:
        return False
    return campaign.meter is None or line.meter == campaign.meter


def _in_range(instant: datetime, start: datetime | None, end: datetime | None) -> bool:
    return (start is None or start <= instant) and (end is None or instant < end)


def _period_index(schedule: BillingSchedule, subscription: Subscription, period: Period) -> int:
    """0 for the period the subscription starts in, 1 for the next, ..."""
    first = schedule.label_of(subscription.start)
    current = schedule.label_of(period.start)
    return (current[0] - first[0]) * 12 + (current[1] - first[1])


def applies(
    campaign: Campaign,
    account: Account,
    period: Period,
    line: InvoiceLine,
    subscriptions: Mapping[str, Subscription],
) -> bool:
    """Whether ``campaign`` discounts ``line`` of ``account`` in ``period``."""
    if campaign.accounts and account.id not in campaign.accounts:
        return False
    if not _in_range(period.start, campaign.start, campaign.end):
        return False
    if not in_scope(campaign, line):
        return False
    if campaign.first_periods is not None:
        subscription = subscriptions.get(line.subscription_id)
        if subscription is None:
            return False
        index = _period_index(BillingSchedule.of(account), subscription, period)
        if not 0 <= index < campaign.first_periods:
            return False
    return True


def discount_lines(
    campaigns: Sequence[Campaign],
    account: Account,
    period: Period,
    lines: Sequence[InvoiceLine],
    subscriptions: Mapping[str, Subscription],
) -> list[InvoiceLine]:
    """The negative lines of every campaign that applies to ``lines`` in ``period``."""
    currency = account.currency
    remaining = {line.key: line.amount_minor for line in lines}
    out: list[InvoiceLine] = []
    for campaign in sorted(campaigns, key=lambda c: c.id):
        scope = [
            line
            for line in sorted(lines, key=lambda x: x.key)
            if remaining[line.key] > 0 and applies(campaign, account, period, line, subscriptions)
        ]
        if not scope:
            continue
        weights = [remaining[line.key] for line in scope]
        base = sum(weights)
        if campaign.kind is DiscountKind.PERCENTAGE:
            total = _round_half_up(base * fraction(campaign.percent) / 100)
            what = f"{campaign.percent.normalize():f} %"
        else:
            amount = campaign.amounts.get(currency)
            if amount is None:
                continue  # validated at apply: the account is not one it names
            total = min(base, decimal_to_minor(amount, currency))
            what = f"{amount} {currency}"
        total = min(total, base)
        for line, part in zip(scope, allocate(total, weights), strict=True):
            if part == 0:
                continue
            remaining[line.key] -= part
            out.append(_discount_line(campaign, line, part, what, shared=len(scope) > 1))
    return out


def _discount_line(
    campaign: Campaign, line: InvoiceLine, part: int, what: str, *, shared: bool
) -> InvoiceLine:
    amount = minor_to_decimal(-part, line.currency)
    description = f"{campaign.name}: {what} off {line.description}"
    if shared and campaign.kind is DiscountKind.FIXED:
        description += " (share of the fixed amount, by largest remainder)"
    return InvoiceLine(
        key=f"{line.key}/discount/{campaign.id}",
        kind=LineKind.DISCOUNT,
        description=description,
        service_start=line.service_start,
        service_end=line.service_end,
        quantity=Decimal(1),
        unit="discount",
        unit_price=amount,
        amount_precise=amount,
        amount_minor=-part,
        currency=line.currency,
        subscription_id=line.subscription_id,
        plan_id=line.plan_id,
        meter=line.meter,
        resource_id=line.resource_id,
        tier=line.tier,
        applies_to=line.key,
    )


def commitment_line(
    account: Account, period: Period, key_prefix: str, subtotal_minor: int
) -> InvoiceLine | None:
    """The true-up bringing ``subtotal_minor`` (after discounts) up to the account's minimum
    commitment for the period, or None when it is met (or there is none)."""
    minimum = account.commitment.get(account.currency)
    if minimum is None:
        return None
    minimum_minor = decimal_to_minor(minimum, account.currency)
    shortfall = minimum_minor - subtotal_minor
    if shortfall <= 0:
        return None
    amount = minor_to_decimal(shortfall, account.currency)
    return InvoiceLine(
        key=f"{key_prefix}/commitment",
        kind=LineKind.COMMITMENT,
        description=(
            f"Minimum commitment {minimum} {account.currency}: true-up of the subtotal "
            f"{minor_to_decimal(subtotal_minor, account.currency)} after discounts"
        ),
        service_start=period.start,
        service_end=period.end,
        quantity=Decimal(1),
        unit="period",
        unit_price=amount,
        amount_precise=amount,
        amount_minor=shortfall,
        currency=account.currency,
        subscription_id="",
        plan_id="",
    )
