"""Golden cases as data: ``tests/golden/cases/<name>/``.

Each case directory holds

- ``catalog.yaml``: the catalog, in the format ``rating.catalog_file`` loads;
- ``usage.csv`` (optional): hourly usage rows as the store keeps them, header
  ``subscription_id,meter,hour_start,quantity,quantity_max,sample_count`` (quantities are
  integers in base units, ``hour_start`` ISO 8601 UTC). Rows outside the account's period are
  allowed and must not count: a bucket belongs to the period its ``hour_start`` is in;
- ``case.yaml``: ``given`` / ``when`` / ``then`` in words, the ``period`` (``YYYY-MM``), the
  ``account`` closed, and the hand-written ``amounts`` (line key -> amount) and ``total`` of
  BILLING-SEMANTICS' worked example, checked independently of ``expected.json``;
- ``expected.json``: the whole invoice document, compared byte for byte. Regenerate it with
  ``.venv/bin/python -m tests.golden.regenerate`` and review the diff.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import yaml

from aggregation.ports import LEDGER_SCHEMA, PARTIALS_SCHEMA, Store, UsageTotal
from invoicer.close import rate_invoice
from invoicer.consolidation import BillingGraph
from invoicer.invoice import Invoice
from invoicer.periods import Period, account_period, parse_period_label
from invoicer.rules import RuledUsage, usage_with_rules
from rating.catalog import Catalog
from rating.catalog_file import load_catalog_file

CASES_DIR = Path(__file__).parent / "cases"
USAGE_HEADER = [
    "subscription_id",
    "meter",
    "hour_start",
    "quantity",
    "quantity_max",
    "sample_count",
]


@dataclass(frozen=True, slots=True)
class UsageRow:
    subscription_id: str
    meter: str
    hour_start: datetime
    quantity: int
    quantity_max: int
    sample_count: int


@dataclass(frozen=True, slots=True)
class GoldenCase:
    name: str
    directory: Path
    catalog: Catalog
    account_id: str
    year: int
    month: int
    usage: tuple[UsageRow, ...]
    amounts: dict[str, str]
    total: str

    @property
    def expected_path(self) -> Path:
        return self.directory / "expected.json"

    @property
    def period(self) -> Period:
        return account_period(self.catalog.accounts[self.account_id], self.year, self.month)


def case_names() -> list[str]:
    return sorted(p.name for p in CASES_DIR.iterdir() if (p / "case.yaml").is_file())


def _read_usage(path: Path) -> tuple[UsageRow, ...]:
    if not path.exists():
        return ()
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header != USAGE_HEADER:
            raise ValueError(f"{path}: header must be {','.join(USAGE_HEADER)}")
        rows = []
        for n, row in enumerate(reader, start=2):
            if len(row) != len(USAGE_HEADER):
                raise ValueError(f"{path}:{n}: expected {len(USAGE_HEADER)} fields")
            hour_start = datetime.fromisoformat(row[2])
            if hour_start.utcoffset() is None:
                raise ValueError(f"{path}:{n}: hour_start {row[2]!r} has no UTC offset")
            rows.append(UsageRow(row[0], row[1], hour_start, int(row[3]), int(row[4]), int(row[5])))
    return tuple(rows)


def load_case(name: str) -> GoldenCase:
    directory = CASES_DIR / name
    spec = yaml.load((directory / "case.yaml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    if not isinstance(spec, dict):
        raise ValueError(f"{directory / 'case.yaml'}: expected a mapping")
    year, month = parse_period_label(spec["period"])
    return GoldenCase(
        name=name,
        directory=directory,
        catalog=load_catalog_file(directory / "catalog.yaml"),
        account_id=spec["account"],
        year=year,
        month=month,
        usage=_read_usage(directory / "usage.csv"),
        amounts=dict(spec["amounts"]),
        total=spec["total"],
    )


def usage_totals(rows: Sequence[UsageRow], period: Period) -> list[UsageTotal]:
    """What ``Store.usage_totals`` answers: per (subscription, meter), sum and max over the
    rows with period.start <= hour_start < period.end, sorted."""
    sums: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        if not period.start <= row.hour_start < period.end:
            continue
        acc = sums.setdefault((row.subscription_id, row.meter), [0, 0, 0])
        acc[0] += row.quantity
        acc[1] = max(acc[1], row.quantity_max)
        acc[2] += row.sample_count
    return [UsageTotal(s, m, q, qmax, n) for (s, m), (q, qmax, n) in sorted(sums.items())]


def window_totals(
    rows: Sequence[UsageRow], start: datetime, end: datetime, subscription_ids: Sequence[str]
) -> list[UsageTotal]:
    """``Store.usage_totals(start, end, subscription_ids)`` over the case's rows."""
    wanted = set(subscription_ids)
    sums: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        if row.subscription_id not in wanted or not start <= row.hour_start < end:
            continue
        acc = sums.setdefault((row.subscription_id, row.meter), [0, 0, 0])
        acc[0] += row.quantity
        acc[1] = max(acc[1], row.quantity_max)
        acc[2] += row.sample_count
    return [UsageTotal(s, m, q, qmax, n) for (s, m), (q, qmax, n) in sorted(sums.items())]


def rate_case(case: GoldenCase) -> Invoice:
    """The case's invoice through the pure core, billing rules (§8) included."""
    period = case.period

    def fetch(start: datetime, end: datetime, ids: Sequence[str]) -> list[UsageTotal]:
        return window_totals(case.usage, start, end, ids)

    ruled = usage_with_rules(
        case.catalog, period.start, period.end, usage_totals(case.usage, period), fetch
    )

    def segment_usage(start: datetime, end: datetime, ids: Sequence[str]) -> RuledUsage:
        return usage_with_rules(case.catalog, start, end, fetch(start, end, ids), fetch)

    invoice = rate_invoice(
        BillingGraph.of(case.catalog),  # bill-to and resellers (§9)
        case.account_id,
        period,
        ruled.totals,
        exclusions=ruled.exclusions,
        segment_usage=segment_usage,
    )
    if invoice is None:
        raise ValueError(f"{case.name}: {case.account_id}'s lines are on its payer's invoice")
    return invoice


def write_usage(store: Store, rows: Sequence[UsageRow], rated_at: datetime) -> None:
    """Put the rows into a real store the way rating does: one batch per row."""
    if not rows:
        return
    ledger = pl.DataFrame(
        [("golden", seq, "usage.samples.v1", 0, seq, rated_at, 1) for seq, _ in enumerate(rows)],
        schema=LEDGER_SCHEMA,
        orient="row",
    )
    partials = pl.DataFrame(
        [
            (
                "golden",
                seq,
                r.subscription_id,
                r.meter,
                r.hour_start,
                Decimal(r.quantity),
                Decimal(r.quantity_max),
                r.sample_count,
            )
            for seq, r in enumerate(rows)
        ],
        schema=PARTIALS_SCHEMA,
        orient="row",
    )
    store.write_rated(ledger, partials, [], rated_at)
