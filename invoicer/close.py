"""Period close: rate each account's calendar month into a draft invoice and save the drafts.

``rate_account_period`` is pure: catalog + period + usage totals -> ``Invoice``.
``close_period`` is the service around it: it checks that every account's period is closable
(end + grace has passed, BILLING-SEMANTICS §10), asks the store for the usage totals, and
saves all drafts in one call. Closing the same inputs twice saves the same bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial

from aggregation.ports import Store, StoredInvoice, UsageTotal
from invoicer.adjustments import reconcile
from invoicer.batch import gc_paused
from invoicer.consolidation import BillingGraph
from invoicer.documents import to_stored_invoice
from invoicer.invoice import Invoice, InvoiceLine
from invoicer.lines import (
    ChargeConfigurationError,
    SubscriptionPeriod,
    display_quantity,
    recurring_line,
    resource_hourly_lines,
    segments_in,
    usage_lines,
    usage_windows,
)
from invoicer.periods import BillingSchedule, Period, format_instant, to_utc
from invoicer.rules import Exclusion, RuledUsage, mark_excluded, usage_with_rules
from invoicer.sharding import NEEDS_PARENT, NeedsParent, rate_sharded
from invoicer.store_spans import catalog_with_store_spans
from invoicer.totals import finish_invoice
from rating.catalog import DEFAULT_GRACE, Account, Catalog, Plan, Resource, Subscription


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
            # Its own subscription, and every subscription a span moves it to.
            owners = {resource.subscription_id, *map(resource.span_subscription, resource.spans)}
            for owner in owners:
                resources[owner].append(resource)
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
        for plan_id in subscription.plan_ids():
            plan = catalog.plans.get(plan_id)
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
    *,
    exclusions: Mapping[tuple[str, str], Exclusion] | None = None,
    segment_usage: UsageFetch | None = None,
) -> Invoice:
    """The account's draft invoice for ``period`` (pure).

    ``usage_totals`` are the period's totals per (subscription, meter); totals of other
    accounts' subscriptions and of meters the plan does not price are ignored. ``index``
    (``CatalogIndex.of(catalog)``) saves rebuilding it when rating many accounts.
    ``exclusions`` (``invoicer.rules.usage_with_rules``): where billing rules made usage
    non-billable, ``usage_totals`` hold the billable part and the lines show the rest.
    ``segment_usage`` (``segment_usage_of(store, catalog)``) is asked for the usage of each
    plan segment of a subscription that has several in the period (required then).
    """
    account = _account(catalog, account_id)
    index = index or CatalogIndex.of(catalog)
    subscriptions = index.subscriptions(account_id)
    usage = _usage_index({s.id for s in subscriptions}, usage_totals)

    lines: list[InvoiceLine] = []
    for subscription in subscriptions:
        # Plan segments (BILLING-SEMANTICS §3-§5): recurring and usage per segment, each
        # prorated by the segment's share; usage buckets by the segment of their hour start.
        segments = segments_in(subscription, period)
        several = len(segments) > 1
        for segment, (lo, hi) in zip(segments, usage_windows(segments, period), strict=True):
            plan = _plan(catalog, account, subscription, segment.plan_id)
            sp = SubscriptionPeriod(
                account, subscription, plan, period, segment if several else None
            )
            if plan.recurring is not None:
                line = recurring_line(sp, plan.recurring)
                if line is not None:
                    lines.append(line)
            segment_totals = usage
            segment_exclusions: Mapping[tuple[str, str], Exclusion] = exclusions or {}
            if several:
                if segment_usage is None:
                    raise ChargeConfigurationError(
                        f"subscription {subscription.id!r} has {len(segments)} plan segments "
                        f"in {period.start.isoformat()}..{period.end.isoformat()}: pass "
                        "segment_usage to rate its usage per segment"
                    )
                fetched = segment_usage(lo, hi, [subscription.id])
                if isinstance(fetched, RuledUsage):  # billing rules (§8) shown per segment
                    segment_exclusions = fetched.exclusions
                    fetched = fetched.totals
                segment_totals = _usage_index({subscription.id}, fetched)
            for charge in plan.usage:
                total = segment_totals.get((subscription.id, charge.meter))
                if total is None:
                    continue
                meter = catalog.meters.get(charge.meter)
                if meter is None:
                    raise ChargeConfigurationError(
                        f"plan {plan.id!r} prices unknown meter {charge.meter!r}"
                    )
                charge_lines = usage_lines(sp, charge, meter, total)
                excluded = segment_exclusions.get((subscription.id, charge.meter))
                if excluded is not None:  # billing rules (§8): show the excluded usage
                    used = display_quantity(meter, excluded.full, period)
                    billable = display_quantity(meter, total, period)
                    charge_lines = mark_excluded(charge_lines, used, billable, excluded)
                lines.extend(charge_lines)
        # Hourly per resource and plan: each resize segment counted and capped on its plan.
        whole = SubscriptionPeriod(
            account,
            subscription,
            _plan(catalog, account, subscription, segments[-1].plan_id),
            period,
        )
        lines.extend(
            resource_hourly_lines(
                whole,
                index.resources(subscription.id),
                catalog.span_owner,
                partial(_plan, catalog, account, subscription),
            )
        )
    return finish_invoice(catalog, account, period, lines, subscriptions)


# ``Store.usage_totals`` as a function: (start, end, subscription ids) -> totals per
# (subscription, meter) of the buckets with start <= hour_start < end.
# A ``RuledUsage`` (billable totals and the billing rules' exclusions) lets per-segment
# lines show the excluded usage (§8).
UsageFetch = Callable[[datetime, datetime, Sequence[str]], Iterable[UsageTotal] | RuledUsage]


def _plan(catalog: Catalog, account: Account, subscription: Subscription, plan_id: str) -> Plan:
    plan = catalog.plans.get(plan_id)
    if plan is None:
        raise ChargeConfigurationError(
            f"subscription {subscription.id!r} refers to unknown plan {plan_id!r}"
        )
    return account.plan_for(plan)  # the account's contract prices, if any


def segment_usage_of(store: Store, catalog: Catalog) -> UsageFetch:
    """The ``segment_usage`` of ``rate_account_period`` for a store: the billable usage of
    a window (billing rules applied), one query per segment of a subscription that changes
    plan in the period."""

    def fetch(start: datetime, end: datetime, ids: Sequence[str]) -> RuledUsage:
        totals = store.usage_totals(start, end, ids)
        return usage_with_rules(catalog, start, end, totals, store.usage_totals)

    return fetch


def billable_usage(
    store: Store, catalog: Catalog, period: Period, subscription_ids: Sequence[str]
) -> RuledUsage:
    """The period's usage totals of ``subscription_ids`` with the billing rules (§8)
    applied: the billable totals and what the rules excluded (one more store query per
    distinct rule window; none without rules)."""
    totals = store.usage_totals(period.start, period.end, subscription_ids)
    return usage_with_rules(catalog, period.start, period.end, totals, store.usage_totals)


def _has_business(subscriptions: Iterable[Subscription], period: Period, invoice: Invoice) -> bool:
    """An account gets a draft when it has lines or a subscription active in the period."""
    if invoice.lines:
        return True
    return any(period.overlap_us(s.start, s.end) > 0 for s in subscriptions)


@gc_paused  # see invoicer/batch.py: nothing here makes reference cycles
def close_period(
    store: Store,
    catalog: Catalog,
    year: int,
    month: int,
    now: datetime,
    *,
    workers: int = 1,
    keep_invoices: bool = True,
) -> CloseResult:
    """Close calendar month ``year-month`` for every account, each in its own timezone.

    Refuses with ``PeriodNotClosableError`` (saving nothing) when any account's period end +
    grace is still ahead of ``now``. Saves every draft in one ``save_invoices`` call;
    accounts with nothing active and no usage in the period get no draft.

    ``workers`` > 1 rates contiguous shards of the accounts (in id order) in that many
    forked processes (``invoicer/sharding.py``); the store is used by this process only, and
    the result is the same, byte for byte. ``keep_invoices=False`` (sharded only) leaves
    ``CloseResult.invoices`` empty (``stored`` holds every document), which spares shipping
    the invoice objects back from the workers.
    """
    now = to_utc("now", now)
    label = f"{year:04d}-{month:02d}"
    accounts = sorted(catalog.accounts.values(), key=lambda a: a.id)
    # Accounts sharing a policy and timezone history share the period: computed once each.
    by_schedule: dict[BillingSchedule, Period] = {}
    periods = {}
    for a in accounts:
        schedule = BillingSchedule.of(a)
        if schedule not in by_schedule:
            by_schedule[schedule] = schedule.period(year, month)
        periods[a.id] = by_schedule[schedule]
    # Spans the store derived from lifecycle events bill next to the catalog's (issue 5).
    if periods:
        latest_end = max(p.end for p in periods.values())
        catalog = catalog_with_store_spans(catalog, store.resource_spans(EPOCH, latest_end))

    index = CatalogIndex.of(catalog)
    graph = BillingGraph.of(catalog)  # bill-to and resellers (§9)
    pending = []
    for account in accounts:
        period = periods[account.id]
        on_invoice = graph.on_invoice(account.id)
        if not on_invoice:
            continue  # its lines are on its payer's invoice, closed in the payer's period
        closable = max(closable_at(catalog, a, period, index) for a in on_invoice)
        if now < closable:
            pending.append((account.id, period, closable))
    if pending:
        raise PeriodNotClosableError(label, now, pending)

    by_period: dict[Period, list[Account]] = defaultdict(list)
    for account in accounts:
        by_period[periods[account.id]].append(account)

    if workers > 1:
        return _close_sharded(
            store,
            catalog,
            label=label,
            now=now,
            by_period=by_period,
            graph=graph,
            index=index,
            workers=workers,
            keep_invoices=keep_invoices,
        )
    invoices: list[Invoice] = []
    for period, group in sorted(by_period.items(), key=lambda item: item[0].start):
        subscription_ids = sorted(s.id for a in group for s in graph.subscriptions_on(a.id, index))
        totals_by_subscription: dict[str, list[UsageTotal]] = defaultdict(list)
        ruled = RuledUsage([], {})
        if subscription_ids:
            ruled = billable_usage(store, catalog, period, subscription_ids)
            for total in ruled.totals:
                totals_by_subscription[total.subscription_id].append(total)
        for account in group:
            subscriptions = graph.subscriptions_on(account.id, index)
            totals = [t for s in subscriptions for t in totals_by_subscription.get(s.id, ())]
            invoice = rate_invoice(
                graph,
                account.id,
                period,
                totals,
                index,
                exclusions=ruled.exclusions,
                segment_usage=segment_usage_of(store, catalog),
            )
            if invoice is not None and _has_business(subscriptions, period, invoice):
                invoices.append(invoice)

    invoices.sort(key=lambda i: i.key)
    # Issued invoices stay as they are; changes to their periods become adjustment drafts.
    invoices, untouched = _with_adjustments(store, catalog, invoices, set(periods.values()), now)
    stored = tuple(to_stored_invoice(i) for i in invoices)
    if stored:
        store.save_invoices(stored)
    return CloseResult(label=label, invoices=tuple(invoices), stored=stored, untouched=untouched)


def _needs_parent(*_: object) -> list[UsageTotal]:
    raise NeedsParent  # a plan change in the period: rated by the parent, which has the store


def _close_sharded(
    store: Store,
    catalog: Catalog,
    *,
    label: str,
    now: datetime,
    by_period: Mapping[Period, Sequence[Account]],
    graph: BillingGraph,
    index: CatalogIndex,
    workers: int,
    keep_invoices: bool,
) -> CloseResult:
    """``close_period``'s rating and saving with the accounts sharded over ``workers``
    forked processes: the same store reads before, the same single save after."""
    # (account id, period, its usage, the billing rules' exclusions of its period group)
    jobs: list[tuple[str, Period, list[UsageTotal], Mapping[tuple[str, str], Exclusion]]] = []
    for period, group in sorted(by_period.items(), key=lambda item: item[0].start):
        subscription_ids = sorted(s.id for a in group for s in graph.subscriptions_on(a.id, index))
        totals_by_subscription: dict[str, list[UsageTotal]] = defaultdict(list)
        ruled = RuledUsage([], {})
        if subscription_ids:
            ruled = billable_usage(store, catalog, period, subscription_ids)
            for total in ruled.totals:
                totals_by_subscription[total.subscription_id].append(total)
        for account in group:
            subscriptions = graph.subscriptions_on(account.id, index)
            totals = [t for s in subscriptions for t in totals_by_subscription.get(s.id, ())]
            jobs.append((account.id, period, totals, ruled.exclusions))
    # Issued invoices of these periods are re-rated against: their fresh drafts must come back.
    existing = _issued_existing(store, catalog, set(by_period), now)
    issued = {s.key for s in existing if s.status == "issued"}

    def rate(
        job: tuple[str, Period, list[UsageTotal], Mapping[tuple[str, str], Exclusion]],
        segment_usage: UsageFetch = _needs_parent,
    ) -> tuple[StoredInvoice, Invoice | None] | None:
        account_id, period, totals, exclusions = job
        invoice = rate_invoice(
            graph,
            account_id,
            period,
            totals,
            index,
            exclusions=exclusions,
            segment_usage=segment_usage,
        )
        if invoice is None or not _has_business(
            graph.subscriptions_on(account_id, index), period, invoice
        ):
            return None
        keep = keep_invoices or invoice.key in issued
        return to_stored_invoice(invoice), invoice if keep else None

    in_parent = partial(rate, segment_usage=segment_usage_of(store, catalog))
    rated = [
        in_parent(job) if result is NEEDS_PARENT else result
        for job, result in zip(jobs, rate_sharded(jobs, rate, workers), strict=True)
    ]
    drafts = sorted((r for r in rated if r is not None), key=lambda r: r[0].key)
    fresh = [invoice for _, invoice in drafts if invoice is not None]
    saved, untouched, obsolete = reconcile(
        fresh,
        existing,
        lambda requests: rerate_periods(store, catalog, requests, index),
    )
    store.delete_drafts(obsolete)
    # The workers' documents for the fresh drafts; adjustment drafts rendered here.
    rendered = {id(invoice): stored for stored, invoice in drafts if invoice is not None}
    stored_by_key = {s.key: s for s, _ in drafts if s.key not in issued}
    for invoice in saved:
        if id(invoice) not in rendered:
            stored_by_key[invoice.key] = to_stored_invoice(invoice)
    stored = tuple(stored_by_key[k] for k in sorted(stored_by_key))
    if stored:
        store.save_invoices(stored)
    return CloseResult(
        label=label,
        invoices=tuple(saved) if keep_invoices else (),
        stored=stored,
        untouched=tuple(untouched),
    )


# -- lifecycle: late usage after issue (invoicer/adjustments.py) -------------------------------

# Issued invoices whose period ended within the meters' largest max lateness plus this margin
# are re-rated by every close (a monthly close must see usage that arrived up to the last day).
ADJUSTMENT_LOOKBACK_MARGIN = timedelta(days=45)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # store spans are read from here on


def rerate_periods(
    store: Store,
    catalog: Catalog,
    requests: Sequence[tuple[str, Period]],
    index: CatalogIndex | None = None,
) -> list[Invoice | None]:
    """The fresh draft of each (account, period), or None where the account has no
    business in it; one usage query per distinct period."""
    index = index or CatalogIndex.of(catalog)
    graph = BillingGraph.of(catalog)
    totals: dict[Period, dict[str, list[UsageTotal]]] = {}
    excluded: dict[Period, dict[tuple[str, str], Exclusion]] = {}
    for period in sorted({p for _, p in requests}, key=lambda p: (p.start, p.end, p.timezone)):
        ids = sorted(
            {s.id for a, q in requests if q == period for s in graph.subscriptions_on(a, index)}
        )
        by_subscription: dict[str, list[UsageTotal]] = defaultdict(list)
        ruled = billable_usage(store, catalog, period, ids) if ids else RuledUsage([], {})
        for total in ruled.totals:
            by_subscription[total.subscription_id].append(total)
        totals[period] = by_subscription
        excluded[period] = ruled.exclusions
    out: list[Invoice | None] = []
    for account_id, period in requests:
        subscriptions = graph.subscriptions_on(account_id, index)
        usage = [t for s in subscriptions for t in totals[period].get(s.id, ())]
        invoice = rate_invoice(
            graph,
            account_id,
            period,
            usage,
            index,
            exclusions=excluded[period],
            segment_usage=segment_usage_of(store, catalog),
        )
        business = invoice is not None and _has_business(subscriptions, period, invoice)
        out.append(invoice if business else None)
    return out


def _issued_existing(
    store: Store, catalog: Catalog, periods: set[Period], now: datetime
) -> list[StoredInvoice]:
    lateness = max((m.max_lateness for m in catalog.meters.values()), default=timedelta(0))
    # Only issued invoices matter (drafts are simply replaced): those of the periods closed
    # now, and those that ended within the lookback window.
    since = min([now - lateness - ADJUSTMENT_LOOKBACK_MARGIN, *(p.start for p in periods)])
    existing = store.load_invoices_ending_after(since, status="issued")
    # An account no longer in the catalog cannot be re-rated: its invoices are left alone.
    return [s for s in existing if s.account_id in catalog.accounts]


def _with_adjustments(
    store: Store, catalog: Catalog, invoices: list[Invoice], periods: set[Period], now: datetime
) -> tuple[list[Invoice], tuple[str, ...]]:
    known = _issued_existing(store, catalog, periods, now)
    index = CatalogIndex.of(catalog)
    saved, untouched, obsolete = reconcile(
        invoices, known, lambda requests: rerate_periods(store, catalog, requests, index)
    )
    store.delete_drafts(obsolete)
    return saved, tuple(untouched)


# -- bill-to and resellers (BILLING-SEMANTICS §9, invoicer/consolidation.py) ------------------


def rate_invoice(
    graph: BillingGraph,
    account_id: str,
    period: Period,
    usage_totals: Iterable[UsageTotal],
    index: CatalogIndex | None = None,
    *,
    exclusions: Mapping[tuple[str, str], Exclusion] | None = None,
    segment_usage: UsageFetch | None = None,
) -> Invoice | None:
    """The invoice of ``account_id`` for ``period`` with bill-to and resellers (pure):

    - None when its lines are on its payer's invoice (``bill_to``, or a reseller's
      customer's platform-priced lines, which are on the reseller's invoice);
    - a reseller's customer: its own invoice at the reseller's price book, ``issuer`` =
      the reseller;
    - a payer: its lines and, grouped under each (``InvoiceLine.account_id``), those of the
      accounts it pays for, each rated on its own (charges, its campaigns), then the
      payer's commitment and taxes on the whole;
    - anyone else: ``rate_account_period`` as is.

    ``usage_totals`` must hold the usage of every account on the invoice
    (``graph.subscriptions_on``) over ``period``.
    """
    on_invoice = graph.on_invoice(account_id)
    if not on_invoice:
        return None
    index = index or CatalogIndex.of(graph.catalog)
    totals = list(usage_totals)
    rate = partial(
        rate_account_period,
        period=period,
        usage_totals=totals,
        index=index,
        exclusions=exclusions,
        segment_usage=segment_usage,
    )
    reseller = graph.reseller_of(account_id)
    if reseller is not None:
        return replace(rate(graph.book_views[reseller], account_id), issuer=reseller)
    if len(on_invoice) == 1:
        return rate(graph.catalog, account_id)
    lines: list[InvoiceLine] = []
    for member in on_invoice:
        part = rate(graph.platform_view, member).lines
        lines.extend(
            part if member == account_id else (replace(x, account_id=member) for x in part)
        )
    return finish_invoice(
        graph.invoice_view,
        graph.catalog.accounts[account_id],
        period,
        lines,
        graph.subscriptions_on(account_id, index),
    )
