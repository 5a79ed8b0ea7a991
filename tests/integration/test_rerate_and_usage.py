"""Re-rating from the raw-batch archive, late-usage queries and usage to date, on each store.

Given batches rated and archived as the worker does, when a resource moves to another
subscription and the hours are re-rated, then the signed difference is exact, applying it
replaces the hours in one transaction without touching the ledger (a redelivery is still a
duplicate, re-rating again shows no difference), and the changed hours are findable as late
usage. A re-rating that misses a counted batch is refused. Usage to date shows each
subscription's usage and its provisional charges, the preview's own lines.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from aggregation.ports import ReplaceConflictError, Store
from invoicer.lines import ChargeConfigurationError
from invoicer.preview import preview_invoice
from invoicer.usage_to_date import usage_to_date, usage_to_dict
from rating.archive import archive_frame
from rating.catalog_file import read_catalog_file
from rating.engine import CatalogFrames, rate
from rating.parquet_archive import ParquetArchive, read_archive
from rating.record_codec import RawRecord, decode_records
from rating.rerate import apply_rerating, rerate
from tests.unit.test_rating_archive import TOPIC
from tests.unit.test_rating_rerate import HOUR_0, HOUR_1, HOUR_2, RECORDS, catalog

pytestmark = pytest.mark.integration

RATED_AT = datetime(2026, 10, 4, tzinfo=UTC)
APPLIED_AT = datetime(2026, 10, 5, tzinfo=UTC)
E2E_CATALOG = Path(__file__).parents[1] / "e2e" / "catalog.yaml"


def rate_and_archive(store: Store, archive: ParquetArchive, records: list[RawRecord]) -> None:
    """One poll as the worker processes it: archive, then the store transaction."""
    decoded = decode_records(records)
    rated = rate(decoded.samples, CatalogFrames.from_catalog(catalog("sub-1")))
    archive.write(archive_frame(records, decoded))
    store.write_rated(decoded.ledger, rated.partials, [], RATED_AT)


def hourly_rows(store: Store) -> list[tuple[str, str, datetime, object, object, int]]:
    return store.usage_hourly(HOUR_0, HOUR_0 + timedelta(days=1)).rows()


def test_a_moved_resource_is_re_rated_and_applied_exactly_once(
    store: Store, tmp_path: Path
) -> None:
    archive = ParquetArchive(tmp_path / "archive")
    rate_and_archive(store, archive, RECORDS[:2])
    rate_and_archive(store, archive, RECORDS[2:])  # a redelivery of (a, 1)
    before = hourly_rows(store)
    moved = catalog("sub-2")

    result = rerate(
        read_archive(archive.root, TOPIC),
        store.usage_hourly(HOUR_0, HOUR_2),
        moved,
        HOUR_0,
        HOUR_2,
    )

    assert result.diff.select("subscription_id", "meter", "hour_start", "quantity_diff").rows() == [
        ("sub-1", "net", HOUR_0, -100),
        ("sub-1", "net", HOUR_1, -50),
        ("sub-2", "net", HOUR_0, 100),
        ("sub-2", "net", HOUR_1, 50),
    ]
    assert hourly_rows(store) == before  # a dry run writes nothing

    assert apply_rerating(store, result, APPLIED_AT) == 4
    after = hourly_rows(store)
    assert store.usage_hourly(HOUR_0, HOUR_2).equals(result.hourly)
    assert [r for r in after if r[2] >= HOUR_2] == [r for r in before if r[2] >= HOUR_2]
    assert store.ledger_count() == 2
    assert store.usage_changed_since(RATED_AT).select("subscription_id", "hour_start").rows() == [
        ("sub-2", HOUR_0),
        ("sub-2", HOUR_1),
    ]  # sub-1's rows were deleted; sub-2's disk rows did not change
    # Exactly once: a redelivery is still a duplicate, and re-rating again finds nothing.
    rate_and_archive(store, archive, RECORDS[:1])
    assert hourly_rows(store) == after
    again = rerate(
        read_archive(archive.root, TOPIC), store.usage_hourly(HOUR_0, HOUR_2), moved, HOUR_0, HOUR_2
    )
    assert again.diff.is_empty()


def test_a_re_rating_missing_a_counted_batch_is_refused(store: Store, tmp_path: Path) -> None:
    archive = ParquetArchive(tmp_path / "archive")
    decoded = decode_records(RECORDS[:1])
    rated = rate(decoded.samples, CatalogFrames.from_catalog(catalog("sub-1")))
    store.write_rated(decoded.ledger, rated.partials, [], RATED_AT)  # counted, not archived
    rate_and_archive(store, archive, RECORDS[1:2])
    before = hourly_rows(store)

    result = rerate(
        read_archive(archive.root, TOPIC),
        store.usage_hourly(HOUR_0, HOUR_2),
        catalog("sub-1"),
        HOUR_0,
        HOUR_2,
    )
    assert result.diff.height == 4  # without (a, 1) every hour looks empty

    with pytest.raises(ReplaceConflictError, match=r"\('a', 1\)"):
        apply_rerating(store, result, APPLIED_AT)
    assert hourly_rows(store) == before


def test_usage_to_date_shows_usage_and_the_previews_charges(store: Store) -> None:
    e2e = read_catalog_file(E2E_CATALOG).catalog
    hour = datetime(2026, 10, 10, tzinfo=UTC)
    partials = pl.DataFrame(
        {
            "agent_id": ["a"],
            "seq": [1],
            "subscription_id": ["acme-vps"],
            "meter": ["net.egress.bytes"],
            "hour_start": [hour],
            "quantity": [1_500 * 10**9],
            "quantity_max": [10**12],
            "sample_count": [3],
        }
    ).cast({"quantity": pl.Decimal(38, 0), "quantity_max": pl.Decimal(38, 0)})
    ledger = pl.DataFrame(
        {
            "agent_id": ["a"],
            "seq": [1],
            "topic": [TOPIC],
            "partition": [0],
            "offset": [0],
            "received_at": [hour],
            "sample_count": [3],
        }
    ).cast({"partition": pl.Int32})
    store.write_rated(ledger, partials, [], RATED_AT)
    now = datetime(2026, 10, 20, tzinfo=UTC)

    usage = usage_to_date(store, e2e, now, account_id="acme")

    assert [s.subscription_id for s in usage.subscriptions] == ["acme-backup", "acme-vps"]
    vps = usage.subscriptions[1]
    assert [(m.meter, m.quantity, m.quantity_max, m.sample_count) for m in vps.meters] == [
        ("net.egress.bytes", 1_500 * 10**9, 10**12, 3)
    ]
    egress = [line for line in vps.lines if line.meter == "net.egress.bytes"]
    assert [line.amount_minor for line in egress] == [500]  # 500 GB beyond the 1000 included
    preview = preview_invoice(store, e2e, "acme", now)
    assert usage.preview == preview
    assert sum(s.provisional_minor for s in usage.subscriptions) == preview.subtotal_minor
    assert usage.subscriptions[0].meters == ()
    document = usage_to_dict(usage)
    assert document["account_preview_total_minor"] == preview.total_minor
    assert usage.period.start <= now < usage.period.end

    one = usage_to_date(store, e2e, now, subscription_id="acme-vps")
    assert one.subscriptions == (vps,)
    with pytest.raises(ChargeConfigurationError, match="unknown subscription 'nope'"):
        usage_to_date(store, e2e, now, subscription_id="nope")
    with pytest.raises(ValueError, match="exactly one"):
        usage_to_date(store, e2e, now)
