"""Flow control and graceful shutdown of the collector, over real gRPC on loopback.

The sink is a test double here (and only here): ``BatchSink`` is a port, and holding a send
open until the test says so is the deterministic way to have batches "in flight" — a real
broker confirms too fast to catch, and stopping it tests the UNAVAILABLE path instead
(``tests/integration/test_collector_kafka.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest

from collectors.directory import Directory, MeterRule
from collectors.grpc_server import CollectorServer
from collectors.ingest import Ingestor, IngestSettings, OverloadedError
from collectors.ports import SinkError
from collectors.validation import encode_columns
from meterline_proto.agent.v1 import agent_pb2

NOW = datetime(2026, 11, 1, tzinfo=UTC)
NOW_S = 1_793_491_200
STREAM = "/meterline.agent.v1.IngestService/StreamBatches"
SUBMIT = "/meterline.agent.v1.IngestService/SubmitBatch"
StreamMethod = grpc.aio.StreamStreamMultiCallable[bytes, agent_pb2.BatchAck]
UnaryMethod = grpc.aio.UnaryUnaryMultiCallable[bytes, agent_pb2.BatchAck]
DIRECTORY = Directory(meters={"m": MeterRule()}, resource_ids=frozenset({"r"}))


class GatedSink:
    """Holds every send until ``open_gate()``; records what it was given."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self._arrivals: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent: list[tuple[str, bytes]] = []
        self.fail: str | None = None

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._arrivals.put_nowait(key)
        await self.gate.wait()
        if self.fail is not None:
            raise SinkError(self.fail)
        self.sent.append((topic, key))

    async def arrived(self, sends: int = 1) -> None:
        """Wait until ``sends`` more sends have reached the sink."""
        for _ in range(sends):
            await self._arrivals.get()


def payload(seq: int, agent_id: str = "a-1") -> bytes:
    cols = encode_columns(["r"], ["m"], [NOW_S - 600], [300], [7])
    return agent_pb2.SampleBatch(agent_id=agent_id, seq=seq, samples=cols).SerializeToString()


class FakeMonotonic:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


@contextlib.asynccontextmanager
async def serving(
    sink: GatedSink, monotonic: FakeMonotonic | None = None, **settings: int
) -> AsyncIterator[tuple[str, CollectorServer, Ingestor]]:
    ingestor = Ingestor(
        DIRECTORY,
        sink,
        IngestSettings(collector_id="c", **settings),  # type: ignore[arg-type]
        lambda: NOW,
        monotonic=monotonic if monotonic is not None else FakeMonotonic(),
    )
    server = CollectorServer(ingestor)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}", server, ingestor
    finally:
        sink.gate.set()
        await server.stop(None)


def retry_after(error: grpc.aio.AioRpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            return value.decode() if isinstance(value, bytes) else value
    return None


async def open_stream(
    channel: grpc.aio.Channel,
) -> grpc.aio.StreamStreamCall[bytes, agent_pb2.BatchAck]:
    method: StreamMethod = channel.stream_stream(STREAM, None, agent_pb2.BatchAck.FromString)
    return method()


async def read_until_end(
    call: grpc.aio.StreamStreamCall[bytes, agent_pb2.BatchAck], acks: list[int]
) -> None:
    while (ack := await call.read()) is not grpc.aio.EOF:
        assert isinstance(ack, agent_pb2.BatchAck)
        acks.append(ack.seq)


async def submit(channel: grpc.aio.Channel, raw: bytes) -> agent_pb2.BatchAck:
    method: UnaryMethod = channel.unary_unary(SUBMIT, None, agent_pb2.BatchAck.FromString)
    ack = await method(raw)
    assert isinstance(ack, agent_pb2.BatchAck)
    return ack


def test_at_the_process_bound_new_batches_get_resource_exhausted_with_a_retry_hint() -> None:
    sink = GatedSink()

    async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError, int, int]:
        async with (
            serving(sink, max_in_flight_batches_per_process=1, retry_after_ms=250) as (
                target,
                _,
                ingestor,
            ),
            grpc.aio.insecure_channel(target) as channel,
        ):
            held = await open_stream(channel)
            await held.write(payload(1))
            await sink.arrived()  # batch 1 is in flight: the process is at its bound
            in_flight = ingestor.in_flight
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await submit(channel, payload(1, agent_id="a-2"))
            other = await open_stream(channel)
            await other.write(payload(1, agent_id="a-3"))
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await other.read()
            sink.gate.set()  # Kafka confirms: batch 1 is acked, never before
            ack = await held.read()
            assert isinstance(ack, agent_pb2.BatchAck)
            await held.done_writing()
            assert await held.read() is grpc.aio.EOF
            return unary.value, streamed.value, in_flight, ack.seq

    unary, streamed, in_flight, acked_seq = asyncio.run(scenario())
    assert in_flight == 1
    for error in (unary, streamed):
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 batches in flight, its maximum" in (error.details() or "")
        assert retry_after(error) == "250"
    assert "batch #1 of this stream" in (streamed.details() or "")
    assert acked_seq == 1
    assert sink.sent == [("usage.samples.v1", b"a-1")]  # only the admitted batch was written


def test_a_slow_sink_sheds_new_batches_until_it_catches_up() -> None:
    sink = GatedSink()
    clock = FakeMonotonic()

    async def scenario() -> tuple[grpc.aio.AioRpcError, agent_pb2.BatchAck]:
        async with (
            serving(sink, clock, sink_slow_after_ms=2_000) as (target, _, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            held = await open_stream(channel)
            await held.write(payload(1))
            await sink.arrived()
            clock.now_s += 2.001  # the oldest unconfirmed batch has waited 2001 ms
            with pytest.raises(grpc.aio.AioRpcError) as shed:
                await submit(channel, payload(1, agent_id="a-2"))
            sink.gate.set()
            first = await held.read()
            assert isinstance(first, agent_pb2.BatchAck)
            # Caught up: nothing is waiting any more, batches are taken again.
            return shed.value, await submit(channel, payload(2, agent_id="a-2"))

    shed, later = asyncio.run(scenario())
    assert shed.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Kafka is slow" in (shed.details() or "")
    assert retry_after(shed) == "1000"
    assert (later.seq, later.accepted_count) == (2, 1)


def test_a_sink_failure_is_unavailable_with_a_retry_hint_and_no_ack() -> None:
    sink = GatedSink()
    sink.fail = "broker down"
    sink.gate.set()

    async def scenario() -> grpc.aio.AioRpcError:
        async with (
            serving(sink) as (target, _, ingestor),
            grpc.aio.insecure_channel(target) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await submit(channel, payload(1))
            assert ingestor.in_flight == 0  # the place is given back
            return down.value

    down = asyncio.run(scenario())
    assert down.code() is grpc.StatusCode.UNAVAILABLE
    assert "broker down" in (down.details() or "")
    assert retry_after(down) == "1000"


def test_shutdown_acks_the_batches_in_flight_then_ends_open_streams_unavailable() -> None:
    sink = GatedSink()

    async def scenario() -> tuple[list[int], grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        async with (
            serving(sink) as (target, server, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            stream = await open_stream(channel)
            await stream.write(payload(1))
            await stream.write(payload(2))
            await sink.arrived(2)  # both read, held by the sink
            stopping = asyncio.create_task(server.stop(30.0))
            await asyncio.sleep(0)  # stop() has begun: no new call is taken
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await submit(channel, payload(1, agent_id="late"))
            sink.gate.set()  # Kafka confirms within the grace period
            acks: list[int] = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await read_until_end(stream, acks)
            await stopping
            return acks, ended.value, refused.value

    acks, ended, refused = asyncio.run(scenario())
    assert acks == [1, 2]  # what was read before the stop was confirmed and acked
    assert ended.code() is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (ended.details() or "")
    # Refused either by our handler (UNAVAILABLE) or, when the call races the stop, by gRPC
    # itself (CANCELLED); agents retry both, and the late batch never reached the sink.
    assert refused.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert sorted(key for _, key in sink.sent) == [b"a-1", b"a-1"]


def test_settings_have_bounds() -> None:
    with pytest.raises(ValueError, match="max_in_flight_batches_per_process"):
        IngestSettings("c", max_in_flight_batches_per_process=0)
    with pytest.raises(ValueError, match="retry_after_ms"):
        IngestSettings("c", retry_after_ms=600_001)
    with pytest.raises(ValueError, match="must differ"):
        IngestSettings("c", topic="t", rejects_topic="t")
    assert OverloadedError("x", 5).retry_after_ms == 5
