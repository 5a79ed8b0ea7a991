"""Period close: rate each account's calendar month into a draft invoice and save the drafts.

``rate_account_period`` is pure: catalog + period + usage totals -> ``Invoice``.
``close_period`` is the service around it: it checks that every account's period is closable
(end + grace has passed, BILLING-SEMANTICS §10), asks the store for the usage totals, and
saves all drafts in one call. Closing the same inputs twice saves the same bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from aggregation.ports import Store, StoredInvoice, UsageTotal
from invoicer.adjustments import reconcile
from invoicer.documents import to_stored_invoice
from invoicer.invoice import Invoice, InvoiceLine
from invoicer.lines import (
    ChargeConfigurationError,
    SubscriptionPeriod,
    hourly_lines,
    recurring_line,
    usage_lines,
)
from invoicer.periods import Period, account_period, format_instant, to_utc
from invoicer.totals import finish_invoice
from rating.catalog import DEFAULT_GRACE, Account, Catalog, Resource, Subscription


class PeriodNotClosableError(RuntimeError):
    """Some accounts' periods have not yet passed end + grace; nothing was changed."""

    def __init__(
        self, label: str, now: datetime, pending: Sequence[tuple[str, Period, datetime]]
    ) -> None:
        self.label = label
        self.now = now
        self.pending = tuple(pending)  # (account id, its period, closable from)
        details = "; ".join(
            f"{account_id} closable from {format_instant(closable)} "
            f"(period ends {format_instant(period.end)} in {period.timezone}, grace "
            f"{_duration_text(closable - period.end)})"
            for account_id, period, closable in self.pending
        )
        super().__init__(
            f"period {label} cannot be closed yet at {format_instant(now)}; nothing was "
            f"changed: {details}"
        )


@dataclass(frozen=True, slots=True)
class CloseResult:
    label: str  # "2026-10"
    invoices: tuple[Invoice, ...]  # sorted by key
    stored: tuple[StoredInvoice, ...]  # as saved, same order
    untouched: tuple[str, ...] = ()  # issued invoices left as they are (see adjustments.py)


def _duration_text(delta: timedelta) -> str:
    seconds = delta // timedelta(seconds=1)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours} h"
    if minutes or secs:
        text += f" {minutes} min"
    if secs:
        text += f" {secs} s"
    return text


def _account(catalog: Catalog, account_id: str) -> Account:
    try:
        return catalog.accounts[account_id]
    except KeyError:
        raise ChargeConfigurationError(f"unknown account {account_id!r}") from None


@dataclass(frozen=True, slots=True)
class CatalogIndex:
    """Who owns what in a catalog, built once per close (not once per account)."""

    subscriptions_by_account: Mapping[str, tuple[Subscription, ...]]  # sorted by id
    resources_by_subscription: Mapping[str, tuple[Resource, ...]]  # sorted by id

    @classmethod
    def of(cls, catalog: Catalog) -> CatalogIndex:
        subscriptions: dict[str, list[Subscription]] = defaultdict(list)
        for subscription in catalog.subscriptions.values():
            subscriptions[subscription.account_id].append(subscription)
        resources: dict[str, list[Resource]] = defaultdict(list)
        for resource in catalog.resources.values():
            resources[resource.subscription_id].append(resource)
        return cls(
            {k: tuple(sorted(v, key=lambda s: s.id)) for k, v in subscriptions.items()},
            {k: tuple(sorted(v, key=lambda r: r.id)) for k, v in resources.items()},
        )

    def subscriptions(self, account_id: str) -> tuple[Subscription, ...]:
        return self.subscriptions_by_account.get(account_id, ())

    def resources(self, subscription_id: str) -> tuple[Resource, ...]:
        return self.resources_by_subscription.get(subscription_id, ())


def closable_at(
    catalog: Catalog, account_id: str, period: Period, index: CatalogIndex | None = None
) -> datetime:
    """``period.end`` + the largest grace of the meters the account's plans price (2 h when
    they price none)."""
    index = index or CatalogIndex.of(catalog)
    graces: list[timedelta] = []
    for subscription in index.subscriptions(account_id):
        plan = catalog.plans.get(subscription.plan_id)
        if plan is None:
            continue  # reported by rate_account_period
        graces.extend(
            catalog.meters[u.meter].grace for u in plan.usage if u.meter in catalog.meters
        )
    return period.end + max(graces, default=DEFAULT_GRACE)


def _usage_index(
    subscription_ids: set[str], usage_totals: Iterable[UsageTotal]
) -> dict[tuple[str, str], UsageTotal]:
    index: dict[tuple[str, str], UsageTotal] = {}
    for total in usage_totals:
        if total.subscription_id not in subscription_ids:
            continue  # another account's usage
        pair = (total.subscription_id, total.meter)
        if pair in index:
            raise ValueError(
                f"usage total for subscription {pair[0]!r}, meter {pair[1]!r} given twice"
            )
        index[pair] = total
    return index


def rate_account_period(
    catalog: Catalog,
    account_id: str,
    period: Period,
    usage_totals: Iterable[UsageTotal],
    index: CatalogIndex | None = None,
) -> Invoice:
    """The account's draft invoice for ``period`` (pure).

    ``usage_totals`` are the period's totals per (subscription, meter); totals of other
    accounts' subscriptions and of meters the plan does not price are ignored. ``index``
    (``CatalogIndex.of(catalog)``) saves rebuilding it when rating many accounts.
    """
    account = _account(catalog, account_id)
    index = index or CatalogIndex.of(catalog)
    subscriptions = index.subscriptions(account_id)
    usage = _usage_index({s.id for s in subscriptions}, usage_totals)

    lines: list[InvoiceLine] = []
    for subscription in subscriptions:
        plan = catalog.plans.get(subscription.plan_id)
        if plan is None:
            raise ChargeConfigurationError(
                f"subscription {subscription.id!r} refers to unknown plan {subscription.plan_id!r}"
            )
        plan = account.plan_for(plan)  # the account's contract prices, if any
        sp = SubscriptionPeriod(account, subscription, plan, period)
        if plan.recurring is not None:
            line = recurring_line(sp, plan.recurring)
            if line is not None:
                lines.append(line)
        if plan.hourly is not None:
            lines.extend(hourly_lines(sp, plan.hourly, index.resources(subscription.id)))
        for charge in plan.usage:
            total = usage.get((subscription.id, charge.meter))
            if total is None:
                continue
            meter = catalog.meters.get(charge.meter)
            if meter is None:
                raise ChargeConfigurationError(
                    f"plan {plan.id!r} prices unknown meter {charge.meter!r}"
                )
            lines.extend(usage_lines(sp, charge, meter, total))
    return finish_invoice(catalog, account, period, lines, subscriptions)


def _has_business(subscriptions: Iterable[Subscription], period: Period, invoice: Invoice) -> bool:
    """An account gets a draft when it has lines or a subscription active in the period."""
    if invoice.lines:
        return True
    return any(period.overlap_us(s.start, s.end) > 0 for s in subscriptions)


def close_period(
    store: Store, catalog: Catalog, year: int, month: int, now: datetime
) -> CloseResult:
    """Close calendar month ``year-month`` for every account, each in its own timezone.

    Refuses with ``PeriodNotClosableError`` (saving nothing) when any account's period end +
    grace is still ahead of ``now``. Saves every draft in one ``save_invoices`` call;
    accounts with nothing active and no usage in the period get no draft.
    """
    now = to_utc("now", now)
    label = f"{year:04d}-{month:02d}"
    accounts = sorted(catalog.accounts.values(), key=lambda a: a.id)
    periods = {a.id: account_period(a, year, month) for a in accounts}

    index = CatalogIndex.of(catalog)
    pending = []
    for account in accounts:
        period = periods[account.id]
        closable = closable_at(catalog, account.id, period, index)
        if now < closable:
            pending.append((account.id, period, closable))
    if pending:
        raise PeriodNotClosableError(label, now, pending)

    by_period: dict[Period, list[Account]] = defaultdict(list)
    for account in accounts:
        by_period[periods[account.id]].append(account)

    invoices: list[Invoice] = []
    for period, group in sorted(by_period.items(), key=lambda item: item[0].start):
        subscription_ids = sorted(s.id for a in group for s in index.subscriptions(a.id))
        totals_by_subscription: dict[str, list[UsageTotal]] = defaultdict(list)
        if subscription_ids:
            for total in store.usage_totals(period.start, period.end, subscription_ids):
                totals_by_subscription[total.subscription_id].append(total)
        for account in group:
            subscriptions = index.subscriptions(account.id)
            totals = [t for s in subscriptions for t in totals_by_subscription.get(s.id, ())]
            invoice = rate_account_period(catalog, account.id, period, totals, index)
            if _has_business(subscriptions, period, invoice):
                invoices.append(invoice)

    invoices.sort(key=lambda i: i.key)
    # Issued invoices stay as they are; changes to their periods become adjustment drafts.
    invoices, untouched = _with_adjustments(store, catalog, invoices, set(periods.values()), now)
    stored = tuple(to_stored_invoice(i) for i in invoices)
    if stored:
        store.save_invoices(stored)
    return CloseResult(label=label, invoices=tuple(invoices), stored=stored, untouched=untouched)


# -- lifecycle: late usage after issue (invoicer/adjustments.py) -------------------------------

# Issued invoices whose period ended within the meters' largest max lateness plus this margin
# are re-rated by every close (a monthly close must see usage that arrived up to the last day).
ADJUSTMENT_LOOKBACK_MARGIN = timedelta(days=45)


def rerate_periods(
    store: Store,
    catalog: Catalog,
    requests: Sequence[tuple[str, Period]],
    index: CatalogIndex | None = None,
) -> list[Invoice | None]:
    """The fresh draft of each (account, period), or None where the account has no
    business in it; one usage query per distinct period."""
    index = index or CatalogIndex.of(catalog)
    totals: dict[Period, dict[str, list[UsageTotal]]] = {}
    for period in sorted({p for _, p in requests}, key=lambda p: (p.start, p.end, p.timezone)):
        ids = sorted({s.id for a, q in requests if q == period for s in index.subscriptions(a)})
        by_subscription: dict[str, list[UsageTotal]] = defaultdict(list)
        if ids:
            for total in store.usage_totals(period.start, period.end, ids):
                by_subscription[total.subscription_id].append(total)
        totals[period] = by_subscription
    out: list[Invoice | None] = []
    for account_id, period in requests:
        subscriptions = index.subscriptions(account_id)
        usage = [t for s in subscriptions for t in totals[period].get(s.id, ())]
        invoice = rate_account_period(catalog, account_id, period, usage, index)
        out.append(invoice if _has_business(subscriptions, period, invoice) else None)
    return out


def _with_adjustments(
    store: Store, catalog: Catalog, invoices: list[Invoice], periods: set[Period], now: datetime
) -> tuple[list[Invoice], tuple[str, ...]]:
    lateness = max((m.max_lateness for m in catalog.meters.values()), default=timedelta(0))
    # Only issued invoices matter (drafts are simply replaced): those of the periods closed
    # now, and those that ended within the lookback window.
    since = min([now - lateness - ADJUSTMENT_LOOKBACK_MARGIN, *(p.start for p in periods)])
    existing = store.load_invoices_ending_after(since, status="issued")
    # An account no longer in the catalog cannot be re-rated: its invoices are left alone.
    known = [s for s in existing if s.account_id in catalog.accounts]
    index = CatalogIndex.of(catalog)
    saved, untouched, obsolete = reconcile(
        invoices, known, lambda requests: rerate_periods(store, catalog, requests, index)
    )
    store.delete_drafts(obsolete)
    return saved, tuple(untouched)
