"""The sending side: an agent client over ``StreamBatches``, and the fleet simulator's driver.

An :class:`AgentClient` keeps one stream open, writes batches with at most
``max_in_flight`` unacked, and matches each ack to the oldest unacked batch by
``(agent_id, seq)`` (the collector acks in order). When the stream fails with a retriable
status, it reconnects after a backoff and resends every unacked batch with the SAME
``(agent_id, seq)`` before sending new ones; it gives up after ``max_retries`` consecutive
failed attempts without progress. Non-retriable statuses (``INVALID_ARGUMENT`` ...) raise
at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from collectors.auth import bearer_metadata
from collectors.simulator import FleetSpec, GeneratedBatch, GroundTruth, host_batches
from meterline_proto.agent.v1 import agent_pb2, agent_pb2_grpc

_log = logging.getLogger(__name__)

MAX_IN_FLIGHT_MAXIMUM = 1024
MAX_RETRIES_MAXIMUM = 100
CONCURRENCY_MAXIMUM = 100_000
READ_STATUS_TIMEOUT_S = 5.0
RETRIABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class AgentError(RuntimeError):
    """The agent gave up: a non-retriable status, or too many failed attempts."""


class _StreamEndedError(Exception):
    """The collector closed the stream while batches were still unacked (retriable)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 5  # consecutive failed attempts without any ack in between
    backoff_s: float = 0.1  # first wait; doubles per consecutive failure
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_retries <= MAX_RETRIES_MAXIMUM:
            raise ValueError(f"max_retries must be in [0, {MAX_RETRIES_MAXIMUM}]")
        if not 0 <= self.backoff_s <= self.backoff_max_s <= 600:
            raise ValueError("need 0 <= backoff_s <= backoff_max_s <= 600")

    def delay_s(self, failures: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * float(2 ** max(0, failures - 1)))


@dataclass(slots=True)
class AgentStats:
    batches_sent: int = 0  # distinct batches taken from the source
    sends: int = 0  # writes on a stream, resends included
    retries: int = 0  # reconnections
    batches_acked: int = 0


OnAck = Callable[[agent_pb2.SampleBatch, agent_pb2.BatchAck], None]


class AgentClient:
    """Send ``batches`` (seq increasing) of one agent over a stream; call ``on_ack`` per ack."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        agent_id: str,
        *,
        max_in_flight: int = 8,
        retry: RetryPolicy | None = None,
        token: str | None = None,
    ) -> None:
        """``token``: the agent's bearer token (sent as ``authorization`` metadata)."""
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT_MAXIMUM:
            raise ValueError(f"max_in_flight must be in [1, {MAX_IN_FLIGHT_MAXIMUM}]")
        self.agent_id = agent_id
        self.stats = AgentStats()
        self._stub = agent_pb2_grpc.IngestServiceStub(channel)
        self._max_in_flight = max_in_flight
        self._retry = retry if retry is not None else RetryPolicy()
        self._unacked: OrderedDict[int, agent_pb2.SampleBatch] = OrderedDict()
        self._window = asyncio.Event()
        self._metadata = bearer_metadata(token) if token is not None else None

    async def send_all(self, batches: Iterable[agent_pb2.SampleBatch], on_ack: OnAck) -> AgentStats:
        source = iter(batches)
        failures = 0
        while True:
            acked_before = self.stats.batches_acked
            try:
                await self._attempt(source, on_ack)
                return self.stats
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRIABLE:
                    raise AgentError(
                        f"agent {self.agent_id!r}: collector answered {exc.code().name}: "
                        f"{exc.details()}"
                    ) from exc
                error: Exception = exc
                hint_s = _retry_after_s(exc)
            except _StreamEndedError as exc:
                error = exc
                hint_s = 0.0
            failures = 1 if self.stats.batches_acked > acked_before else failures + 1
            if failures > self._retry.max_retries:
                raise AgentError(
                    f"agent {self.agent_id!r}: giving up after {self._retry.max_retries} "
                    f"retries without progress; last error: {error}"
                ) from error
            self.stats.retries += 1
            delay = max(self._retry.delay_s(failures), min(hint_s, self._retry.backoff_max_s))
            _log.warning(
                "agent %s: stream failed (%s); resending %d unacked batches in %.2f s",
                self.agent_id,
                error,
                len(self._unacked),
                delay,
            )
            await asyncio.sleep(delay)

    async def _attempt(self, source: Iterator[agent_pb2.SampleBatch], on_ack: OnAck) -> None:
        call = self._stub.StreamBatches(metadata=self._metadata)
        exhausted = False

        async def write() -> None:
            nonlocal exhausted
            for batch in list(self._unacked.values()):  # resend, same (agent_id, seq)
                self.stats.sends += 1
                await call.write(batch)
            while True:
                while len(self._unacked) >= self._max_in_flight:
                    self._window.clear()
                    await self._window.wait()
                fresh = next(source, None)
                if fresh is None:
                    break
                batch = fresh
                if batch.agent_id != self.agent_id:
                    raise ValueError(f"batch of {batch.agent_id!r} given to {self.agent_id!r}")
                self._unacked[batch.seq] = batch
                self.stats.batches_sent += 1
                self.stats.sends += 1
                await call.write(batch)
            exhausted = True
            await call.done_writing()

        async def read() -> None:
            while True:
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    return
                assert isinstance(ack, agent_pb2.BatchAck)
                oldest = next(iter(self._unacked), None)
                if ack.agent_id != self.agent_id or ack.seq != oldest:
                    raise AgentError(
                        f"agent {self.agent_id!r}: ack for ({ack.agent_id!r}, {ack.seq}) "
                        f"while the oldest unacked seq is {oldest}"
                    )
                batch = self._unacked.pop(ack.seq)
                self.stats.batches_acked += 1
                on_ack(batch, ack)
                self._window.set()

        writer = asyncio.create_task(write())
        reader = asyncio.create_task(read())
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and writer.exception() is not None and not reader.done():
                # A failed write means the call ended: its status comes from the reader.
                await asyncio.wait({reader}, timeout=READ_STATUS_TIMEOUT_S)
            if writer.done() and writer.exception() is None:
                await reader  # the remaining acks, then EOF or the call's error status
            if reader.done():
                await reader  # raises the call's error status, if any
            if writer.done():
                await writer  # raises the writer's error, if any
            if not (exhausted and not self._unacked):
                raise _StreamEndedError(f"stream closed with {len(self._unacked)} batches unacked")
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            call.cancel()


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS towards the collector (PEM bytes): ``server_ca`` verifies the collector; a
    ``certificate_chain`` and ``private_key`` are presented for mutual TLS."""

    server_ca: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("give both certificate_chain and private_key, or neither")


def open_channel(
    target: str,
    tls: ClientTls | None = None,
    options: Iterable[tuple[str, int | str]] = (),
) -> grpc.aio.Channel:
    """A channel to the collector: plaintext, or TLS / mutual TLS with ``tls``."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.server_ca,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
    return grpc.aio.secure_channel(target, credentials, options=list(options))


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float:
    """The collector's ``retry-after-ms`` hint (trailing metadata), in seconds; 0 if none."""
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            text = value.decode() if isinstance(value, bytes) else value
            if text.isdigit():
                return int(text) / 1000
    return 0.0


async def simulate_fleet(
    target: str,
    spec: FleetSpec,
    *,
    concurrency: int = 16,
    max_in_flight: int = 8,
    retry: RetryPolicy | None = None,
    ground_truth_path: Path | None = None,
    channel_options: Iterable[tuple[str, int | str]] = (),
    tokens: Mapping[str, str] | None = None,
    tls: ClientTls | None = None,
) -> GroundTruth:
    """Run one agent per host of ``spec`` against the collector at ``target`` (host:port),
    at most ``concurrency`` agents at once, as fast as acks allow (time compressed).
    ``tokens``: agent_id -> bearer token, for a collector that authenticates.
    ``tls``: TLS (mutual TLS with a client certificate) towards the collector.

    Returns the ground truth, also written to ``ground_truth_path`` when given.
    """
    if not 1 <= concurrency <= CONCURRENCY_MAXIMUM:
        raise ValueError(f"concurrency must be in [1, {CONCURRENCY_MAXIMUM}]")
    truth = GroundTruth(spec)
    hosts = iter(range(spec.hosts))

    async with open_channel(target, tls, channel_options) as channel:

        async def run_hosts() -> None:
            for host in hosts:  # shared iterator: each worker takes the next host
                agent_id = spec.agent_id(host)
                await _run_host(
                    channel,
                    spec,
                    host,
                    truth,
                    max_in_flight=max_in_flight,
                    retry=retry,
                    token=tokens.get(agent_id) if tokens is not None else None,
                )

        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, spec.hosts)):
                group.create_task(run_hosts())

    if ground_truth_path is not None:
        truth.write_json(ground_truth_path)
    return truth


async def _run_host(
    channel: grpc.aio.Channel,
    spec: FleetSpec,
    host: int,
    truth: GroundTruth,
    *,
    max_in_flight: int,
    retry: RetryPolicy | None,
    token: str | None = None,
) -> None:
    agent = AgentClient(
        channel, spec.agent_id(host), max_in_flight=max_in_flight, retry=retry, token=token
    )
    in_flight: dict[int, GeneratedBatch] = {}

    def batches() -> Iterator[agent_pb2.SampleBatch]:
        for generated in host_batches(spec, host):
            in_flight[generated.batch.seq] = generated
            yield generated.batch

    def on_ack(batch: agent_pb2.SampleBatch, ack: agent_pb2.BatchAck) -> None:
        truth.record_ack(in_flight.pop(batch.seq), ack)

    stats = await agent.send_all(batches(), on_ack)
    truth.batches_sent += stats.batches_sent
    truth.sends += stats.sends
    truth.retries += stats.retries
