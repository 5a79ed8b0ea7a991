"""invoice.issued on a real Kafka-protocol broker, through the transactional outbox.

Given an issued invoice whose event is in the outbox, when the outbox is published, then the
topic holds one record keyed by the account with the invoice's number and total, and nothing
is pending. When a publisher crashes between publishing and marking, the next run publishes
the same event id again (at least once; consumers dedupe by event id).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from aggregation.ports import Store
from invoicer.close import close_period
from invoicer.issue import issue_invoices, publish_pending
from meterline.billing_events_kafka import EVENT_ID_HEADER, KafkaBillingEventSink
from meterline.cli import main as meterline
from rating.catalog_file import read_catalog_file
from tests.fixtures.kafka import TopicFactory

pytestmark = pytest.mark.integration

CATALOG_FILE = Path(__file__).parents[1] / "e2e" / "catalog.yaml"
CLOSE_AT = datetime(2026, 11, 1, 3, tzinfo=UTC)
ISSUED_AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


def read_all(bootstrap: str, topic: str) -> list[tuple[bytes, dict[str, object], bytes]]:
    """Every record of ``topic`` up to its high watermarks: (key, value, event id header)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"it-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        highs = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        wanted = sum(highs.values())
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[tuple[bytes, dict[str, object], bytes]] = []
        for _ in range(200):  # bounded: up to 200 polls of 0.1 s
            if len(out) >= wanted:
                break
            message = consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            key, value = message.key(), message.value()
            assert key is not None
            assert value is not None
            headers = dict(message.headers() or [])
            event_id = headers[EVENT_ID_HEADER]
            assert isinstance(event_id, bytes)
            out.append((key, json.loads(value), event_id))
        return out
    finally:
        consumer.close()


def test_issued_invoices_are_published_at_least_once(
    duckdb_store: Store, kafka_bootstrap: str, topic: TopicFactory
) -> None:
    billing_topic = topic("billing", partitions=2)
    close_period(duckdb_store, read_catalog_file(CATALOG_FILE).catalog, 2026, 10, CLOSE_AT)
    (issued,) = issue_invoices(
        duckdb_store, ["acme/2026-10-01"], ISSUED_AT, topic=billing_topic
    ).issued

    sink = KafkaBillingEventSink(kafka_bootstrap, timeout_s=30)
    try:
        # A publisher that dies between publishing and marking...
        sink.publish(duckdb_store.pending_billing_events())
        # ...is followed by one that publishes (again) and marks.
        assert publish_pending(duckdb_store, sink, ISSUED_AT) == 1
        assert publish_pending(duckdb_store, sink, ISSUED_AT) == 0
    finally:
        sink.close()
    assert duckdb_store.pending_billing_events() == []

    records = read_all(kafka_bootstrap, billing_topic)
    assert len(records) == 2  # the same event twice: at least once
    assert {event_id for _, _, event_id in records} == {b"invoice.issued/ML-2026-000001"}
    key, value, _ = records[0]
    assert key == b"acme"
    assert value == records[1][1]
    assert value["type"] == "invoice.issued"
    assert value["event_id"] == "invoice.issued/ML-2026-000001"
    assert value["key"] == "acme/2026-10-01"
    assert value["number"] == "ML-2026-000001"
    assert value["account"] == "acme"
    assert value["currency"] == "EUR"
    assert value["total_minor"] == issued.total_minor == 813 + 32 + 415
    assert value["issued_at"] == "2026-11-02T09:30:00Z"
    assert value["period"] == {
        "start": "2026-09-30T22:00:00Z",
        "end": "2026-10-31T23:00:00Z",
        "local_start": "2026-10-01",
        "local_end": "2026-11-01",
        "timezone": "Europe/Berlin",
    }


def test_the_issue_command_publishes_its_events(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic: TopicFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    billing_topic = topic("billing", partitions=1)
    monkeypatch.setenv("METERLINE_BILLING_EVENTS_TOPIC", billing_topic)
    monkeypatch.setenv("METERLINE_INVOICE_ISSUER", "ACME")
    store = ["--store", f"duckdb://{tmp_path / 'store.duckdb'}"]
    assert meterline(["catalog", "apply", str(CATALOG_FILE), *store]) == 0
    assert meterline(["close", "--period", "2026-10", "--now", CLOSE_AT.isoformat(), *store]) == 0
    capsys.readouterr()
    issue = ["invoice", "issue", "--all", "--now", ISSUED_AT.isoformat(), *store]
    assert meterline([*issue, "--kafka", kafka_bootstrap]) == 0
    out = capsys.readouterr().out
    assert "issued acme/2026-10-01: ACME-2026-000001" in out
    assert "published 1 billing event(s)" in out
    assert meterline(["events", "publish", *store, "--kafka", kafka_bootstrap]) == 0
    assert "published 0 billing event(s)" in capsys.readouterr().out
    ((key, value, event_id),) = read_all(kafka_bootstrap, billing_topic)
    assert (key, value["number"], event_id) == (
        b"acme",
        "ACME-2026-000001",
        b"invoice.issued/ACME-2026-000001",
    )
