"""Authentication, scope, the rejects topic and the metrics endpoint of the collector, against
a real Kafka-protocol broker and a real PostgreSQL store.

Tokens are issued into the store exactly as the CLI does (``issue_agent_token``), and the
collector's credentials and directory are read from the store by the composition root's
``read_collector_inputs`` / ``CollectorRefresher`` — the production path.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from aggregation.pg_store import PgStore
from collectors.auth import bearer_metadata
from collectors.grpc_server import CollectorServer
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from collectors.prometheus_metrics import PrometheusMetrics
from collectors.validation import encode_columns
from meterline.cli import main
from meterline.wiring import CollectorRefresher, issue_agent_token, read_collector_inputs
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import rejected_samples_pb2, usage_record_pb2
from rating.catalog_file import read_catalog_file
from tests.fixtures.kafka import TopicFactory

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 1, tzinfo=UTC)
NOW_S = 1_793_491_200
CATALOG = Path(__file__).parents[1] / "e2e" / "catalog.yaml"  # meter net.egress.bytes; srv-1, srv-2
METER = "net.egress.bytes"
STREAM = "/meterline.agent.v1.IngestService/StreamBatches"
SUBMIT = "/meterline.agent.v1.IngestService/SubmitBatch"

Row = tuple[str, str, int, int, int]
StreamMethod = grpc.aio.StreamStreamMultiCallable[bytes, agent_pb2.BatchAck]
UnaryMethod = grpc.aio.UnaryUnaryMultiCallable[bytes, agent_pb2.BatchAck]
Metadata = Sequence[tuple[str, str]]


def frozen_clock() -> datetime:
    return NOW


def row(resource: str, value: int = 1_000, meter: str = METER) -> Row:
    return (resource, meter, NOW_S - 3600, 300, value)


def batch(rows: Sequence[Row], agent_id: str = "agent-1", seq: int = 1) -> bytes:
    cols = encode_columns(*(list(col) for col in zip(*rows, strict=True)))
    return agent_pb2.SampleBatch(agent_id=agent_id, seq=seq, samples=cols).SerializeToString()


@pytest.fixture
def catalog_store(pg_store: PgStore) -> PgStore:
    applied = read_catalog_file(CATALOG)
    pg_store.save_catalog(applied.document, applied.digest, applied.source, NOW)
    return pg_store


@contextlib.asynccontextmanager
async def collector(
    bootstrap: str,
    store_url: str,
    topic: str,
    rejects_topic: str,
    metrics: PrometheusMetrics | None = None,
) -> AsyncIterator[tuple[str, Ingestor, CollectorRefresher]]:
    inputs = read_collector_inputs(store_url)
    sink = KafkaSink(bootstrap)
    ingestor = Ingestor(
        inputs.directory,
        sink,
        IngestSettings(collector_id="auth-collector", topic=topic, rejects_topic=rejects_topic),
        frozen_clock,
        authenticator=inputs.authenticator,
        metrics=metrics,
    )
    refresher = CollectorRefresher(ingestor, store_url, 10.0, authenticate=True)
    server = CollectorServer(ingestor)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}", ingestor, refresher
    finally:
        await server.stop(None)
        sink.close(5.0)


async def submit(target: str, payload: bytes, metadata: Metadata | None) -> agent_pb2.BatchAck:
    async with grpc.aio.insecure_channel(target) as channel:
        method: UnaryMethod = channel.unary_unary(SUBMIT, None, agent_pb2.BatchAck.FromString)
        ack = await method(payload, metadata=metadata)
        assert isinstance(ack, agent_pb2.BatchAck)
        return ack


async def submit_error(
    target: str, payload: bytes, metadata: Metadata | None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(target, payload, metadata)
    return caught.value


def read_values(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    """Every record of ``topic`` up to the high watermarks: (key, value)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"it-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "receive.message.max.bytes": 1_000_000_000,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        highs = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        positions = dict.fromkeys(partitions, 0)
        out: list[tuple[bytes, bytes]] = []
        for _ in range(10_000):  # bounded
            if all(positions[p] >= highs[p] for p in partitions):
                return out
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            part, offset, key, value = msg.partition(), msg.offset(), msg.key(), msg.value()
            assert part is not None
            assert offset is not None
            assert isinstance(key, bytes)
            assert isinstance(value, bytes)
            positions[part] = offset + 1
            out.append((key, value))
        pytest.fail(f"could not read {topic} up to {highs}")
    finally:
        consumer.close()


def test_missing_malformed_and_unknown_tokens_are_unauthenticated(
    kafka_bootstrap: str, topic: TopicFactory, catalog_store: PgStore, pg_url: str
) -> None:
    issue_agent_token(catalog_store, "agent-1", ["*"], NOW)
    usage, rejects = topic("usage"), topic("rejects")
    payload = batch([row("srv-1")])

    async def scenario() -> list[grpc.aio.AioRpcError]:
        async with collector(kafka_bootstrap, pg_url, usage, rejects) as (target, _, _):
            errors = [
                await submit_error(target, payload, None),
                await submit_error(target, payload, (("authorization", "Basic abc"),)),
                await submit_error(target, payload, bearer_metadata("not-a-real-token")),
            ]
            # A stream is refused before any batch is read.
            async with grpc.aio.insecure_channel(target) as channel:
                method: StreamMethod = channel.stream_stream(
                    STREAM, None, agent_pb2.BatchAck.FromString
                )
                call = method(metadata=bearer_metadata("not-a-real-token"))
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(payload)
                with pytest.raises(grpc.aio.AioRpcError) as stream_error:
                    await call.read()
                errors.append(stream_error.value)
            return errors

    errors = asyncio.run(scenario())
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert "no 'authorization: Bearer <token>'" in (errors[0].details() or "")
    assert "Bearer <token>" in (errors[1].details() or "")
    assert "unknown or revoked token" in (errors[2].details() or "")
    assert read_values(kafka_bootstrap, usage) == []  # nothing of them was written


def test_a_revoked_token_stops_working_after_the_refresh_even_on_an_open_stream(
    kafka_bootstrap: str, topic: TopicFactory, catalog_store: PgStore, pg_url: str
) -> None:
    token = issue_agent_token(catalog_store, "agent-1", ["srv-1"], NOW)
    usage, rejects = topic("usage"), topic("rejects")
    metadata = bearer_metadata(token)

    async def scenario() -> tuple[list[int], grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        async with collector(kafka_bootstrap, pg_url, usage, rejects) as (target, _, refresher):
            async with grpc.aio.insecure_channel(target) as channel:
                method: StreamMethod = channel.stream_stream(
                    STREAM, None, agent_pb2.BatchAck.FromString
                )
                call = method(metadata=metadata)
                await call.write(batch([row("srv-1")], seq=1))
                first = await call.read()
                assert isinstance(first, agent_pb2.BatchAck)
                # Revoked in the store; the collector learns it at its next refresh.
                assert catalog_store.revoke_agent_tokens("agent-1", NOW) == 1
                await refresher.refresh_once()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(batch([row("srv-1")], seq=2))
                with pytest.raises(grpc.aio.AioRpcError) as on_stream:
                    await call.read()
            new_call = await submit_error(target, batch([row("srv-1")], seq=3), metadata)
            return [first.seq], on_stream.value, new_call

    acked, on_stream, new_call = asyncio.run(scenario())
    assert acked == [1]
    assert on_stream.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "batch #2 of this stream" in (on_stream.details() or "")
    assert new_call.code() is grpc.StatusCode.UNAUTHENTICATED
    records = [
        usage_record_pb2.UsageBatchRecord.FromString(v)
        for _, v in read_values(kafka_bootstrap, usage)
    ]
    assert [r.seq for r in records] == [1]


def test_a_batch_of_another_agent_is_permission_denied(
    kafka_bootstrap: str, topic: TopicFactory, catalog_store: PgStore, pg_url: str
) -> None:
    token = issue_agent_token(catalog_store, "agent-1", ["*"], NOW)
    usage, rejects = topic("usage"), topic("rejects")

    async def scenario() -> grpc.aio.AioRpcError:
        async with collector(kafka_bootstrap, pg_url, usage, rejects) as (target, _, _):
            return await submit_error(
                target, batch([row("srv-1")], agent_id="agent-2"), bearer_metadata(token)
            )

    error = asyncio.run(scenario())
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "agent_id='agent-2'" in (error.details() or "")
    assert "belongs to agent 'agent-1'" in (error.details() or "")
    assert read_values(kafka_bootstrap, usage) == []


def test_out_of_scope_and_malformed_resources_are_rejected_per_sample_and_go_to_the_rejects_topic(
    kafka_bootstrap: str, topic: TopicFactory, catalog_store: PgStore, pg_url: str
) -> None:
    token = issue_agent_token(catalog_store, "agent-1", ["srv-1"], NOW)
    usage, rejects = topic("usage"), topic("rejects")
    rows = [
        row("srv-1", 10),
        row("srv-2", 20),  # in the catalog, outside the token's scope
        row("srv-404", 30),  # outside the scope too: the agent cannot tell whether it exists
        row("srv-1", 40),
        row("srv-\x07", 50),  # a control character
        row("srv-1", -1),  # in scope, negative
    ]

    async def scenario() -> tuple[agent_pb2.BatchAck, agent_pb2.BatchAck]:
        async with collector(kafka_bootstrap, pg_url, usage, rejects) as (target, _, _):
            metadata = bearer_metadata(token)
            mixed = await submit(target, batch(rows, seq=7), metadata)
            clean = await submit(target, batch([row("srv-1", 5)], seq=8), metadata)
            return mixed, clean

    mixed, clean = asyncio.run(scenario())
    assert mixed.accepted_count == 2
    got = [(r.sample_index, r.code, r.field) for r in mixed.rejections]
    assert got == [
        (1, agent_pb2.FORBIDDEN_RESOURCE, "resource_index"),
        (2, agent_pb2.FORBIDDEN_RESOURCE, "resource_index"),
        (4, agent_pb2.MALFORMED_RESOURCE_ID, "resource_index"),
        (5, agent_pb2.NEGATIVE_QUANTITY, "value"),
    ]
    assert "outside the scope" in mixed.rejections[0].detail
    assert "control character" in mixed.rejections[2].detail
    assert (clean.accepted_count, list(clean.rejections)) == (1, [])

    accepted = [
        usage_record_pb2.UsageBatchRecord.FromString(v)
        for _, v in read_values(kafka_bootstrap, usage)
    ]
    assert sorted((r.seq, tuple(r.samples.value)) for r in accepted) == [(7, (10, 40)), (8, (5,))]

    # One rejects record, for the batch with rejections, written before the ack.
    on_rejects = read_values(kafka_bootstrap, rejects)
    assert [key for key, _ in on_rejects] == [b"agent-1"]
    record = rejected_samples_pb2.RejectedSamples.FromString(on_rejects[0][1])
    assert (record.agent_id, record.seq, record.collector_id) == ("agent-1", 7, "auth-collector")
    assert record.received_at_unix_ms == NOW_S * 1000
    cols = record.samples
    assert [cols.resource_dict[i] for i in cols.resource_index] == [
        "srv-2",
        "srv-404",
        "srv-\x07",
        "srv-1",
    ]
    assert list(cols.value) == [20, 30, 50, -1]
    assert list(cols.start_unix_s) == [NOW_S - 3600] * 4
    assert [(r.sample_index, r.code, r.field, r.detail) for r in record.rejections] == [
        (r.sample_index, r.code, r.field, r.detail) for r in mixed.rejections
    ]


def scrape(port: int) -> dict[str, float]:
    """The endpoint's samples: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_endpoint_counts_batches_samples_rejections_and_auth_failures(
    kafka_bootstrap: str, topic: TopicFactory, catalog_store: PgStore, pg_url: str
) -> None:
    token = issue_agent_token(catalog_store, "agent-1", ["srv-1"], NOW)
    usage, rejects = topic("usage"), topic("rejects")
    metrics = PrometheusMetrics()
    endpoint = metrics.serve(0)
    ns = "meterline_collector_"
    try:

        async def scenario() -> None:
            async with collector(kafka_bootstrap, pg_url, usage, rejects, metrics) as (
                target,
                _,
                _,
            ):
                metadata = bearer_metadata(token)
                await submit(target, batch([row("srv-1"), row("srv-2")], seq=1), metadata)
                await submit(
                    target, batch([row("srv-1"), row("srv-1", -5), row("srv-9")], seq=2), metadata
                )
                await submit_error(target, b"\xff\xff", metadata)  # malformed
                await submit_error(target, batch([row("srv-1")], seq=3), None)  # no token
                await submit_error(target, batch([row("srv-1")], seq=4), bearer_metadata("x"))

        asyncio.run(scenario())
        values = scrape(endpoint.port)
    finally:
        endpoint.stop()

    assert values[f"{ns}batches_received_total"] == 3  # the unauthenticated ones never arrive
    assert values[f"{ns}batches_malformed_total"] == 1
    assert values[f"{ns}samples_received_total"] == 5
    assert values[f"{ns}samples_accepted_total"] == 2
    assert values[f'{ns}samples_rejected_total{{code="FORBIDDEN_RESOURCE"}}'] == 2
    assert values[f'{ns}samples_rejected_total{{code="NEGATIVE_QUANTITY"}}'] == 1
    assert values[f'{ns}auth_failures_total{{reason="missing"}}'] == 1
    assert values[f'{ns}auth_failures_total{{reason="unknown"}}'] == 1
    assert values[f'{ns}auth_failures_total{{reason="malformed"}}'] == 0
    assert values[f"{ns}in_flight_batches"] == 0
    # Two acked batches; each wrote two records (accepted + rejected samples).
    assert values[f"{ns}ack_latency_seconds_count"] == 2
    assert values[f"{ns}kafka_delivery_seconds_count"] == 4
    assert values[f'{ns}ack_latency_seconds_bucket{{le="+Inf"}}'] == 2


def test_cli_issues_a_token_once_and_revokes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aggregation.factory import open_store
    from collectors.auth import hash_token

    url = f"duckdb://{tmp_path / 'store.duckdb'}"
    assert (
        main(["agent", "token", "issue", "agent-7", "--scope", "srv-1, srv-2", "--store", url]) == 0
    )
    out = capsys.readouterr()
    token = out.out.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert "shown only this once" in out.err
    store = open_store(url)
    try:
        (stored,) = store.active_agent_tokens()
    finally:
        store.close()
    assert (stored.token_hash, stored.agent_id, stored.scope) == (
        hash_token(token),
        "agent-7",
        ("srv-1", "srv-2"),
    )
    assert token not in (tmp_path / "store.duckdb").read_bytes().decode("latin-1")

    assert main(["agent", "token", "revoke", "agent-7", "--store", url]) == 0
    assert "revoked 1 active token(s)" in capsys.readouterr().out
    store = open_store(url)
    try:
        assert store.active_agent_tokens() == []
    finally:
        store.close()
    # A bad scope is refused before anything is stored.
    assert main(["agent", "token", "issue", "agent-7", "--scope", "*,srv-1", "--store", url]) == 2
    assert "cannot be combined" in capsys.readouterr().err
