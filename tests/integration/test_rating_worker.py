"""The rating worker on a real broker and each real store: exactly once, nothing lost.

Given usage records on a topic (one batch twice, one unknown resource, one undecodable
record), when the worker runs until idle, then usage_hourly holds exactly the expected
totals, the duplicate counted once, and the dead-letter topic holds the bad parts with
their headers. Running again (same group, a fresh group, Kafka offsets rewound) changes
nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from aggregation.ports import Store
from meterline_proto.usage.v1 import samples_pb2, usage_record_pb2
from rating.catalog_file import parse_catalog
from rating.worker import RatingWorker, WorkerConfig, WorkerStats
from tests.fixtures.kafka import TopicFactory

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 2, tzinfo=UTC)
H = 1_791_000_000 // 3600 * 3600  # 2026-10-03T04:00:00Z
HOUR_0 = datetime(2026, 10, 3, 4, tzinfo=UTC)
HOUR_1 = datetime(2026, 10, 3, 5, tzinfo=UTC)
PARTITIONS = 3

CATALOG = parse_catalog(
    {
        "meters": [
            {"name": "net.egress.bytes", "kind": "counter", "base_unit": "byte",
             "display_unit": "GB", "base_per_display": "1000000000"},
            {"name": "storage.block.bytes", "kind": "gauge", "base_unit": "byte",
             "display_unit": "GiB-month", "base_per_display": "1073741824"},
        ],
        "plans": [{"id": "p", "name": "P"}],
        "accounts": [{"id": "a", "name": "A", "currency": "EUR", "timezone": "UTC"}],
        "subscriptions": [
            {"id": "sub-1", "account": "a", "plan": "p", "start": "2026-10-01T00:00:00Z"},
            {"id": "sub-2", "account": "a", "plan": "p", "start": "2026-10-01T00:00:00Z"},
        ],
        "resources": [
            {"id": "srv-1", "subscription": "sub-1", "kind": "server"},
            {"id": "vol-1", "subscription": "sub-2", "kind": "volume"},
        ],
    },
    "test",
)  # fmt: skip

Row = tuple[str, str, int, int, int]  # resource, meter, start, duration, value


def _batch(agent: str, seq: int, rows: Sequence[Row]) -> bytes:
    resources = sorted({r[0] for r in rows})
    meters = sorted({r[1] for r in rows})
    return usage_record_pb2.UsageBatchRecord(
        agent_id=agent,
        seq=seq,
        received_at_unix_ms=(H + 4000) * 1000,
        collector_id="it",
        samples=samples_pb2.SampleColumns(
            resource_dict=resources,
            meter_dict=meters,
            resource_index=[resources.index(r[0]) for r in rows],
            meter_index=[meters.index(r[1]) for r in rows],
            start_unix_s=[r[2] for r in rows],
            duration_s=[r[3] for r in rows],
            value=[r[4] for r in rows],
        ),
    ).SerializeToString()


BATCH_1 = _batch(
    "agent-1",
    1,
    [
        ("srv-1", "net.egress.bytes", H + 10, 60, 100),
        ("srv-1", "net.egress.bytes", H + 3700, 60, 50),
        ("vol-1", "storage.block.bytes", H + 1800, 3600, 10),  # half in each hour
    ],
)
BATCH_2 = _batch(
    "agent-2",
    1,
    [
        ("srv-1", "net.egress.bytes", H + 20, 60, 7),
        ("srv-9", "net.egress.bytes", H + 30, 60, 999),  # unknown resource
    ],
)
BATCH_3 = _batch("agent-1", 2, [("srv-1", "net.egress.bytes", H + 3600, 1, 1)])
GARBAGE = b"\x08\x96\x01 not a usage record \xff"

EXPECTED_HOURLY = [
    ("sub-1", "net.egress.bytes", HOUR_0, Decimal(107), Decimal(100), 2),
    ("sub-1", "net.egress.bytes", HOUR_1, Decimal(51), Decimal(50), 2),
    ("sub-2", "storage.block.bytes", HOUR_0, Decimal(18000), Decimal(10), 1),
    ("sub-2", "storage.block.bytes", HOUR_1, Decimal(18000), Decimal(10), 0),
]


def _produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]]) -> list[Message]:
    delivered: list[Message] = []
    errors: list[object] = []

    def on_delivery(error: object, message: Message) -> None:
        if error is not None:
            errors.append(error)
        else:
            delivered.append(message)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        producer.flush(30)  # one at a time: keeps the order of the list in the log
    assert errors == []
    assert len(delivered) == len(records)
    return delivered


def _read_all(bootstrap: str, topic: str, expected: int) -> list[Message]:
    """Read the whole topic from the beginning until ``expected`` records came (bounded)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "receive.message.max.bytes": 1_000_000_000,
        }
    )
    consumer.subscribe([topic])
    messages: list[Message] = []
    deadline = time.monotonic() + 30
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            messages.extend(m for m in consumer.consume(100, 0.5) if m.error() is None)
        # Anything beyond the expected records would be a defect: give it one more poll.
        messages.extend(m for m in consumer.consume(100, 1.0) if m.error() is None)
    finally:
        consumer.close()
    return messages


def _headers(message: Message) -> dict[str, bytes]:
    raw = message.headers() or []
    assert isinstance(raw, list)
    headers: dict[str, bytes] = {}
    for key, value in raw:
        assert isinstance(value, bytes)
        headers[key] = value
    return headers


def _config(bootstrap: str, usage: str, deadletter: str, group: str) -> WorkerConfig:
    return WorkerConfig(
        bootstrap=bootstrap,
        topic=usage,
        deadletter_topic=deadletter,
        group_id=group,
        max_records_per_poll=2,  # several polls, several transactions
        store_backoff_s=0.05,
    )


def _run(config: WorkerConfig, store: Store) -> WorkerStats:
    with RatingWorker(config, store, CATALOG, lambda: NOW) as worker:
        return worker.run_until_idle(idle_s=1.5, max_seconds=60)


def _hourly(store: Store) -> list[tuple[object, ...]]:
    return store.usage_hourly(HOUR_0, NOW).rows()


def test_worker_rates_exactly_once_and_dead_letters_the_rest(
    kafka_bootstrap: str, topic: TopicFactory, store: Store
) -> None:
    usage = topic("usage", partitions=PARTITIONS)
    deadletter = topic("deadletter", partitions=1)
    delivered = _produce(
        kafka_bootstrap,
        usage,
        [
            (b"agent-1", BATCH_1),
            (b"agent-2", BATCH_2),
            (b"agent-1", BATCH_1),  # the same batch again (a producer retry)
            (b"bad", GARBAGE),
            (b"agent-1", BATCH_3),
        ],
    )
    group = f"rating-{usage}"
    config = _config(kafka_bootstrap, usage, deadletter, group)

    stats = _run(config, store)

    assert (stats.records, stats.batches_new, stats.batches_duplicate) == (5, 3, 1)
    assert (stats.undecodable, stats.unresolved_samples, stats.dead_lettered) == (1, 1, 2)
    assert store.ledger_count() == 3
    assert _hourly(store) == EXPECTED_HOURLY
    next_offsets: dict[int, int] = {}
    for m in delivered:
        partition, offset = m.partition(), m.offset()
        assert partition is not None
        assert offset is not None
        next_offsets[partition] = max(next_offsets.get(partition, 0), offset + 1)
    assert store.committed_offsets(group, usage) == next_offsets

    letters = _read_all(kafka_bootstrap, deadletter, expected=2)
    assert len(letters) == 2
    by_kind = {_headers(m)["meterline.error.kind"]: m for m in letters}
    assert set(by_kind) == {b"undecodable", b"unresolved"}

    bad = by_kind[b"undecodable"]
    bad_source = delivered[3]
    assert bad.value() == GARBAGE
    assert bad.key() == b"bad"
    headers = _headers(bad)
    assert headers["meterline.error"].startswith(b"not a UsageBatchRecord")
    assert headers["meterline.stage"] == b"rating"
    assert headers["meterline.source.topic"] == usage.encode()
    assert headers["meterline.source.partition"] == str(bad_source.partition()).encode()
    assert headers["meterline.source.offset"] == str(bad_source.offset()).encode()

    unresolved = by_kind[b"unresolved"]
    headers = _headers(unresolved)
    assert headers["meterline.error"] == b"unknown resource 'srv-9' (1 sample)"
    assert headers["meterline.sample_indexes"] == b"1"
    assert headers["meterline.source.offset"] == str(delivered[1].offset()).encode()
    value = unresolved.value()
    assert value is not None
    record = usage_record_pb2.UsageBatchRecord.FromString(value)
    assert (record.agent_id, record.seq) == ("agent-2", 1)
    assert list(record.samples.value) == [999]
    assert [record.samples.resource_dict[i] for i in record.samples.resource_index] == ["srv-9"]

    # A second worker of the same group starts where the store says: nothing to do.
    again = _run(config, store)
    assert again.records == 0
    assert _hourly(store) == EXPECTED_HOURLY

    # Kafka's committed offsets rewound (as if the commit after the store write was lost):
    # the worker still resumes from the store's offsets.
    rewind = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    try:
        rewind.commit(
            offsets=[TopicPartition(usage, p, 0) for p in range(PARTITIONS)], asynchronous=False
        )
    finally:
        rewind.close()
    assert _run(config, store).records == 0

    # A fresh group replays the whole topic: every batch is a duplicate, nothing changes.
    replay = _run(_config(kafka_bootstrap, usage, deadletter, f"{group}-replay"), store)
    assert (replay.records, replay.batches_new, replay.batches_duplicate) == (5, 0, 4)
    assert store.ledger_count() == 3
    assert _hourly(store) == EXPECTED_HOURLY
