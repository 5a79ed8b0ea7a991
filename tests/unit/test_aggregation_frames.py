"""aggregation.frames.sum_per_hour_with_sources: the hour rows write_rated upserts and, per
hour row, the slice of one flat batch-id array that PostgreSQL stores as its usage_sources."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import polars as pl
import pytest

from aggregation.frames import (
    HOURLY_KEY,
    _strictly_sorted,
    prepare_rated,
    sum_per_hour_with_sources,
)
from aggregation.ports import LEDGER_SCHEMA, PARTIALS_SCHEMA

H0 = datetime(2026, 10, 1, tzinfo=UTC)
BIG = (10**38 - 1) // 2 + 1  # two of these may pass 38 digits


def fresh(*rows: tuple[str, int, str, int, int, int]) -> pl.DataFrame:
    """(agent_id, seq, subscription_id, hour, quantity, batch_id) rows, meter "m"."""
    frame = pl.DataFrame(
        [
            (agent, seq, sub, "m", H0 + timedelta(hours=h), Decimal(q), Decimal(q), 1)
            for agent, seq, sub, h, q, _ in rows
        ],
        schema=PARTIALS_SCHEMA,
        orient="row",
    )
    return frame.with_columns(batch_id=pl.Series([r[5] for r in rows], dtype=pl.Int64))


def sources(frame: pl.DataFrame) -> dict[tuple[object, ...], list[int]]:
    """Hour row -> its batch ids, read back the way the server slices them (rows with an
    empty slice add nothing)."""
    result = sum_per_hour_with_sources(frame)
    flat = result.batch_ids.to_list()
    found: dict[tuple[object, ...], list[int]] = {}
    for row in result.hourly.iter_rows(named=True):
        if row["lo"] <= row["hi"]:
            key = tuple(row[c] for c in HOURLY_KEY)
            assert key not in found, f"two source rows for {key}"
            found[key] = sorted(flat[row["lo"] - 1 : row["hi"]])
    return found


def summed(parts: pl.DataFrame) -> pl.DataFrame:
    """The hour rows as the database would sum them."""
    return (
        parts.group_by(HOURLY_KEY)
        .agg(pl.col("quantity").sum(), pl.col("quantity_max").max(), pl.col("sample_count").sum())
        .sort(HOURLY_KEY)
    )


PARTS = fresh(
    ("a", 1, "s1", 0, 5, 10),
    ("a", 1, "s1", 1, 6, 10),
    ("b", 1, "s1", 0, 7, 11),
    ("b", 1, "s2", 0, 8, 11),
    ("c", 3, "s1", 0, 9, 12),
)


def test_hour_rows_are_summed_and_each_lists_its_batches_once() -> None:
    result = sum_per_hour_with_sources(PARTS)
    assert result.hourly.drop("lo", "hi").sort(HOURLY_KEY).equals(summed(PARTS))
    assert result.hourly.schema["lo"] == result.hourly.schema["hi"] == pl.Int32()
    assert result.batch_ids.len() == PARTS.height
    assert sources(PARTS) == {
        ("s1", "m", H0): [10, 11, 12],
        ("s1", "m", H0 + timedelta(hours=1)): [10],
        ("s2", "m", H0): [11],
    }


def test_rows_left_unsummed_still_give_one_source_row_per_hour_row() -> None:
    parts = pl.concat([PARTS, fresh(("d", 1, "s1", 0, BIG, 13))])
    result = sum_per_hour_with_sources(parts)
    # Unsummed: the database's exact sum adds them up.
    assert result.hourly.height == parts.height
    columns = [*HOURLY_KEY, "quantity", "quantity_max", "sample_count"]
    assert sorted(result.hourly.select(columns).rows()) == sorted(parts.select(columns).rows())
    assert sources(parts) == {
        ("s1", "m", H0): [10, 11, 12, 13],
        ("s1", "m", H0 + timedelta(hours=1)): [10],
        ("s2", "m", H0): [11],
    }


def test_strictly_sorted_sees_order_and_repeats_on_every_key_column() -> None:
    key = ("agent_id", "seq", "subscription_id", "hour_start")
    rows = fresh(("a", 1, "s1", 0, 1, 1), ("a", 1, "s1", 1, 1, 1), ("a", 1, "s2", 0, 1, 1),
                 ("a", 2, "s0", 0, 1, 2), ("b", 0, "s0", 0, 1, 3))  # fmt: skip
    assert _strictly_sorted(rows, key)
    assert _strictly_sorted(rows.head(1), key)
    assert not _strictly_sorted(pl.concat([rows, rows.tail(1)]), key)  # a repeat
    assert not _strictly_sorted(rows.reverse(), key)
    swapped = pl.concat([rows.slice(1, 1), rows.slice(0, 1), rows.slice(2)])  # last column
    assert not _strictly_sorted(swapped, key)


def test_prepare_rated_refuses_clashing_rows_sorted_or_not() -> None:
    ledger = pl.DataFrame([("a", 1, "t", 0, 0, H0, 2)], schema=LEDGER_SCHEMA, orient="row")
    clash = fresh(("a", 1, "s1", 0, 1, 1), ("a", 1, "s1", 0, 2, 1)).drop("batch_id")
    for partials in (clash, clash.reverse()):
        with pytest.raises(ValueError, match="different rows for the same"):
            prepare_rated(ledger, partials, [], H0)
    same = fresh(("a", 1, "s1", 0, 1, 1), ("a", 1, "s1", 0, 1, 1)).drop("batch_id")
    assert prepare_rated(ledger, same, [], H0).partials.height == 1
