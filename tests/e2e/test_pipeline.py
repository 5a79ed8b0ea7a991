"""Agent to invoice on real components: gRPC collector -> Kafka -> rating worker ->
PostgreSQL -> period close, with a duplicated batch, a retried batch and bad input.

Given the catalog in catalog.yaml and egress of exactly 12,345,678,901,234 bytes in
October 2026 (U1's figure), when the agents' batches go through the whole pipeline, some of
them twice, then the invoice holds R1, H1, H2 and a per-unit usage line over the 1,000 GB
allowance: 11,345.678901234 GB x 0.0100 = 113.46, and every batch counted exactly once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from aggregation.pg_store import PgStore
from collectors.grpc_server import CollectorServer
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from meterline.cli import main as meterline
from meterline.wiring import current_catalog, directory_for, frozen_clock
from meterline_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from rating.worker import RatingWorker, WorkerConfig
from tests.fixtures.kafka import TopicFactory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CATALOG = Path(__file__).with_name("catalog.yaml")
NOW = datetime(2026, 11, 1, 3, tzinfo=UTC)  # Berlin's October ended 23:00Z; grace 2 h
T = int(datetime(2026, 10, 4, 10, tzinfo=UTC).timestamp())  # inside srv-1's life


def batch(
    agent_id: str, seq: int, samples: Sequence[tuple[str, int, int]]
) -> agent_pb2.SampleBatch:
    """samples: (resource_id, start_unix_s, value) of net.egress.bytes, 300 s each."""
    resources = sorted({r for r, _, _ in samples})
    message = agent_pb2.SampleBatch(agent_id=agent_id, seq=seq)
    columns = message.samples
    columns.resource_dict.extend(resources)
    columns.meter_dict.append("net.egress.bytes")
    columns.resource_index.extend(resources.index(r) for r, _, _ in samples)
    columns.meter_index.extend(0 for _ in samples)
    columns.start_unix_s.extend(start for _, start, _ in samples)
    columns.duration_s.extend(300 for _ in samples)
    columns.value.extend(value for _, _, value in samples)
    return message


# 5,345,678,901,234 + 5,000,000,000,000 + 2,000,000,000,000 = 12,345,678,901,234 bytes.
BATCH_1 = batch(
    "agent-a",
    1,
    [
        ("srv-1", T, 4_000_000_000_000),
        ("srv-ghost", T, 7),  # unknown resource: rejected alone
        ("srv-1", T + 300, 345_678_901_234),
        ("srv-1", T + 600, -5),  # negative quantity: rejected alone
        ("srv-1", T + 3600, 1_000_000_000_000),  # the next hour
    ],
)
BATCH_2 = batch("agent-a", 2, [("srv-2", T, 5_000_000_000_000)])
BATCH_3 = batch("agent-b", 1, [("srv-2", T + 7200, 2_000_000_000_000)])


async def _send_everything(port: int) -> list[agent_pb2.BatchAck]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agent_pb2_grpc.IngestServiceStub(channel)
        acks = [await stub.SubmitBatch(BATCH_1)]
        acks.append(await stub.SubmitBatch(BATCH_2))
        acks.append(await stub.SubmitBatch(BATCH_2))  # duplicated: the agent sent it twice
        # Retried: sent on a stream whose ack the agent never read, then on a new stream.
        first = stub.StreamBatches()
        await first.write(BATCH_3)
        await first.done_writing()
        retry = stub.StreamBatches()
        await retry.write(BATCH_3)
        await retry.done_writing()
        acks.extend([ack async for ack in retry])
        acks.extend([ack async for ack in first])
        # Malformed bytes are refused as a whole, with INVALID_ARGUMENT.
        raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/meterline.agent.v1.IngestService/SubmitBatch"
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw(b"\xff\xff\xff not a protobuf")
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        return acks


def _collect(
    pg_store: PgStore, bootstrap: str, usage_topic: str, deadletter_topic: str
) -> list[agent_pb2.BatchAck]:
    async def run() -> list[agent_pb2.BatchAck]:
        sink = KafkaSink(bootstrap)
        ingestor = Ingestor(
            directory_for(current_catalog(pg_store)),
            sink,
            IngestSettings(collector_id="e2e", topic=usage_topic),
            frozen_clock(NOW),
        )
        server = CollectorServer(ingestor)
        port = await server.start()
        try:
            return await _send_everything(port)
        finally:
            await server.stop(5.0)
            sink.close()

    return asyncio.run(run())


def test_agent_to_invoice_counts_every_batch_exactly_once(
    pg_url: str,
    pg_store: PgStore,
    kafka_bootstrap: str,
    topic: TopicFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    usage_topic, deadletter_topic = topic("usage"), topic("deadletter")
    assert meterline(["catalog", "apply", str(CATALOG), "--store", pg_url]) == 0

    acks = _collect(pg_store, kafka_bootstrap, usage_topic, deadletter_topic)
    assert [(a.agent_id, a.seq, a.accepted_count) for a in acks] == [
        ("agent-a", 1, 3),
        ("agent-a", 2, 1),
        ("agent-a", 2, 1),
        ("agent-b", 1, 1),
        ("agent-b", 1, 1),
    ]
    assert [(r.sample_index, r.code) for r in acks[0].rejections] == [
        (1, agent_pb2.UNKNOWN_RESOURCE),
        (3, agent_pb2.NEGATIVE_QUANTITY),
    ]

    config = WorkerConfig(
        bootstrap=kafka_bootstrap,
        topic=usage_topic,
        deadletter_topic=deadletter_topic,
        group_id=f"rating-{usage_topic}",
    )
    with RatingWorker(config, pg_store, current_catalog(pg_store), frozen_clock(NOW)) as worker:
        stats = worker.run_until_idle(idle_s=2.0, max_seconds=60.0)
    assert (stats.records, stats.batches_new, stats.batches_duplicate) == (5, 3, 2)
    assert stats.dead_lettered == 0
    assert pg_store.ledger_count() == 3

    hourly = pg_store.usage_hourly(datetime(2026, 10, 1, tzinfo=UTC), NOW)
    assert [
        (r["subscription_id"], r["hour_start"].hour, int(r["quantity"]))
        for r in hourly.iter_rows(named=True)
    ] == [
        ("acme-vps", 10, 9_345_678_901_234),
        ("acme-vps", 11, 1_000_000_000_000),
        ("acme-vps", 12, 2_000_000_000_000),
    ]

    capsys.readouterr()
    now = NOW.isoformat()
    assert (
        meterline(
            ["close", "--period", "2026-10", "--now", now, "--store", pg_url, "--format", "json"]
        )
        == 0
    )
    (invoice,) = json.loads(capsys.readouterr().out)
    assert {line["key"]: line["amount_minor"] for line in invoice["lines"]} == {
        "acme/2026-10-01/acme-backup/recurring": 813,  # R1
        "acme/2026-10-01/acme-vps/hourly/srv-1": 32,  # H1
        "acme/2026-10-01/acme-vps/hourly/srv-2": 415,  # H2
        "acme/2026-10-01/acme-vps/usage/net.egress.bytes": 11346,  # 113.46
    }
    assert invoice["total_minor"] == 813 + 32 + 415 + 11346

    # Closing again yields the identical draft, byte for byte.
    assert (
        meterline(
            ["close", "--period", "2026-10", "--now", now, "--store", pg_url, "--format", "json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [invoice]
