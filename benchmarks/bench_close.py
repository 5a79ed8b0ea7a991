"""Period close budget (figures printed; not a timed test).

Target (issue 4): close 100,000 accounts x 6 meters with mixed plans in <= 30 s on this
machine.

Builds a synthetic catalog in memory (domain objects, no YAML): three plans mixing every
charge kind and pricing model (recurring, hourly with a cap, per-unit, graduated, volume,
package; counter, gauge and peak meters), accounts spread over three timezones, two period
policies and three tax profiles, one subscription per account, one server per hourly
subscription, and usage for each of the 6 meters of every subscription in an embedded DuckDB
store (``--hours`` buckets per (subscription, meter), written with ``write_rated``). Then it
times ``close_period`` (usage query, rating, documents, the issued-invoice lookback and
``save_invoices``), and prints accounts/s, total seconds and peak RSS.

Run: ``.venv/bin/python benchmarks/bench_close.py`` (``--accounts 100000 --hours 2``;
``--workers N``: rating processes, default the CPU count capped (``invoicer/sharding.py``);
``--profile`` prints the top of a cProfile of the close (this process only: use
``--workers 1`` to see the rating), sorted by ``BENCH_SORT``, default ``cumulative``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import polars as pl

from aggregation.duckdb_store import DuckDbStore
from aggregation.ports import LEDGER_SCHEMA, PARTIALS_SCHEMA
from invoicer.close import close_period
from invoicer.sharding import default_workers
from rating.catalog import (
    Account,
    BillingPeriod,
    Catalog,
    HourlyCharge,
    Meter,
    MeterKind,
    Package,
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
    UsageCharge,
)

TARGET_SECONDS = 30.0
D = Decimal
METERS = (
    Meter("net.egress.bytes", MeterKind.COUNTER, "byte", "GB", 10**9),
    Meter("net.ingress.bytes", MeterKind.COUNTER, "byte", "GB", 10**9),
    Meter("cpu.millicpu_seconds", MeterKind.COUNTER, "mcpu-s", "vCPU-hour", 3_600_000),
    Meter("storage.block.bytes", MeterKind.GAUGE, "byte", "GiB-month", 2**30),
    Meter("ipv4.count", MeterKind.PEAK, "address", "IPv4", 1),
    Meter("backup.bytes", MeterKind.COUNTER, "byte", "GB", 10**9),
)


def _eur(value: str) -> dict[str, Decimal]:
    return {"EUR": D(value)}


def plans() -> list[Plan]:
    usage = (
        UsageCharge("net.egress.bytes", _eur("0.0100"), D("1000")),
        UsageCharge(
            "net.ingress.bytes",
            {},
            model=PricingModel.GRADUATED,
            tiers=(Tier(D("100"), _eur("0.0050")), Tier(None, _eur("0.0020"))),
        ),
        UsageCharge("cpu.millicpu_seconds", _eur("0.0200"), D("10")),
        UsageCharge("storage.block.bytes", _eur("0.0500")),
        UsageCharge(
            "ipv4.count",
            {},
            model=PricingModel.VOLUME,
            tiers=(Tier(D("4"), _eur("1.50")), Tier(None, _eur("1.20"))),
        ),
        UsageCharge(
            "backup.bytes", {}, model=PricingModel.PACKAGE, package=Package(D("100"), _eur("5.00"))
        ),
    )
    return [
        Plan("vps-s", "VPS S", hourly=HourlyCharge(_eur("0.0070"), _eur("4.15")), usage=usage),
        Plan("vps-m", "VPS M", RecurringCharge(_eur("12.00")), usage=usage),
        Plan(
            "vps-l",
            "VPS L",
            RecurringCharge(_eur("30.00")),
            HourlyCharge(_eur("0.0200"), _eur("12.00")),
            usage,
        ),
    ]


ZONES = ("Europe/Berlin", "UTC", "America/New_York")
POLICIES = (BillingPeriod(), BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=25))
TAXES = (
    None,
    TaxProfile(TaxKind.RATE, D("19"), "DE"),
    TaxProfile(TaxKind.REVERSE_CHARGE),
)
START = datetime(2026, 1, 1, tzinfo=UTC)


def build_catalog(n: int) -> Catalog:
    plan_list = plans()
    accounts: dict[str, Account] = {}
    subscriptions: dict[str, Subscription] = {}
    resources: dict[str, Resource] = {}
    for i in range(n):
        account_id = f"acct-{i:06d}"
        accounts[account_id] = Account(
            account_id,
            f"Account {i}",
            "EUR",
            ZONES[i % 3],
            POLICIES[(i // 3) % 2],
            tax=TAXES[(i // 7) % 3],
        )
        plan = plan_list[i % 3]
        sub_id = f"sub-{i:06d}"
        start = START if i % 10 else datetime(2026, 10, 11, 7, tzinfo=UTC)  # some prorated
        subscriptions[sub_id] = Subscription(sub_id, account_id, plan.id, start)
        if plan.hourly is not None:
            resources[f"srv-{i:06d}"] = Resource(
                f"srv-{i:06d}", sub_id, "server", (Span(START + timedelta(hours=i % 500)),)
            )
    return Catalog(
        meters={m.name: m for m in METERS},
        plans={p.id: p for p in plan_list},
        accounts=accounts,
        subscriptions=subscriptions,
        resources=resources,
    )


QUANTITIES = {  # base units per bucket, scaled by the subscription number
    "net.egress.bytes": 400 * 10**9,
    "net.ingress.bytes": 90 * 10**9,
    "cpu.millicpu_seconds": 7_200_000,
    "storage.block.bytes": 100 * 2**30 * 3600,
    "ipv4.count": 3,
    "backup.bytes": 120 * 10**9,
}


def write_usage(store: DuckDbStore, n: int, hours: int) -> int:
    """``hours`` buckets for each of the 6 meters of every subscription, in October 2026."""
    first = datetime(2026, 10, 10, tzinfo=UTC)
    subs = pl.Series("subscription_id", [f"sub-{i:06d}" for i in range(n)])
    frames = []
    for h in range(hours):
        for meter, base in QUANTITIES.items():
            scale = pl.Series(range(n)) % 7 + 1
            quantity = (scale * base).cast(pl.Decimal(38, 0))
            frames.append(
                pl.DataFrame(
                    {
                        "subscription_id": subs,
                        "meter": meter,
                        "hour_start": first + timedelta(hours=h * 24),
                        "quantity": quantity,
                        "quantity_max": quantity,
                        "sample_count": 1,
                    }
                )
            )
    usage = pl.concat(frames)
    partials = usage.with_columns(
        pl.lit("bench").alias("agent_id"), pl.lit(1, pl.Int64).alias("seq")
    ).select(list(PARTIALS_SCHEMA))
    partials = partials.cast(pl.Schema(PARTIALS_SCHEMA))
    ledger = pl.DataFrame(
        [("bench", 1, "usage.samples.v1", 0, 0, first, usage.height)],
        schema=LEDGER_SCHEMA,
        orient="row",
    )
    store.write_rated(ledger, partials, [], first)
    return usage.height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--hours", type=int, default=2, help="buckets per (subscription, meter)")
    parser.add_argument("--profile", action="store_true", help="cProfile the close")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="rating processes (default: the CPU count, capped; 1 = in-process)",
    )
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    catalog = build_catalog(args.accounts)
    store = DuckDbStore(":memory:")
    store.migrate()
    rows = write_usage(store, args.accounts, args.hours)
    setup = time.perf_counter() - t0
    print(
        f"setup: {args.accounts:,} accounts, {len(catalog.resources):,} servers, "
        f"{rows:,} hourly rows (6 meters) in {setup:.1f} s"
    )

    now = datetime(2026, 12, 1, tzinfo=UTC)
    profiler = cProfile.Profile() if args.profile else None
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    if profiler is not None:
        profiler.enable()
    # keep_invoices=False: what `meterline close` needs is the saved documents.
    result = close_period(store, catalog, 2026, 10, now, workers=args.workers, keep_invoices=False)
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - t1
    cpu = time.process_time() - cpu1
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_children = children.ru_utime + children.ru_stime
    lines = sum(s.document.count('"kind": ') for s in result.stored)  # one per line
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_child_mib = children.ru_maxrss / 1024
    store.close()

    print(
        f"close_period 2026-10: {len(result.stored):,} invoices, {lines:,} lines, "
        f"{sum(len(s.document) for s in result.stored) / 2**20:,.0f} MiB of documents"
    )
    print(
        f"total ({args.workers} worker{'s' if args.workers != 1 else ''}): {seconds:.1f} s "
        f"wall ({cpu:.1f} s CPU here + {cpu_children:.1f} s in workers) -> "
        f"{args.accounts / seconds:,.0f} accounts/s"
    )
    print(f"target: {args.accounts:,} accounts in <= {TARGET_SECONDS:.0f} s (100,000 in the issue)")
    print(f"peak RSS: {peak_mib:,.0f} MiB here, {peak_child_mib:,.0f} MiB largest worker")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(
            os.environ.get("BENCH_SORT", "cumulative")
        ).print_stats(40)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
