"""The worker archives what it rates; ``meterline rerate`` and ``meterline usage`` on it.

Given a rating worker with the raw-batch archive on, consuming a real broker into
PostgreSQL or DuckDB, when the catalog moves a resource to another subscription, then
``meterline rerate`` shows the signed difference and writes nothing; with ``--apply`` it
replaces the hours (the JSON says how many rows changed) and a second run finds no
difference. ``meterline usage`` prints usage and provisional charges as text and JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml
from confluent_kafka import Producer

from aggregation.factory import open_store
from aggregation.ports import Store
from meterline.cli import main as meterline
from meterline.wiring import current_catalog
from rating.parquet_archive import ParquetArchive, archive_files, read_archive
from rating.worker import RatingWorker, WorkerConfig
from tests.fixtures.kafka import TopicFactory
from tests.unit.test_rating_rerate import (
    HOUR_0,
    HOUR_1,
    HOUR_2,
    RECORDS,
    catalog,
    catalog_document,
)

pytestmark = pytest.mark.integration

NOW = datetime(2026, 10, 4, tzinfo=UTC)
E2E_CATALOG = Path(__file__).parents[1] / "e2e" / "catalog.yaml"


@pytest.fixture(params=["postgresql", "duckdb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        pg: str = request.getfixturevalue("pg_url")
        return pg
    return f"duckdb://{tmp_path / 'store.duckdb'}"


def _produce(bootstrap: str, topic: str, values: Sequence[bytes]) -> None:
    errors: list[object] = []

    def on_delivery(error: object, _message: object) -> None:
        if error is not None:
            errors.append(error)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value=value, key=b"a", on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []


def _apply_catalog(url: str, path: Path, document: object) -> None:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    assert meterline(["catalog", "apply", str(path), "--store", url]) == 0


def _hourly(url: str) -> list[tuple[str, str, datetime, object, object, int]]:
    store = open_store(url)
    try:
        return store.usage_hourly(HOUR_0, HOUR_0 + timedelta(days=1)).rows()
    finally:
        store.close()


def test_the_worker_archives_and_rerate_moves_usage_exactly_once(
    kafka_bootstrap: str,
    topic: TopicFactory,
    url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    usage = topic("usage", partitions=2)
    deadletter = topic("deadletter", partitions=1)
    archive = tmp_path / "archive"
    monkeypatch.setenv("METERLINE_USAGE_TOPIC", usage)
    _apply_catalog(url, tmp_path / "v1.yaml", catalog_document("sub-1"))
    _produce(kafka_bootstrap, usage, [r.value for r in RECORDS if r.value is not None])

    store: Store = open_store(url)
    try:
        config = WorkerConfig(
            bootstrap=kafka_bootstrap,
            topic=usage,
            deadletter_topic=deadletter,
            group_id=f"rating-{usage}",
            archive_dir=archive,
        )
        with RatingWorker(config, store, current_catalog(store), lambda: NOW) as worker:
            stats = worker.run_until_idle(idle_s=1.5, max_seconds=60)
    finally:
        store.close()
    assert (stats.records, stats.batches_new, stats.batches_duplicate) == (3, 2, 1)
    assert archive_files(archive, usage)
    assert read_archive(archive, usage).height == 3  # every accepted record, once
    before = _hourly(url)
    assert ("sub-1", "net", HOUR_0) in [r[:3] for r in before]
    capsys.readouterr()

    _apply_catalog(url, tmp_path / "v2.yaml", catalog_document("sub-2"))
    span = ["--from", HOUR_0.isoformat(), "--to", HOUR_2.isoformat()]
    options = ["--store", url, "--archive-dir", str(archive)]
    assert meterline(["rerate", *span, *options]) == 0
    out = capsys.readouterr().out
    assert "catalog version 2" in out
    assert "quantity 100 -> 0 (-100)" in out
    assert "quantity 0 -> 50 (+50)" in out
    assert (
        "sub-1                    net                          quantity -150 over 2 hour(s)" in out
    )
    assert "4 hour row(s) differ" in out
    assert "dry run" in out
    assert _hourly(url) == before

    applied_at = "2026-10-05T00:00:00Z"
    assert (
        meterline(["rerate", *span, *options, "--apply", "--now", applied_at, "--format", "json"])
        == 0
    )
    document = json.loads(capsys.readouterr().out)
    # (a, 1) at two Kafka positions; (a, 2) lies in hour 2, outside the range: not read.
    assert (document["applied"], document["changed_rows"]) == (True, 4)
    assert (document["archived_records"], document["batches"]) == (2, 1)
    assert [
        (r["subscription_id"], r["hour_start"], r["quantity_diff"]) for r in document["rows"]
    ] == [
        ("sub-1", "2026-10-03T04:00:00Z", "-100"),
        ("sub-1", "2026-10-03T05:00:00Z", "-50"),
        ("sub-2", "2026-10-03T04:00:00Z", "100"),
        ("sub-2", "2026-10-03T05:00:00Z", "50"),
    ]
    after = _hourly(url)
    assert [r[:4] for r in after if r[1] == "net" and r[2] < HOUR_2] == [
        ("sub-2", "net", HOUR_0, 100),
        ("sub-2", "net", HOUR_1, 50),
    ]
    assert [r for r in after if r[2] >= HOUR_2] == [r for r in before if r[2] >= HOUR_2]

    assert meterline(["rerate", *span, *options]) == 0
    assert "no difference" in capsys.readouterr().out


def test_rerate_without_an_archive_is_bad_input(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["rerate", "--from", HOUR_0.isoformat(), "--to", HOUR_2.isoformat(), "--store", url]
    assert meterline(args) == 2
    assert "no raw-batch archive" in capsys.readouterr().err
    half_past = ["rerate", "--from", "2026-10-03T04:30:00Z", "--to", HOUR_2.isoformat()]
    assert meterline([*half_past, "--store", url, "--archive-dir", "/nonexistent"]) == 2
    assert "not on a whole UTC hour" in capsys.readouterr().err


def test_usage_prints_usage_and_provisional_charges(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert meterline(["catalog", "apply", str(E2E_CATALOG), "--store", url]) == 0
    capsys.readouterr()
    now = ["--now", "2026-10-20T00:00:00Z", "--store", url]

    assert meterline(["usage", "--account", "acme", *now]) == 0
    text = capsys.readouterr().out
    assert "Usage to date of account acme" in text
    assert "subscription acme-backup (plan backup)" in text
    assert "no metered usage yet" in text
    assert "account preview total" in text

    assert meterline(["usage", "--subscription", "acme-backup", *now, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (backup,) = document["subscriptions"]
    assert backup["subscription_id"] == "acme-backup"
    assert backup["provisional_minor"] == sum(line["amount_minor"] for line in backup["lines"])
    assert backup["provisional_minor"] > 0  # the recurring fee, prorated from Oct 11
    assert document["period"]["timezone"] == "Europe/Berlin"

    assert meterline(["usage", "--subscription", "nope", *now]) == 2
    assert "unknown subscription 'nope'" in capsys.readouterr().err


class _FullDisk:
    """A RawArchive whose writes fail, as a full disk would."""

    def __init__(self) -> None:
        self.calls = 0

    def write(self, records: pl.DataFrame) -> int:
        self.calls += 1
        raise OSError(f"no space left on device ({records.height} records)")


def test_a_poll_is_stored_only_after_it_is_archived(
    kafka_bootstrap: str, topic: TopicFactory, store: Store, tmp_path: Path
) -> None:
    usage = topic("usage", partitions=1)
    _produce(kafka_bootstrap, usage, [r.value for r in RECORDS[:2] if r.value is not None])
    config = WorkerConfig(
        bootstrap=kafka_bootstrap,
        topic=usage,
        deadletter_topic=topic("deadletter", partitions=1),
        group_id=f"rating-{usage}",
        store_attempts=2,
        store_backoff_s=0.01,
    )
    full = _FullDisk()
    with (
        RatingWorker(config, store, catalog("sub-1"), lambda: NOW, archive=full) as worker,
        pytest.raises(OSError, match="no space left"),
    ):
        worker.run_until_idle(idle_s=1.5, max_seconds=60)
    assert full.calls == 2  # retried, then the worker stopped
    assert store.ledger_count() == 0
    assert store.committed_offsets(config.group_id, usage) == {}

    archive = ParquetArchive(tmp_path / "archive")
    with RatingWorker(config, store, catalog("sub-1"), lambda: NOW, archive=archive) as worker:
        stats = worker.run_until_idle(idle_s=1.5, max_seconds=60)
    assert (stats.records, stats.batches_new) == (2, 2)
    assert read_archive(archive.root, usage)["seq"].to_list() == [1, 2]
