"""The rating rules, one worked example each (given samples, when rated, then partials)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import polars as pl

from aggregation.ports import PARTIALS_SCHEMA
from rating.catalog_file import parse_catalog
from rating.engine import MAX_DURATION_S, UNRESOLVED_SCHEMA, CatalogFrames, rate
from rating.record_codec import SAMPLES_SCHEMA

CATALOG = parse_catalog(
    {
        "meters": [
            {
                "name": "egress",
                "kind": "counter",
                "base_unit": "byte",
                "display_unit": "GB",
                "base_per_display": "1000000000",
            },
            {
                "name": "disk",
                "kind": "gauge",
                "base_unit": "byte",
                "display_unit": "GiB-month",
                "base_per_display": "1073741824",
            },
            {
                "name": "ipv4",
                "kind": "peak",
                "base_unit": "address",
                "display_unit": "address",
                "base_per_display": "1",
            },
        ],
        "plans": [{"id": "p", "name": "P"}],
        "accounts": [{"id": "a", "name": "A", "currency": "EUR", "timezone": "UTC"}],
        "subscriptions": [
            {"id": "sub-1", "account": "a", "plan": "p", "start": "2026-01-01T00:00:00Z"}
        ],
        "resources": [{"id": "srv-1", "subscription": "sub-1", "kind": "server"}],
    },
    "test",
)
FRAMES = CatalogFrames.from_catalog(CATALOG)
H = 1_791_000_000 // 3600 * 3600  # 2026-10-03T04:00:00Z
HOUR_0 = datetime(2026, 10, 3, 4, tzinfo=UTC)
HOUR_1 = datetime(2026, 10, 3, 5, tzinfo=UTC)
HOUR_2 = datetime(2026, 10, 3, 6, tzinfo=UTC)


def _samples(
    *rows: tuple[str, str, int, int, int], agent: str = "ag", seq: int = 1
) -> pl.DataFrame:
    return pl.DataFrame(
        [(agent, seq, i, *row) for i, row in enumerate(rows)], schema=SAMPLES_SCHEMA, orient="row"
    )


def _rows(partials: pl.DataFrame) -> list[tuple[object, ...]]:
    return partials.drop("agent_id", "seq").rows()


def test_counter_delta_goes_wholly_to_the_hour_of_its_start() -> None:
    rated = rate(
        _samples(
            ("srv-1", "egress", H + 3599, 120, 500),  # crosses into the next hour
            ("srv-1", "egress", H + 10, 60, 700),
        ),
        FRAMES,
    )
    assert rated.partials.schema == pl.Schema(PARTIALS_SCHEMA)
    assert _rows(rated.partials) == [("sub-1", "egress", HOUR_0, Decimal(1200), Decimal(700), 2)]


def test_gauge_level_seconds_are_split_exactly_across_hours() -> None:
    # 100 GiB held from 04:30 to 06:10: 1800 s, 3600 s and 600 s in three hours.
    level = 100 * 2**30
    rated = rate(_samples(("srv-1", "disk", H + 1800, 6000, level)), FRAMES)
    assert _rows(rated.partials) == [
        ("sub-1", "disk", HOUR_0, Decimal(level * 1800), Decimal(level), 1),
        ("sub-1", "disk", HOUR_1, Decimal(level * 3600), Decimal(level), 0),
        ("sub-1", "disk", HOUR_2, Decimal(level * 600), Decimal(level), 0),
    ]


def test_gauge_ending_exactly_on_the_hour_does_not_touch_the_next_hour() -> None:
    rated = rate(_samples(("srv-1", "disk", H, 3600, 3)), FRAMES)
    assert _rows(rated.partials) == [("sub-1", "disk", HOUR_0, Decimal(10800), Decimal(3), 1)]


def test_huge_gauge_values_do_not_overflow() -> None:
    top = 2**63 - 1
    rated = rate(_samples(("srv-1", "disk", H, 3600, top), ("srv-1", "disk", H, 3600, top)), FRAMES)
    assert _rows(rated.partials) == [
        ("sub-1", "disk", HOUR_0, Decimal(2 * top * 3600), Decimal(top), 2)
    ]


def test_peak_counts_its_level_in_every_hour_it_overlaps_and_has_no_sum() -> None:
    rated = rate(
        _samples(
            ("srv-1", "ipv4", H + 3000, 1200, 4),  # 04:50 - 05:10
            ("srv-1", "ipv4", H + 3700, 0, 6),  # a point observation at 05:01:40
            ("srv-1", "ipv4", H + 100, 60, 2),
        ),
        FRAMES,
    )
    assert _rows(rated.partials) == [
        ("sub-1", "ipv4", HOUR_0, Decimal(0), Decimal(4), 2),
        ("sub-1", "ipv4", HOUR_1, Decimal(0), Decimal(6), 1),
    ]


def test_partials_are_kept_per_batch() -> None:
    a = _samples(("srv-1", "egress", H, 60, 1), agent="ag-1", seq=1)
    b = _samples(("srv-1", "egress", H, 60, 2), agent="ag-2", seq=1)
    rated = rate(pl.concat([a, b]), FRAMES)
    assert rated.partials.select("agent_id", "seq", "quantity").rows() == [
        ("ag-1", 1, Decimal(1)),
        ("ag-2", 1, Decimal(2)),
    ]


def test_unresolvable_samples_are_returned_with_a_reason_never_dropped() -> None:
    rated = rate(
        _samples(
            ("srv-1", "egress", H, 60, 1),
            ("srv-9", "egress", H, 60, 1),
            ("srv-1", "egres", H, 60, 1),
            ("srv-1", "egress", H, 60, -5),
            ("srv-1", "disk", H, MAX_DURATION_S + 1, 1),
            ("srv-1", "egress", -1, 60, 1),
            ("srv-1", "egress", 253_402_300_800, 0, 1),
        ),
        FRAMES,
    )
    assert rated.unresolved.schema == pl.Schema(UNRESOLVED_SCHEMA)
    assert rated.unresolved.select("sample_index", "reason").rows() == [
        (1, "unknown resource 'srv-9'"),
        (2, "unknown meter 'egres'"),
        (3, "negative value -5"),
        (4, f"duration_s {MAX_DURATION_S + 1} is outside [0, {MAX_DURATION_S}]"),
        (5, "start_unix_s -1 is out of range"),
        (6, "start_unix_s 253402300800 is out of range"),
    ]
    assert rated.partials["sample_count"].to_list() == [1]


def test_frames_follow_the_catalog() -> None:
    assert FRAMES.resources.rows() == [("srv-1", "sub-1")]
    assert sorted(FRAMES.meters.rows()) == [
        ("disk", "gauge"),
        ("egress", "counter"),
        ("ipv4", "peak"),
    ]
