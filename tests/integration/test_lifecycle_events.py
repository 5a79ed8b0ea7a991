"""Resource lifecycle events, end to end on the real broker and the real stores.

Given a catalog with two hourly plans and an agent whose token covers srv-1 only, when the
agent sends CREATED / RESIZED / DELETED for srv-1 (and events the edge must refuse) over
``SendLifecycleEvents``, then the ack accepts exactly the good events with a code per bad
one, Kafka holds them, the spans worker turns them into two spans in the store, a replay
(the same batch resent, and the topic read again by a fresh group) changes nothing, and the
period close bills srv-1's hours from those spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from aggregation.pg_store import PgStore
from aggregation.ports import SPANS_SCHEMA, Store
from collectors.auth import bearer_metadata
from collectors.grpc_server import CollectorServer
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from invoicer.close import close_period
from invoicer.invoice import LineKind
from meterline.cli import main
from meterline.wiring import current_catalog, issue_agent_token, read_collector_inputs
from meterline_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from meterline_proto.usage.v1 import lifecycle_pb2
from rating.catalog_file import read_catalog_file
from rating.lifecycle_worker import SpansConfig, SpansStats, SpansWorker
from tests.fixtures.kafka import TopicFactory

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 1, tzinfo=UTC)  # the collector's clock
CLOSE_AT = datetime(2026, 11, 2, tzinfo=UTC)
CATALOG = """
meters:
  - {name: net.egress.bytes, kind: counter, base_unit: byte, display_unit: GB, base_per_display: "1000000000"}
plans:
  - {id: vps-s, name: VPS S, hourly: {rate: {EUR: "0.0070"}, cap: {EUR: "4.15"}}}
  - {id: vps-m, name: VPS M, hourly: {rate: {EUR: "0.0140"}, cap: {EUR: "8.30"}}}
accounts:
  - {id: acme, name: ACME, currency: EUR, timezone: UTC}
subscriptions:
  - {id: acme-vps, account: acme, plan: vps-s, start: "2026-09-01T00:00:00Z"}
resources:
  - {id: srv-1, subscription: acme-vps, kind: server}
  - {id: srv-2, subscription: acme-vps, kind: server}
"""  # noqa: E501

CREATED_AT = datetime(2026, 10, 3, 10, 20, tzinfo=UTC)
RESIZED_AT = datetime(2026, 10, 4, 10, 20, tzinfo=UTC)
DELETED_AT = datetime(2026, 10, 5, 8, 10, tzinfo=UTC)


def unix(instant: datetime) -> int:
    return int(instant.timestamp())


def event(
    event_id: str,
    kind: lifecycle_pb2.LifecycleKind.ValueType,
    at: datetime,
    plan: str = "",
    resource: str = "srv-1",
) -> lifecycle_pb2.LifecycleEvent:
    return lifecycle_pb2.LifecycleEvent(
        event_id=event_id, resource_id=resource, kind=kind, plan_id=plan,
        occurred_at_unix_s=unix(at),
    )  # fmt: skip


EVENTS = [
    event("e-1", lifecycle_pb2.CREATED, CREATED_AT, "vps-s"),
    event("e-2", lifecycle_pb2.RESIZED, RESIZED_AT, "vps-m"),
    event("e-3", lifecycle_pb2.DELETED, DELETED_AT),
    event("e-4", lifecycle_pb2.CREATED, CREATED_AT, "vps-s", resource="srv-2"),  # out of scope
    event("e-5", lifecycle_pb2.RESIZED, RESIZED_AT, "vps-xl"),  # unknown plan
    event("e-6", lifecycle_pb2.DELETED, datetime(2026, 11, 1, 1, tzinfo=UTC)),  # the future
]


@pytest.fixture
def catalog_store(pg_store: PgStore, tmp_path: Path) -> PgStore:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG)
    applied = read_catalog_file(path)
    pg_store.save_catalog(applied.document, applied.digest, applied.source, NOW)
    return pg_store


@contextlib.asynccontextmanager
async def collector(bootstrap: str, store_url: str, topics: Sequence[str]) -> AsyncIterator[str]:
    inputs = read_collector_inputs(store_url)
    sink = KafkaSink(bootstrap)
    usage, rejects, lifecycle = topics
    ingestor = Ingestor(
        inputs.directory,
        sink,
        IngestSettings(
            collector_id="lifecycle-it",
            topic=usage,
            rejects_topic=rejects,
            lifecycle_topic=lifecycle,
        ),
        lambda: NOW,
        authenticator=inputs.authenticator,
    )
    server = CollectorServer(ingestor)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        sink.close(5.0)


async def send(
    target: str, batch: agent_pb2.LifecycleBatch, token: str | None
) -> agent_pb2.LifecycleAck:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = agent_pb2_grpc.IngestServiceStub(channel)
        metadata = bearer_metadata(token) if token is not None else None
        return await stub.SendLifecycleEvents(batch, metadata=metadata)


def run_spans(bootstrap: str, store: Store, topic: str, group: str) -> SpansStats:
    config = SpansConfig(
        bootstrap=bootstrap,
        topic=topic,
        group_id=group,
        deadletter_topic=f"{topic}.dlq",
        poll_timeout_s=0.2,
    )
    with SpansWorker(config, store, current_catalog(store), lambda: NOW) as worker:
        return worker.run_until_idle(idle_s=1.0, max_seconds=60.0)


def spans_rows(store: Store) -> list[tuple[object, ...]]:
    frame = store.resource_spans(datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert frame.schema == SPANS_SCHEMA
    return frame.rows()


def test_events_travel_to_spans_once_and_the_close_bills_their_hours(
    kafka_bootstrap: str,
    topic: TopicFactory,
    catalog_store: PgStore,
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = issue_agent_token(catalog_store, "agent-1", ["srv-1"], NOW)
    topics = [topic("usage"), topic("rejects"), topic("lifecycle", partitions=2)]
    batch = agent_pb2.LifecycleBatch(agent_id="agent-1", events=EVENTS)

    async def scenario() -> tuple[list[agent_pb2.LifecycleAck], grpc.aio.AioRpcError]:
        async with collector(kafka_bootstrap, pg_url, topics) as target:
            acks = [await send(target, batch, token), await send(target, batch, token)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await send(target, batch, None)
            return acks, refused.value

    acks, refused = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    for ack in acks:  # the resend is validated, written and acked the same way
        assert ack.accepted_count == 3
        codes = [
            (r.event_index, agent_pb2.RejectCode.Name(r.code), r.field) for r in ack.rejections
        ]
        assert codes == [
            (3, "FORBIDDEN_RESOURCE", "resource_id"),
            (4, "UNKNOWN_PLAN", "plan_id"),
            (5, "TIMESTAMP_OUT_OF_RANGE", "occurred_at_unix_s"),
        ]

    first = run_spans(kafka_bootstrap, catalog_store, topics[2], "spans-it")
    assert (first.records, first.events, first.new_events, first.duplicate_events) == (2, 6, 3, 3)
    expected = [
        ("srv-1", "acme-vps", "vps-s", CREATED_AT, RESIZED_AT),
        ("srv-1", "acme-vps", "vps-m", RESIZED_AT, DELETED_AT),
    ]
    assert spans_rows(catalog_store) == expected
    assert catalog_store.lifecycle_events()["event_id"].to_list() == ["e-1", "e-2", "e-3"]

    # A fresh group reads the whole topic again: every event is a duplicate, nothing changes.
    again = run_spans(kafka_bootstrap, catalog_store, topics[2], f"spans-{uuid.uuid4().hex}")
    assert (again.records, again.new_events, again.duplicate_events, again.resources) == (
        2,
        0,
        6,
        0,
    )
    assert spans_rows(catalog_store) == expected
    # `meterline spans run` in the first group resumes from the store's offsets: nothing to read.
    argv = ["spans", "run", "--store", pg_url, "--kafka", kafka_bootstrap, "--topic", topics[2]]
    assert main([*argv, "--group", "spans-it", "--until-idle", "1", "--max-seconds", "60"]) == 0
    assert "SpansStats(polls=0, records=0," in capsys.readouterr().out

    result = close_period(catalog_store, current_catalog(catalog_store), 2026, 10, CLOSE_AT)
    hourly = [line for i in result.invoices for line in i.lines if line.kind is LineKind.HOURLY]
    assert {line.resource_id for line in hourly} == {"srv-1"}
    # 24 h on vps-s then 21 h 50 min on vps-m: 45 h 50 min in all.
    by_plan = {line.plan_id: (line.quantity, line.unit_price) for line in hourly}
    # Priced per plan segment: each plan's started hours at its own rate.
    assert by_plan == {
        "vps-s": (Decimal(24), Decimal("0.0070")),
        "vps-m": (Decimal(22), Decimal("0.0140")),
    }
