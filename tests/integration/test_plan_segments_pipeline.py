"""Plan segments through the real pipeline pieces: samples -> engine (effective-dated
resolution of a moving resource) -> embedded DuckDB store -> close (lines per segment)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import polars as pl

from aggregation.factory import open_store
from aggregation.ports import LEDGER_SCHEMA
from invoicer.close import close_period
from invoicer.documents import invoice_to_json
from rating.catalog_file import parse_catalog as parse
from rating.catalog_file import parse_catalog_yaml
from rating.engine import CatalogFrames, rate
from rating.record_codec import SAMPLES_SCHEMA

CATALOG = parse(
    parse_catalog_yaml(
        """
meters:
  - {name: egress, kind: counter, base_unit: byte, display_unit: GB,
     base_per_display: "1000000000"}
plans:
  - {id: s, name: S, recurring: {fee: {EUR: "31.00"}},
     usage: [{meter: egress, unit_price: {EUR: "1.00"}}]}
  - {id: m, name: M, recurring: {fee: {EUR: "62.00"}},
     usage: [{meter: egress, unit_price: {EUR: "2.00"}}]}
accounts:
  - {id: acc, name: Acc, currency: EUR, timezone: UTC}
subscriptions:
  - {id: sub, account: acc, plan: s, start: "2026-09-01T00:00:00Z",
     plan_changes: [{at: "2026-10-11T00:30:00Z", plan: m}]}
  - {id: other, account: acc, plan: s, start: "2026-09-01T00:00:00Z"}
resources:
  - id: srv
    subscription: sub
    kind: server
    spans:
      - {start: "2026-09-01T00:00:00Z", end: "2026-10-20T00:00:00Z"}
      - {start: "2026-10-20T00:00:00Z", end: null, subscription: other}
""",
        "test",
    ),
    "test",
)
GB = 10**9


def _unix(month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(2026, month, day, hour, minute, tzinfo=UTC).timestamp())


def test_a_moving_resource_and_a_plan_change_are_billed_per_segment() -> None:
    samples = pl.DataFrame(
        [
            # 00:10 on 11 Oct: before the 00:30 plan change, and its bucket starts at 00:00
            ("agent", 1, 0, "srv", "egress", _unix(10, 11, 0, 10), 60, 1 * GB),
            # 00:40: after the change, but in the same hour bucket -> still plan s
            ("agent", 1, 1, "srv", "egress", _unix(10, 11, 0, 40), 60, 2 * GB),
            ("agent", 1, 2, "srv", "egress", _unix(10, 15), 60, 4 * GB),  # plan m
            ("agent", 1, 3, "srv", "egress", _unix(10, 25), 60, 8 * GB),  # moved: other
        ],
        schema=SAMPLES_SCHEMA,
        orient="row",
    )
    rated = rate(samples, CatalogFrames.from_catalog(CATALOG))
    assert rated.unresolved.height == 0
    at = datetime(2026, 11, 1, 3, tzinfo=UTC)
    ledger = pl.DataFrame(
        [("agent", 1, "usage.samples.v1", 0, 0, at, 4)], schema=LEDGER_SCHEMA, orient="row"
    )
    store = open_store("duckdb::memory:")
    try:
        store.migrate()
        store.write_rated(ledger, rated.partials, [], at)

        first = close_period(store, CATALOG, 2026, 10, at + timedelta(hours=1))
        (invoice,) = first.invoices
        amounts = {line.key: line.amount_precise for line in invoice.lines}
        assert amounts == {
            "acc/2026-10-01/sub@20261001T0000Z/recurring": Decimal("10.020833333333"),
            "acc/2026-10-01/sub@20261001T0000Z/usage/egress": Decimal("3"),  # 1 + 2 GB at 1.00
            "acc/2026-10-01/sub@20261011T0030Z/recurring": Decimal("41.958333333333"),
            "acc/2026-10-01/sub@20261011T0030Z/usage/egress": Decimal("8"),  # 4 GB at 2.00
            "acc/2026-10-01/other/recurring": Decimal("31"),
            "acc/2026-10-01/other/usage/egress": Decimal("8"),  # the moved resource's 8 GB at 1.00
        }
        again = close_period(store, CATALOG, 2026, 10, at + timedelta(hours=2))
        assert [invoice_to_json(i) for i in again.invoices] == [invoice_to_json(invoice)]
    finally:
        store.close()
