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
from datetime import datetime, timedelta
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


@dataclass(frozen=True, slots=True)
class UsageCharge:
    """Per meter: an included allowance per period, then a price per display unit."""

    meter: str
    unit_prices: Mapping[str, Decimal]  # currency -> price per display unit
    included: Decimal = Decimal(0)  # display units per period


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
        sets.extend(frozenset(u.unit_prices) for u in self.usage)
        if not sets:
            return frozenset()
        return frozenset.intersection(*sets)


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    currency: str
    timezone: str  # IANA name; used only to compute period boundaries


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    account_id: str
    plan_id: str
    start: datetime  # UTC, inclusive
    end: datetime | None = None  # UTC, exclusive; None = open-ended


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of a resource's life, [start, end); end None = still running."""

    start: datetime
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    id: str
    subscription_id: str
    kind: str  # server, volume, ip, ...
    spans: tuple[Span, ...] = ()


@dataclass(frozen=True, slots=True)
class Catalog:
    meters: Mapping[str, Meter]
    plans: Mapping[str, Plan]
    accounts: Mapping[str, Account]
    subscriptions: Mapping[str, Subscription]
    resources: Mapping[str, Resource]
