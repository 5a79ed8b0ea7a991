"""Preview and explain: read-only views of the invoicer (issue 4, items 9 and 10).

``preview_invoice`` rates the period containing ``now`` for one account, as if it closed now
with the usage recorded so far; nothing is saved. ``explain_line`` walks from an invoice line
to the hourly buckets behind it (and, when the store can say, to the source batches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from aggregation.ports import Store, StoredInvoice
from invoicer.close import CatalogIndex, billable_usage, rate_invoice, segment_usage_of
from invoicer.consolidation import BillingGraph
from invoicer.invoice import Invoice
from invoicer.lines import ChargeConfigurationError
from invoicer.periods import Period, PeriodError, account_period, to_utc
from invoicer.rules import RuledUsage
from rating.catalog import Catalog


def open_period(catalog: Catalog, account_id: str, now: datetime) -> Period:
    """The account's period containing ``now`` (half-open)."""
    now = to_utc("now", now)
    account = catalog.accounts.get(account_id)
    if account is None:
        raise ChargeConfigurationError(f"unknown account {account_id!r}")
    for delta in (-1, 0, 1):
        index = now.year * 12 + now.month - 1 + delta
        period = account_period(account, index // 12, index % 12 + 1)
        if period.start <= now < period.end:
            return period
    raise PeriodError(f"no period of account {account_id!r} contains {now.isoformat()}")


def preview_invoice(store: Store, catalog: Catalog, account_id: str, now: datetime) -> Invoice:
    """The draft of the open period for ``account_id`` at ``now``; never saved."""
    period = open_period(catalog, account_id, now)
    index = CatalogIndex.of(catalog)
    graph = BillingGraph.of(catalog)  # bill-to and resellers (§9)
    if not graph.on_invoice(account_id):
        raise ChargeConfigurationError(
            f"account {account_id!r} is invoiced to {graph.payer[account_id]!r} "
            "(bill_to): preview that account"
        )
    ids = [s.id for s in graph.subscriptions_on(account_id, index)]
    ruled = billable_usage(store, catalog, period, ids) if ids else RuledUsage([], {})
    invoice = rate_invoice(
        graph,
        account_id,
        period,
        ruled.totals,
        index,
        exclusions=ruled.exclusions,
        segment_usage=segment_usage_of(store, catalog),
    )
    assert invoice is not None  # on_invoice above
    return invoice


class ExplainError(ValueError):
    """The invoice or the line to explain does not exist."""


@dataclass(frozen=True, slots=True)
class Explanation:
    invoice_key: str
    line: dict[str, Any]  # the line as in the stored document
    usage_start: datetime | None  # the hours searched: [usage_start, usage_end)
    usage_end: datetime | None
    hourly: pl.DataFrame | None  # usage_hourly rows behind the line (HOURLY_SCHEMA)
    batches: pl.DataFrame | None  # source batches with their Kafka positions, when known


def explain_line(
    store: Store, stored: StoredInvoice | None, key: str, line_key: str
) -> Explanation:
    """The hourly buckets (and source batches) behind line ``line_key`` of invoice ``key``.

    Usage lines (and adjustments of them) are backed by the hours of their subscription and
    meter in the invoice's billing period (the close's query: ``start <= hour_start < end``);
    recurring and hourly lines come from the catalog's subscription and resource spans, not
    from metered usage, so they have no buckets."""
    if stored is None:
        raise ExplainError(f"no invoice {key!r}")
    document = json.loads(stored.document)
    lines = {line["key"]: line for line in document["lines"]}
    line = lines.get(line_key)
    if line is None:
        raise ExplainError(
            f"invoice {key!r} has no line {line_key!r}; its lines: {sorted(lines) or 'none'}"
        )
    refs = line["refs"]
    if not refs.get("meter"):
        return Explanation(key, line, None, None, None, None)
    start, end = stored.period_start, stored.period_end
    hourly = store.usage_hourly(start, end, [refs["subscription_id"]]).filter(
        pl.col("meter") == refs["meter"]
    )
    batches = store.usage_batches(refs["subscription_id"], refs["meter"], start, end)
    return Explanation(key, line, start, end, hourly, batches)
