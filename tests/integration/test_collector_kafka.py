"""The collector against a real Kafka-protocol broker: gRPC in, records out, acks only after
Kafka confirmed.

Each test runs its own event loop (``asyncio.run``): a collector on 127.0.0.1:0 with a real
``KafkaSink``, agents over real gRPC, and a consumer that reads the topic up to its high
watermarks, so "exactly these records" is checked, not "at least".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from collectors.directory import Directory, MeterRule
from collectors.grpc_agent import AgentClient, RetryPolicy, simulate_fleet
from collectors.grpc_server import CollectorServer
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from collectors.simulator import FleetSpec, MeterKind, MeterSpec, host_batches
from collectors.validation import encode_columns
from meterline.embedded_broker import EmbeddedBroker, create_topics, free_port
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import samples_pb2, usage_record_pb2
from tests.fixtures.kafka import TopicFactory

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 1, tzinfo=UTC)
NOW_S = 1_793_491_200
STREAM = "/meterline.agent.v1.IngestService/StreamBatches"
SUBMIT = "/meterline.agent.v1.IngestService/SubmitBatch"
METERS = (
    MeterSpec("net.egress.bytes", MeterKind.COUNTER, 0, 10**9),
    MeterSpec("storage.block.bytes", MeterKind.GAUGE, 10**9, 10**11),
)
RESOURCES = tuple(f"srv-{i}" for i in range(6))
DIRECTORY = Directory(
    meters={m.name: MeterRule() for m in METERS},
    resource_ids=frozenset(RESOURCES),
)


StreamMethod = grpc.aio.StreamStreamMultiCallable[bytes, agent_pb2.BatchAck]
UnaryMethod = grpc.aio.UnaryUnaryMultiCallable[bytes, agent_pb2.BatchAck]


def frozen_clock() -> datetime:
    return NOW


@contextlib.asynccontextmanager
async def collector(
    bootstrap: str,
    topic: str,
    *,
    directory: Directory = DIRECTORY,
    message_timeout_ms: int = 30_000,
    port: int = 0,
) -> AsyncIterator[tuple[str, CollectorServer]]:
    sink = KafkaSink(bootstrap, message_timeout_ms=message_timeout_ms)
    ingestor = Ingestor(
        directory, sink, IngestSettings(collector_id="it-collector", topic=topic), frozen_clock
    )
    server = CollectorServer(ingestor, port=port)
    bound = await server.start()
    try:
        yield f"127.0.0.1:{bound}", server
    finally:
        await server.stop(None)
        sink.close(5.0)


def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes, usage_record_pb2.UsageBatchRecord]]:
    """Every record of ``topic`` (all partitions, up to the high watermarks): (key, record)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"it-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "receive.message.max.bytes": 1_000_000_000,  # noida-db ignores fetch limits
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        highs = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[tuple[bytes, usage_record_pb2.UsageBatchRecord]] = []
        positions = dict.fromkeys(partitions, 0)
        for _ in range(10_000):  # bounded
            if all(positions[p] >= highs[p] for p in partitions):
                break
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            part, offset = msg.partition(), msg.offset()
            assert part is not None
            assert offset is not None
            positions[part] = offset + 1
            key, value = msg.key(), msg.value()
            assert isinstance(key, bytes)
            assert isinstance(value, bytes)
            out.append((key, usage_record_pb2.UsageBatchRecord.FromString(value)))
        else:
            pytest.fail(f"could not read {topic} up to {highs}")
        return out
    finally:
        consumer.close()


def rows_of(record: usage_record_pb2.UsageBatchRecord) -> list[tuple[str, str, int, int, int]]:
    c = record.samples
    return [
        (
            c.resource_dict[c.resource_index[i]],
            c.meter_dict[c.meter_index[i]],
            c.start_unix_s[i],
            c.duration_s[i],
            c.value[i],
        )
        for i in range(len(c.value))
    ]


Row = tuple[str, str, int, int, int]


def batch(rows: Sequence[Row], agent_id: str = "agent-1", seq: int = 1) -> agent_pb2.SampleBatch:
    cols = encode_columns(*(list(col) for col in zip(*rows, strict=True)))
    return agent_pb2.SampleBatch(agent_id=agent_id, seq=seq, samples=cols)


GOOD: list[Row] = [
    ("srv-1", "net.egress.bytes", NOW_S - 3600, 300, 1_000),
    ("srv-2", "net.egress.bytes", NOW_S - 3600, 300, 2_000),
    ("srv-2", "storage.block.bytes", NOW_S - 3300, 300, 50 * 2**30),
]
BAD_RESOURCE: Row = ("srv-404", "net.egress.bytes", NOW_S - 3600, 300, 7)
BAD_METER: Row = ("srv-1", "gpu.seconds", NOW_S - 3600, 300, 7)
NEGATIVE: Row = ("srv-1", "net.egress.bytes", NOW_S - 3600, 300, -7)
FUTURE: Row = ("srv-1", "net.egress.bytes", NOW_S + 3600, 300, 7)


async def stream_raw(
    target: str, payloads: Sequence[bytes]
) -> tuple[list[agent_pb2.BatchAck], grpc.aio.AioRpcError | None]:
    """Send raw payloads on one stream; return the acks and the final error, if any."""
    async with grpc.aio.insecure_channel(target) as channel:
        method: StreamMethod = channel.stream_stream(STREAM, None, agent_pb2.BatchAck.FromString)
        call = method()
        acks: list[agent_pb2.BatchAck] = []

        async def write_all() -> None:
            # Writing fails once the server ended the call; the reader reports the status.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for payload in payloads:
                    await call.write(payload)
                await call.done_writing()

        writer = asyncio.create_task(write_all())
        try:
            while (ack := await call.read()) is not grpc.aio.EOF:
                assert isinstance(ack, agent_pb2.BatchAck)
                acks.append(ack)
        except grpc.aio.AioRpcError as exc:
            return acks, exc
        finally:
            await writer
        return acks, None


def test_stream_acks_each_batch_and_kafka_holds_exactly_the_accepted_samples(
    kafka_bootstrap: str, topic: TopicFactory
) -> None:
    name = topic("usage")
    partly_bad = [GOOD[0], BAD_RESOURCE, GOOD[1], BAD_METER, NEGATIVE, FUTURE, GOOD[2]]
    all_bad = [BAD_RESOURCE, NEGATIVE]

    async def scenario() -> list[agent_pb2.BatchAck]:
        async with collector(kafka_bootstrap, name) as (target, _):
            acks, error = await stream_raw(
                target,
                [
                    batch(GOOD, seq=1).SerializeToString(),
                    batch(partly_bad, seq=2).SerializeToString(),
                    batch(all_bad, seq=3).SerializeToString(),
                ],
            )
            assert error is None
            return acks

    acks = asyncio.run(scenario())
    assert [(a.agent_id, a.seq, a.accepted_count) for a in acks] == [
        ("agent-1", 1, 3),
        ("agent-1", 2, 3),
        ("agent-1", 3, 0),
    ]
    assert [(r.sample_index, r.code, r.field) for r in acks[1].rejections] == [
        (1, agent_pb2.UNKNOWN_RESOURCE, "resource_index"),
        (3, agent_pb2.UNKNOWN_METER, "meter_index"),
        (4, agent_pb2.NEGATIVE_QUANTITY, "value"),
        (5, agent_pb2.TIMESTAMP_OUT_OF_RANGE, "start_unix_s"),
    ]
    assert [r.code for r in acks[2].rejections] == [
        agent_pb2.UNKNOWN_RESOURCE,
        agent_pb2.NEGATIVE_QUANTITY,
    ]

    records = read_topic(kafka_bootstrap, name)
    # The all-rejected batch wrote nothing; the others exactly their accepted samples.
    assert sorted((key, r.seq) for key, r in records) == [(b"agent-1", 1), (b"agent-1", 2)]
    by_seq = {r.seq: r for _, r in records}
    assert sorted(rows_of(by_seq[1])) == sorted(GOOD)
    assert sorted(rows_of(by_seq[2])) == sorted(GOOD)
    for record in by_seq.values():
        assert record.agent_id == "agent-1"
        assert record.collector_id == "it-collector"
        assert record.received_at_unix_ms == NOW_S * 1000
        assert "srv-404" not in record.samples.resource_dict  # compact dictionaries


def test_submit_batch_and_a_duplicate_seq_are_both_written_and_acked(
    kafka_bootstrap: str, topic: TopicFactory
) -> None:
    name = topic("usage")
    payload = batch(GOOD, agent_id="agent-dup", seq=42).SerializeToString()

    async def scenario() -> list[agent_pb2.BatchAck]:
        async with (
            collector(kafka_bootstrap, name) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            submit: UnaryMethod = channel.unary_unary(SUBMIT, None, agent_pb2.BatchAck.FromString)
            return [await submit(payload), await submit(payload)]

    acks = asyncio.run(scenario())
    assert [(a.seq, a.accepted_count) for a in acks] == [(42, 3), (42, 3)]
    # The collector is stateless: both copies are in Kafka; rating deduplicates by
    # (agent_id, seq).
    records = read_topic(kafka_bootstrap, name)
    assert [(key, r.seq) for key, r in records] == [(b"agent-dup", 42), (b"agent-dup", 42)]
    assert rows_of(records[0][1]) == rows_of(records[1][1])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xff\xff\xff", "not a meterline.agent.v1.SampleBatch"),
        (batch(GOOD, agent_id="").SerializeToString(), "agent_id is empty"),
        (batch(GOOD, seq=0).SerializeToString(), "seq must be >= 1"),
    ],
)
def test_malformed_batches_get_invalid_argument(
    kafka_bootstrap: str, topic: TopicFactory, payload: bytes, message: str
) -> None:
    name = topic("usage")

    async def scenario() -> tuple[grpc.aio.AioRpcError, list[agent_pb2.BatchAck], Exception]:
        async with (
            collector(kafka_bootstrap, name) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            submit: UnaryMethod = channel.unary_unary(SUBMIT, None, agent_pb2.BatchAck.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await submit(payload)
        # On a stream: the batches before the malformed one are acked, then the abort.
        async with collector(kafka_bootstrap, name) as (target, _):
            acks, error = await stream_raw(
                target,
                [
                    batch(GOOD, seq=1).SerializeToString(),
                    batch(GOOD, seq=2).SerializeToString(),
                    payload,
                    batch(GOOD, seq=4).SerializeToString(),
                ],
            )
        assert error is not None
        return unary.value, acks, error

    unary_error, acks, stream_error = asyncio.run(scenario())
    assert unary_error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (unary_error.details() or "")
    assert [a.seq for a in acks] == [1, 2]
    assert isinstance(stream_error, grpc.aio.AioRpcError)
    assert stream_error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "batch #3 of this stream" in (stream_error.details() or "")
    assert message in (stream_error.details() or "")
    # Only the two acked batches reached Kafka; nothing after the malformed one was read.
    assert sorted(r.seq for _, r in read_topic(kafka_bootstrap, name)) == [1, 2]


def spec_for(agent_prefix: str, **changes: object) -> FleetSpec:
    options: dict[str, object] = {
        "resource_ids": RESOURCES,
        "meters": METERS,
        "start": NOW - timedelta(days=1),
        "end": NOW,
        "hosts": 3,
        "interval_s": 900,
        "batch_size": 50,
        "seed": 11,
        "agent_prefix": agent_prefix,
    }
    options.update(changes)
    return FleetSpec(**options)  # type: ignore[arg-type]


def topic_totals(
    records: Sequence[tuple[bytes, usage_record_pb2.UsageBatchRecord]],
) -> tuple[dict[tuple[str, str], int], Counter[tuple[str, int]]]:
    """Sum of values per (resource, meter) over records deduplicated by (agent_id, seq)."""
    seen: dict[tuple[str, int], usage_record_pb2.UsageBatchRecord] = {}
    copies: Counter[tuple[str, int]] = Counter()
    for key, record in records:
        assert key == record.agent_id.encode()
        identity = (record.agent_id, record.seq)
        copies[identity] += 1
        if identity in seen:
            assert seen[identity].samples == record.samples  # a resend is the same batch
        seen[identity] = record
    totals: dict[tuple[str, str], int] = {}
    for record in seen.values():  # per record (batch), NumPy within
        c = record.samples
        res = np.array(c.resource_dict)[np.array(c.resource_index, dtype=np.intp)]
        met = np.array(c.meter_dict)[np.array(c.meter_index, dtype=np.intp)]
        val = np.array(c.value, dtype=np.int64)
        for r, m in {(str(a), str(b)) for a, b in zip(res, met, strict=True)}:
            pick = (res == r) & (met == m)
            totals[(r, m)] = totals.get((r, m), 0) + int(val[pick].sum())
    return totals, copies


def test_fleet_ground_truth_equals_what_kafka_holds(
    kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path
) -> None:
    name = topic("usage")
    fleet = spec_for("fleet-a")
    directory = Directory(  # srv-4 is unknown to the catalog: its samples are rejected
        meters=DIRECTORY.meters, resource_ids=frozenset(RESOURCES) - {"srv-4"}
    )
    truth_path = tmp_path / "truth.json"

    async def scenario() -> None:
        async with collector(kafka_bootstrap, name, directory=directory) as (target, _):
            await simulate_fleet(
                target, fleet, concurrency=2, max_in_flight=4, ground_truth_path=truth_path
            )

    asyncio.run(scenario())
    truth = json.loads(truth_path.read_text())
    total_batches = sum(fleet.batches_of_host(h) for h in range(fleet.hosts))
    assert truth["batches_sent"] == truth["batches_acked"] == total_batches
    assert truth["retries"] == 0
    assert truth["rejections_by_code"] == {"UNKNOWN_RESOURCE": 96 * len(METERS)}
    expected = {(s["resource_id"], s["meter"]): s["sum"] for s in truth["series"]}
    assert {r for r, _ in expected} == set(RESOURCES) - {"srv-4"}

    totals, copies = topic_totals(read_topic(kafka_bootstrap, name))
    assert totals == expected
    assert set(copies.values()) == {1}


def test_an_agent_resends_unacked_batches_after_the_collector_restarts(
    kafka_bootstrap: str, topic: TopicFactory
) -> None:
    name = topic("usage")
    fleet = spec_for("restart", hosts=1, batch_size=10)
    host = 0
    generated = list(host_batches(fleet, host))
    port = free_port()
    restart_after = 5  # batches pulled before the collector is restarted
    acked: list[int] = []

    async def scenario() -> int:
        restarted = asyncio.Event()
        stack = contextlib.AsyncExitStack()
        async with stack:
            await stack.enter_async_context(collector(kafka_bootstrap, name, port=port))

            async def restart() -> None:
                await stack.aclose()  # stop the collector (and its producer) ...
                await stack.enter_async_context(collector(kafka_bootstrap, name, port=port))
                restarted.set()  # ... and start a new one on the same port

            tasks: set[asyncio.Task[None]] = set()

            def batches() -> Iterator[agent_pb2.SampleBatch]:
                for i, g in enumerate(generated):
                    if i == restart_after:
                        tasks.add(asyncio.get_running_loop().create_task(restart()))
                    yield g.batch

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                agent = AgentClient(
                    channel,
                    fleet.agent_id(host),
                    max_in_flight=3,
                    retry=RetryPolicy(max_retries=20, backoff_s=0.05, backoff_max_s=0.5),
                )
                stats = await agent.send_all(batches(), lambda b, a: acked.append(a.seq))
            await asyncio.gather(*tasks)
            assert restarted.is_set()
            return stats.retries

    retries = asyncio.run(scenario())
    assert retries >= 1
    assert acked == list(range(1, len(generated) + 1))  # each seq acked once, in order
    records = read_topic(kafka_bootstrap, name)
    _, copies = topic_totals(records)
    # Every batch is in Kafka at least once; resends keep their (agent_id, seq).
    assert set(copies) == {(fleet.agent_id(host), g.batch.seq) for g in generated}


def test_no_ack_while_the_broker_is_down_then_recovery(tmp_path: Path) -> None:
    """Its own broker (stopped mid-test): a batch whose record cannot be confirmed is
    answered UNAVAILABLE, never acked; once the broker is back the resend is acked."""
    port = free_port()
    data_dir = tmp_path / "broker"
    broker = EmbeddedBroker(data_dir, port=port)
    broker.start()
    try:
        create_topics(broker.bootstrap, ["usage.outage"], partitions=1)

        async def scenario() -> tuple[agent_pb2.BatchAck, grpc.aio.AioRpcError, agent_pb2.BatchAck]:
            async with (
                collector(broker.bootstrap, "usage.outage", message_timeout_ms=3_000) as (
                    target,
                    _,
                ),
                grpc.aio.insecure_channel(target) as channel,
            ):
                submit: UnaryMethod = channel.unary_unary(
                    SUBMIT, None, agent_pb2.BatchAck.FromString
                )
                first = await submit(batch(GOOD, agent_id="a-out", seq=1).SerializeToString())
                broker.stop()  # graceful: noida-db may lose its last writes on kill -9
                with pytest.raises(grpc.aio.AioRpcError) as down:
                    await submit(batch(GOOD, agent_id="a-out", seq=2).SerializeToString())
                broker.start()  # same data dir and port
                again = await submit(batch(GOOD, agent_id="a-out", seq=2).SerializeToString())
                return first, down.value, again

        first, down, again = asyncio.run(scenario())
        assert (first.seq, first.accepted_count) == (1, 3)
        assert down.code() is grpc.StatusCode.UNAVAILABLE
        assert "same (agent_id, seq)" in (down.details() or "")
        assert ("retry-after-ms", "1000") in tuple(down.trailing_metadata() or ())
        assert (again.seq, again.accepted_count) == (2, 3)
        seqs = [r.seq for _, r in read_topic(broker.bootstrap, "usage.outage")]
        assert seqs.count(1) == 1
        assert seqs.count(2) >= 1  # the unacked attempt may or may not have landed
    finally:
        broker.stop()


def labelled_batch(
    rows: Sequence[Row], labels: Sequence[dict[str, str]], seq: int
) -> agent_pb2.SampleBatch:
    """``batch(rows)`` with one label set per row (one label_sets entry per distinct set)."""
    out = batch(rows, seq=seq)
    distinct: dict[tuple[tuple[str, str], ...], int] = {}
    for pairs in (tuple(sorted(d.items())) for d in labels):  # test helper, a few rows
        if pairs not in distinct:
            distinct[pairs] = len(distinct)
            out.samples.label_sets.add().labels.extend(
                samples_pb2.Label(key=k, value=v) for k, v in pairs
            )
        out.samples.label_set_index.append(distinct[pairs])
    return out


def labelled_rows_of(
    record: usage_record_pb2.UsageBatchRecord,
) -> list[tuple[Row, dict[str, str]]]:
    c = record.samples
    labels = [{lb.key: lb.value for lb in c.label_sets[j].labels} for j in c.label_set_index]
    return list(zip(rows_of(record), labels, strict=True))


def test_labels_of_accepted_samples_reach_kafka_unchanged(
    kafka_bootstrap: str, topic: TopicFactory
) -> None:
    name = topic("usage")
    web = {"region": "eu-west", "tier": "gold", "team": "\u00e9quipe"}
    db = {"region": "us-east"}
    too_many = {f"k{i}": "v" for i in range(17)}  # max_labels_per_sample is 16
    all_good = labelled_batch(GOOD, [web, db, {}], seq=1)
    partly_bad = labelled_batch(
        [GOOD[0], BAD_RESOURCE, GOOD[1], GOOD[2]], [web, db, too_many, web], seq=2
    )

    async def scenario() -> list[agent_pb2.BatchAck]:
        async with collector(kafka_bootstrap, name) as (target, _):
            acks, error = await stream_raw(
                target, [all_good.SerializeToString(), partly_bad.SerializeToString()]
            )
            assert error is None
            return acks

    acks = asyncio.run(scenario())
    assert [a.accepted_count for a in acks] == [3, 2]
    assert [(r.sample_index, r.code, r.field) for r in acks[1].rejections] == [
        (1, agent_pb2.UNKNOWN_RESOURCE, "resource_index"),
        (2, agent_pb2.LABELS_OUT_OF_RANGE, "label_set_index"),
    ]
    assert "17 labels exceed the limit of 16" in acks[1].rejections[1].detail

    by_seq = {r.seq: r for _, r in read_topic(kafka_bootstrap, name)}
    assert sorted(by_seq) == [1, 2]
    # All accepted: the batch's own columns, labels and all.
    assert by_seq[1].samples == all_good.samples
    assert labelled_rows_of(by_seq[1]) == [(GOOD[0], web), (GOOD[1], db), (GOOD[2], {})]
    # Partly accepted: the accepted samples keep their labels; the label dictionary is compact.
    assert labelled_rows_of(by_seq[2]) == [(GOOD[0], web), (GOOD[2], web)]
    assert len(by_seq[2].samples.label_sets) == 1
