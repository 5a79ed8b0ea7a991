"""Re-rating from the archive, pure: the same engine, the current catalog, a signed diff.

Given archived records rated under a catalog, when a resource moves to another subscription
(or becomes unknown) and the range is re-rated, then the usage moves exactly, the diff is
signed per (subscription, meter, hour), rows outside the range stay out, and a batch archived
at two Kafka positions counts once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import polars as pl
import pytest

from aggregation.ports import HOURLY_SCHEMA
from rating.archive import archive_frame
from rating.catalog import Catalog
from rating.catalog_file import parse_catalog
from rating.record_codec import RawRecord, decode_records
from rating.rerate import DIFF_SCHEMA, diff_hourly, hour_bounds, rerate
from tests.unit.test_rating_archive import TOPIC, H, batch

HOUR_0 = datetime.fromtimestamp(H, UTC)
HOUR_1 = HOUR_0 + timedelta(hours=1)
HOUR_2 = HOUR_0 + timedelta(hours=2)


def catalog_document(srv_1_subscription: str, *, with_vol: bool = True) -> dict[str, Any]:
    """A catalog file's mapping: srv-1 belongs to ``srv_1_subscription``, vol-1 to sub-2."""
    resources = [{"id": "srv-1", "subscription": srv_1_subscription, "kind": "server"}]
    if with_vol:
        resources.append({"id": "vol-1", "subscription": "sub-2", "kind": "volume"})
    return {
        "meters": [
            {"name": "net", "kind": "counter", "base_unit": "byte",
             "display_unit": "GB", "base_per_display": "1000000000"},
            {"name": "disk", "kind": "gauge", "base_unit": "byte",
             "display_unit": "GiB-month", "base_per_display": "1073741824"},
        ],
        "plans": [{"id": "p", "name": "P"}],
        "accounts": [{"id": "a", "name": "A", "currency": "EUR", "timezone": "UTC"}],
        "subscriptions": [
            {"id": "sub-1", "account": "a", "plan": "p", "start": "2026-10-01T00:00:00Z"},
            {"id": "sub-2", "account": "a", "plan": "p", "start": "2026-10-01T00:00:00Z"},
        ],
        "resources": resources,
    }  # fmt: skip


def catalog(srv_1_subscription: str, *, with_vol: bool = True) -> Catalog:
    return parse_catalog(catalog_document(srv_1_subscription, with_vol=with_vol), "test")


RECORDS = [
    RawRecord(
        TOPIC,
        0,
        0,
        batch(
            "a",
            1,
            [
                ("srv-1", "net", H + 10, 60, 100),
                ("srv-1", "net", H + 3700, 60, 50),
                ("vol-1", "disk", H + 1800, 3600, 10),
            ],
        ),
    ),
    RawRecord(TOPIC, 0, 1, batch("a", 2, [("srv-1", "net", H + 7300, 1, 9)])),  # hour 2
    RawRecord(TOPIC, 1, 0, batch("a", 1, [("srv-1", "net", H + 10, 60, 100)])),  # dup (a, 1)
]
ARCHIVED = archive_frame(RECORDS, decode_records(RECORDS))


def q(n: int) -> Decimal:
    return Decimal(n)


def stored_under(srv_1_subscription: str) -> pl.DataFrame:
    """What the worker stored for hours 0 and 1 under the old catalog."""
    return pl.DataFrame(
        [
            (srv_1_subscription, "net", HOUR_0, q(100), q(100), 1),
            (srv_1_subscription, "net", HOUR_1, q(50), q(50), 1),
            ("sub-2", "disk", HOUR_0, q(18000), q(10), 1),
            ("sub-2", "disk", HOUR_1, q(18000), q(10), 0),
        ],
        schema=HOURLY_SCHEMA,
        orient="row",
    )


def test_an_unchanged_catalog_re_rates_to_the_stored_values() -> None:
    result = rerate(ARCHIVED, stored_under("sub-1"), catalog("sub-1"), HOUR_0, HOUR_2)

    assert result.diff.is_empty()
    assert result.diff.schema == pl.Schema(DIFF_SCHEMA)
    assert result.hourly.sort("subscription_id", "meter", "hour_start").equals(
        stored_under("sub-1").sort("subscription_id", "meter", "hour_start")
    )
    assert (result.records, result.batches.height, result.unresolved_samples) == (3, 2, 0)
    assert result.partials["hour_start"].max() == HOUR_1  # hour 2 is outside the range


def test_a_moved_resource_moves_its_usage_with_a_signed_difference() -> None:
    result = rerate(ARCHIVED, stored_under("sub-1"), catalog("sub-2"), HOUR_0, HOUR_2)

    assert result.diff.select(
        "subscription_id", "meter", "hour_start", "quantity_diff", "sample_count_diff"
    ).rows() == [
        ("sub-1", "net", HOUR_0, -100, -1),
        ("sub-1", "net", HOUR_1, -50, -1),
        ("sub-2", "net", HOUR_0, 100, 1),
        ("sub-2", "net", HOUR_1, 50, 1),
    ]
    assert result.totals().rows() == [("sub-1", "net", 2, -150, -2), ("sub-2", "net", 2, 150, 2)]


def test_samples_that_no_longer_resolve_are_counted_and_left_out() -> None:
    result = rerate(
        ARCHIVED, stored_under("sub-1"), catalog("sub-1", with_vol=False), HOUR_0, HOUR_2
    )

    assert result.unresolved_samples == 1
    assert result.diff.select("meter", "hour_start", "quantity_diff", "max_diff").rows() == [
        ("disk", HOUR_0, -18000, -10),
        ("disk", HOUR_1, -18000, -10),
    ]


def test_the_diff_counts_a_missing_row_as_zero() -> None:
    stored = stored_under("sub-1")
    diff = diff_hourly(stored.head(1), stored.slice(1, 1))
    assert diff.select("hour_start", "stored_quantity", "rerated_quantity").rows() == [
        (HOUR_0, q(100), q(0)),
        (HOUR_1, q(0), q(50)),
    ]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (HOUR_0 + timedelta(minutes=30), HOUR_2, "not on a whole UTC hour"),
        (HOUR_2, HOUR_0, "must be before"),
        (HOUR_0.replace(tzinfo=None), HOUR_2, "no offset"),
    ],
)
def test_a_range_must_be_whole_hours(start: datetime, end: datetime, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hour_bounds(start, end)
