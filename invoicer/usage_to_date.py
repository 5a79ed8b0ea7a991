"""Usage to date (issue 3, item 8): each subscription's usage so far in the open period and
the provisional charges, for one account or one subscription. Read-only; nothing is saved.

The charges are ``invoicer.preview.preview_invoice``'s: the open period rated as if it closed
at ``now`` with the usage stored so far (recurring fees for the whole period, allowances and
tiers against the usage so far). A subscription's provisional charge is the sum of its lines
before tax; the preview's total (discounts, commitment and taxes included) is the account's.
Usage is per meter in base units, straight from the store's hourly rows of the period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from aggregation.ports import Store
from invoicer.documents import JsonValue, line_to_dict
from invoicer.invoice import Invoice, InvoiceLine, LineKind
from invoicer.lines import ChargeConfigurationError
from invoicer.periods import Period, format_instant, to_utc
from invoicer.preview import open_period, preview_invoice
from rating.catalog import Catalog
from rating.money import format_minor


@dataclass(frozen=True, slots=True)
class MeterUsage:
    meter: str
    base_unit: str  # "" when the catalog no longer knows the meter
    quantity: int  # sum over the period so far (0 for peak meters)
    quantity_max: int  # the largest hourly max (the peak, for peak meters)
    sample_count: int


@dataclass(frozen=True, slots=True)
class SubscriptionUsage:
    subscription_id: str
    plan_id: str
    meters: tuple[MeterUsage, ...]  # sorted by meter
    lines: tuple[InvoiceLine, ...]  # the provisional charges of this subscription
    provisional_minor: int  # sum of those lines before tax


@dataclass(frozen=True, slots=True)
class UsageToDate:
    account_id: str
    currency: str
    now: datetime
    period: Period  # the open period containing ``now``
    subscriptions: tuple[SubscriptionUsage, ...]  # sorted by id
    preview: Invoice  # the account's whole preview (discounts, taxes)


def usage_to_date(
    store: Store,
    catalog: Catalog,
    now: datetime,
    *,
    account_id: str | None = None,
    subscription_id: str | None = None,
) -> UsageToDate:
    """Usage and provisional charges in the open period at ``now``: of every subscription of
    ``account_id`` active in it, or of ``subscription_id`` alone (give exactly one)."""
    now = to_utc("now", now)
    if (account_id is None) == (subscription_id is None):
        raise ValueError("give an account or a subscription (exactly one)")
    if subscription_id is not None:
        subscription = catalog.subscriptions.get(subscription_id)
        if subscription is None:
            raise ChargeConfigurationError(f"unknown subscription {subscription_id!r}")
        account_id = subscription.account_id
    assert account_id is not None
    period = open_period(catalog, account_id, now)
    chosen = sorted(
        (
            s
            for s in catalog.subscriptions.values()
            if s.account_id == account_id
            and (subscription_id is None or s.id == subscription_id)
            and s.start < period.end
            and (s.end is None or s.end > period.start)
        ),
        key=lambda s: s.id,
    )
    ids = [s.id for s in chosen]
    totals = store.usage_totals(period.start, period.end, ids) if ids else []
    preview = preview_invoice(store, catalog, account_id, now)
    subscriptions: list[SubscriptionUsage] = []
    for subscription in chosen:
        meters = tuple(
            MeterUsage(
                t.meter,
                catalog.meters[t.meter].base_unit if t.meter in catalog.meters else "",
                t.quantity,
                t.quantity_max,
                t.sample_count,
            )
            for t in totals
            if t.subscription_id == subscription.id
        )
        lines = tuple(line for line in preview.lines if line.subscription_id == subscription.id)
        subscriptions.append(
            SubscriptionUsage(
                subscription.id,
                subscription.plan_id,
                meters,
                lines,
                sum(line.amount_minor for line in lines if line.kind is not LineKind.TAX),
            )
        )
    return UsageToDate(account_id, preview.currency, now, period, tuple(subscriptions), preview)


def usage_to_dict(usage: UsageToDate) -> dict[str, JsonValue]:
    """The JSON form: quantities and money as strings or integers, never floats."""
    currency = usage.currency
    return {
        "account_id": usage.account_id,
        "now": format_instant(usage.now),
        "period": {
            "start": format_instant(usage.period.start),
            "end": format_instant(usage.period.end),
            "timezone": usage.period.timezone,
        },
        "currency": currency,
        "subscriptions": [
            {
                "subscription_id": s.subscription_id,
                "plan_id": s.plan_id,
                "usage": [
                    {
                        "meter": m.meter,
                        "base_unit": m.base_unit,
                        "quantity": str(m.quantity),
                        "quantity_max": str(m.quantity_max),
                        "sample_count": m.sample_count,
                    }
                    for m in s.meters
                ],
                "provisional_minor": s.provisional_minor,
                "provisional": format_minor(s.provisional_minor, currency),
                "lines": [line_to_dict(line) for line in s.lines],
            }
            for s in usage.subscriptions
        ],
        "account_preview_total_minor": usage.preview.total_minor,
        "account_preview_total": format_minor(usage.preview.total_minor, currency),
    }


def usage_to_text(usage: UsageToDate) -> str:
    currency = usage.currency
    start, end = format_instant(usage.period.start), format_instant(usage.period.end)
    header = (
        f"Usage to date of account {usage.account_id} at {format_instant(usage.now)} "
        f"(period [{start}, {end}), still open; charges are provisional)"
    )
    out = [header]
    for s in usage.subscriptions:
        out.append(f"  subscription {s.subscription_id} (plan {s.plan_id})")
        if not s.meters:
            out.append("    no metered usage yet")
        out.extend(
            f"    {m.meter:<32} quantity {m.quantity} {m.base_unit}  max {m.quantity_max}"
            f"  samples {m.sample_count}"
            for m in s.meters
        )
        out.extend(
            f"    {format_minor(line.amount_minor, currency):>14} {currency}  {line.description}"
            for line in s.lines
        )
        out.append(
            f"    {format_minor(s.provisional_minor, currency):>14} {currency}  "
            "provisional charges (before tax)"
        )
    out.append(
        f"  account preview total (discounts and taxes included): "
        f"{format_minor(usage.preview.total_minor, currency)} {currency}"
    )
    return "\n".join(out)
