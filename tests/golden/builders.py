"""Small catalog builders for the invoicer's unit and property tests (the golden cases use
catalog files instead)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal

from rating.catalog import (
    Account,
    Catalog,
    HourlyCharge,
    Meter,
    MeterKind,
    Plan,
    RecurringCharge,
    Resource,
    Span,
    Subscription,
    UsageCharge,
)

EGRESS = Meter("net.egress.bytes", MeterKind.COUNTER, "byte", "GB", 10**9)
STORAGE = Meter("storage.block.bytes", MeterKind.GAUGE, "byte", "GiB-month", 2**30)
IPV4 = Meter("ipv4.count", MeterKind.PEAK, "address", "IPv4", 1)
METERS = (EGRESS, STORAGE, IPV4)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def d(text: str) -> Decimal:
    return Decimal(text)


def vps_s(currency: str = "EUR") -> Plan:
    return Plan(
        "vps-s",
        "VPS S",
        hourly=HourlyCharge({currency: d("0.0070")}, {currency: d("4.15")}),
        usage=(UsageCharge(EGRESS.name, {currency: d("0.0100")}, d("1000")),),
    )


def backup(currency: str = "EUR", fee: str = "12.00") -> Plan:
    return Plan("backup", "Backup add-on", recurring=RecurringCharge({currency: d(fee)}))


def catalog(
    *,
    plans: Iterable[Plan] = (),
    accounts: Iterable[Account] = (),
    subscriptions: Iterable[Subscription] = (),
    resources: Iterable[Resource] = (),
    meters: Iterable[Meter] = METERS,
) -> Catalog:
    return Catalog(
        meters={m.name: m for m in meters},
        plans={p.id: p for p in plans},
        accounts={a.id: a for a in accounts},
        subscriptions={s.id: s for s in subscriptions},
        resources={r.id: r for r in resources},
    )


ACME = Account("acme", "ACME GmbH", "EUR", "Europe/Berlin")


def server(ident: str, subscription_id: str, *spans: tuple[datetime, datetime | None]) -> Resource:
    return Resource(ident, subscription_id, "server", tuple(Span(s, e) for s, e in spans))
