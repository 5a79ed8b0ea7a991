"""The catalog: meters, plans and their prices, accounts, subscriptions and resources.

Pure domain types (standard library and ``decimal`` only). ``rating.catalog_file`` maps a
YAML file onto these types and validates it; nothing here reads files or databases.

Conventions (ARCHITECTURE.md, "Contracts that are hard to change"):
- quantities are integers in a meter's base unit; a display unit is an exact integer
  number of base units (``GB`` = 10**9 bytes);
- prices are ``Decimal`` per display unit, one per currency;
- instants are timezone-aware UTC ``datetime``s and every interval is half-open [start, end).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum


class MeterKind(StrEnum):
    COUNTER = "counter"  # samples are deltas; the period quantity is the sum
    GAUGE = "gauge"  # samples are levels held over their interval; quantity = level x seconds
    PEAK = "peak"  # the period quantity is the largest level seen


DEFAULT_MAX_LATENESS = timedelta(days=35)
DEFAULT_GRACE = timedelta(hours=2)


@dataclass(frozen=True, slots=True)
class Meter:
    name: str
    kind: MeterKind
    base_unit: str
    display_unit: str
    # Base units in one display unit (GB: 10**9 bytes). For a gauge the display unit is
    # per period ("GiB-month"): the level part is this factor, the time part the period.
    base_per_display: int
    max_lateness: timedelta = DEFAULT_MAX_LATENESS
    grace: timedelta = DEFAULT_GRACE


@dataclass(frozen=True, slots=True)
class RecurringCharge:
    """A fixed fee per billing period, in arrears, prorated by active seconds."""

    fees: Mapping[str, Decimal]  # currency -> fee per period


@dataclass(frozen=True, slots=True)
class HourlyCharge:
    """A rate per started hour of each resource's life, capped per period."""

    rates: Mapping[str, Decimal]  # currency -> price per hour
    caps: Mapping[str, Decimal] = field(default_factory=dict)  # currency -> cap per period


class PricingModel(StrEnum):
    PER_UNIT = "per_unit"  # every billable unit at unit_price
    GRADUATED = "graduated"  # each unit at the price of the tier it falls in (a line per tier)
    VOLUME = "volume"  # every unit at the price of the tier the total falls in
    PACKAGE = "package"  # a price per started block of ``size`` units


@dataclass(frozen=True, slots=True)
class Tier:
    """Units up to ``up_to`` (display units, after the allowance; None = unbounded)."""

    up_to: Decimal | None
    unit_prices: Mapping[str, Decimal]  # currency -> price per display unit


@dataclass(frozen=True, slots=True)
class Package:
    size: Decimal  # display units per block
    prices: Mapping[str, Decimal]  # currency -> price per started block


@dataclass(frozen=True, slots=True)
class UsageCharge:
    """Per meter: an included allowance per period, then a pricing model.

    ``unit_prices`` is used by ``per_unit``; ``tiers`` by ``graduated`` and ``volume``
    (strictly increasing bounds, the last unbounded); ``package`` by ``package``.
    """

    meter: str
    unit_prices: Mapping[str, Decimal]  # currency -> price per display unit (per_unit)
    included: Decimal = Decimal(0)  # display units per period
    model: PricingModel = PricingModel.PER_UNIT
    tiers: tuple[Tier, ...] = ()
    package: Package | None = None

    def currencies(self) -> frozenset[str]:
        """Currencies in which this charge has every price it needs."""
        if self.model is PricingModel.PACKAGE:
            return frozenset(self.package.prices) if self.package is not None else frozenset()
        if self.model in (PricingModel.GRADUATED, PricingModel.VOLUME):
            if not self.tiers:
                return frozenset()
            return frozenset.intersection(*(frozenset(t.unit_prices) for t in self.tiers))
        return frozenset(self.unit_prices)


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    name: str
    recurring: RecurringCharge | None = None
    hourly: HourlyCharge | None = None
    usage: tuple[UsageCharge, ...] = ()

    def currencies_priced(self) -> frozenset[str]:
        """Currencies in which every charge of the plan has a price."""
        sets: list[frozenset[str]] = []
        if self.recurring is not None:
            sets.append(frozenset(self.recurring.fees))
        if self.hourly is not None:
            sets.append(frozenset(self.hourly.rates))
        sets.extend(u.currencies() for u in self.usage)
        if not sets:
            return frozenset()
        return frozenset.intersection(*sets)


class PeriodPolicy(StrEnum):
    CALENDAR_MONTH = "calendar_month"  # [1st, next 1st)
    MONTH_END_DAY = "month_end_day"  # the last day of a period is ``day`` (clamped)
    DAYS_BEFORE_MONTH_END = "days_before_month_end"  # ``days`` days after it end the month
    ANNIVERSARY = "anniversary"  # periods start on the anchor's day of month (clamped)


@dataclass(frozen=True, slots=True)
class BillingPeriod:
    """An account's billing-period policy (BILLING-SEMANTICS §2).

    ``day``: month_end_day (1..31); ``days``: days_before_month_end (0..27); ``anchor``:
    anniversary, the local date periods are anchored at (None until resolved from the
    account's earliest subscription start by the catalog loader).
    """

    policy: PeriodPolicy = PeriodPolicy.CALENDAR_MONTH
    day: int | None = None
    days: int | None = None
    anchor: date | None = None


@dataclass(frozen=True, slots=True)
class TimezoneChange:
    """From the period labelled ``year-month`` on, the account's periods are in ``timezone``."""

    year: int
    month: int
    timezone: str


class TaxKind(StrEnum):
    RATE = "rate"  # a jurisdiction's rate in percent
    REVERSE_CHARGE = "reverse_charge"  # EU B2B: 0 % with a note on the invoice
    EXEMPT = "exempt"  # no tax


@dataclass(frozen=True, slots=True)
class TaxProfile:
    kind: TaxKind
    rate: Decimal = Decimal(0)  # percent, e.g. 19
    jurisdiction: str | None = None
    line_level_rounding: bool = False  # round the tax of each line instead of once per rate


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """Custom contract prices for one plan, for one account: each given charge replaces the
    plan's charge of the same kind (usage: of the same meter)."""

    plan_id: str
    recurring: RecurringCharge | None = None
    hourly: HourlyCharge | None = None
    usage: tuple[UsageCharge, ...] = ()

    def apply(self, plan: Plan) -> Plan:
        by_meter = {u.meter: u for u in self.usage}
        return Plan(
            plan.id,
            plan.name,
            self.recurring if self.recurring is not None else plan.recurring,
            self.hourly if self.hourly is not None else plan.hourly,
            tuple(by_meter.get(u.meter, u) for u in plan.usage),
        )


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    currency: str
    timezone: str  # IANA name; used only to compute period boundaries
    billing_period: BillingPeriod = field(default_factory=BillingPeriod)
    timezone_changes: tuple[TimezoneChange, ...] = ()  # sorted by (year, month)
    tax: TaxProfile | None = None  # None: no tax lines at all
    price_overrides: Mapping[str, PriceOverride] = field(default_factory=dict)  # by plan id
    commitment: Mapping[str, Decimal] = field(default_factory=dict)  # currency -> minimum
    # BILLING-SEMANTICS §9: the account whose invoice carries this account's lines (same
    # currency, no cycles), and the reseller whose customer this account is (billed at the
    # reseller's price book; the reseller is billed at platform prices for its usage).
    bill_to: str | None = None
    reseller: str | None = None

    def plan_for(self, plan: Plan) -> Plan:
        """``plan`` with this account's contract prices applied."""
        override = self.price_overrides.get(plan.id)
        return plan if override is None else override.apply(plan)


@dataclass(frozen=True, slots=True)
class PlanChange:
    """From ``at`` (UTC) on, the subscription is on ``plan_id`` (until the next change)."""

    at: datetime
    plan_id: str


@dataclass(frozen=True, slots=True)
class PlanSegment:
    """A stretch [start, end) of a subscription on one plan; end None = open-ended."""

    start: datetime
    end: datetime | None
    plan_id: str


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    account_id: str
    plan_id: str  # the plan from ``start`` until the first plan change
    start: datetime  # UTC, inclusive
    end: datetime | None = None  # UTC, exclusive; None = open-ended
    # Effective-dated plan history, strictly increasing ``at`` inside (start, end).
    plan_changes: tuple[PlanChange, ...] = ()

    def segments(self) -> tuple[PlanSegment, ...]:
        """The plan segments tiling [start, end): the base plan, then one per change."""
        starts = [(self.start, self.plan_id), *((c.at, c.plan_id) for c in self.plan_changes)]
        ends = [c.at for c in self.plan_changes] + [self.end]
        return tuple(
            PlanSegment(start, end, plan) for (start, plan), end in zip(starts, ends, strict=True)
        )

    def plan_at(self, instant: datetime) -> str:
        """The plan in effect at ``instant`` (before ``start``: the base plan; at or after
        ``end``: the last one)."""
        plan = self.plan_id
        for change in self.plan_changes:
            if change.at > instant:
                break
            plan = change.plan_id
        return plan

    def plan_ids(self) -> tuple[str, ...]:
        """Every plan of the subscription's history, in order of first use."""
        return tuple(dict.fromkeys([self.plan_id, *(c.plan_id for c in self.plan_changes)]))


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of a resource's life, [start, end); end None = still running.

    During a span the resource belongs to ``subscription_id`` on ``plan_id``; None means
    the defaults: the resource's subscription, and that subscription's plan in effect at
    the span start (see ``Catalog.span_owner``). A resize closes a span and opens one on the
    new plan; a move to another subscription likewise.
    """

    start: datetime
    end: datetime | None = None
    subscription_id: str | None = None
    plan_id: str | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    id: str
    subscription_id: str
    kind: str  # server, volume, ip, ...
    spans: tuple[Span, ...] = ()

    def span_subscription(self, span: Span) -> str:
        """The subscription the resource belongs to during ``span``."""
        return span.subscription_id if span.subscription_id is not None else self.subscription_id


class DiscountKind(StrEnum):
    PERCENTAGE = "percentage"
    FIXED = "fixed"


class ChargeKind(StrEnum):
    RECURRING = "recurring"
    HOURLY = "hourly"
    USAGE = "usage"


@dataclass(frozen=True, slots=True)
class Campaign:
    """A discount (BILLING-SEMANTICS §6): applies in the periods that start in
    [start, end), to the charge lines its scope matches, of the accounts it names (all when
    empty), for the first ``first_periods`` periods of a subscription when set."""

    id: str
    name: str
    kind: DiscountKind
    percent: Decimal = Decimal(0)  # percentage campaigns
    amounts: Mapping[str, Decimal] = field(default_factory=dict)  # fixed: currency -> amount
    start: datetime | None = None
    end: datetime | None = None
    plan_id: str | None = None
    charge: ChargeKind | None = None
    meter: str | None = None
    accounts: tuple[str, ...] = ()
    first_periods: int | None = None


@dataclass(frozen=True, slots=True)
class BillingRule:
    """Non-billable usage (BILLING-SEMANTICS §8): the usage hours whose start lies in
    [start, end) of the (account, subscription, meter) the rule matches (None = any) are
    shown on the invoice as excluded and not charged."""

    id: str
    reason: str
    start: datetime
    end: datetime | None = None  # None = open-ended
    account_id: str | None = None
    subscription_id: str | None = None
    meter: str | None = None

    def matches(self, account_id: str, subscription_id: str, meter: str) -> bool:
        return (
            self.account_id in (None, account_id)
            and self.subscription_id in (None, subscription_id)
            and self.meter in (None, meter)
        )


@dataclass(frozen=True, slots=True)
class PriceBook:
    """A reseller's prices (BILLING-SEMANTICS §9): for each platform plan id its customers
    subscribe to, the plan the reseller bills them at."""

    id: str
    reseller_id: str
    plans: Mapping[str, Plan]  # platform plan id -> the reseller's plan for it
    campaigns: Mapping[str, Campaign] = field(default_factory=dict)  # the reseller's own


@dataclass(frozen=True, slots=True)
class Catalog:
    meters: Mapping[str, Meter]
    plans: Mapping[str, Plan]
    accounts: Mapping[str, Account]
    subscriptions: Mapping[str, Subscription]
    resources: Mapping[str, Resource]
    campaigns: Mapping[str, Campaign] = field(default_factory=dict)
    billing_rules: Mapping[str, BillingRule] = field(default_factory=dict)
    price_books: Mapping[str, PriceBook] = field(default_factory=dict)  # by id

    def span_owner(self, resource: Resource, span: Span) -> tuple[str, str]:
        """(subscription id, plan id) of ``resource`` during ``span``, defaults resolved: the
        resource's subscription, and that subscription's plan in effect at the span start."""
        subscription_id = resource.span_subscription(span)
        if span.plan_id is not None:
            return subscription_id, span.plan_id
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise KeyError(f"resource {resource.id!r}: unknown subscription {subscription_id!r}")
        return subscription_id, subscription.plan_at(span.start)
