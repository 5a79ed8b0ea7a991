"""The ingest service: admit a batch, validate it, write its records, then build the ack.

Transport-free (the gRPC adapter is ``grpc_server``; the sink a :class:`BatchSink`). The
order is the contract: a batch is acked only after the sink confirmed its records — the
accepted samples on ``topic`` and, when some were rejected, the rejected samples with their
reasons on ``rejects_topic`` (same delivery guarantee). A batch with no accepted sample
writes nothing on ``topic`` but is still acked (with its rejections).

The collector keeps no state per agent: a duplicate ``(agent_id, seq)`` is written again
and acked again; rating deduplicates by ``(agent_id, seq)``.

Flow control (per process): at most ``max_in_flight_batches_per_process`` batches are
admitted and not yet confirmed by the sink; past it, or when the oldest of them has waited
longer than ``sink_slow_after_ms`` for the sink, new batches are refused with
:class:`OverloadedError` (gRPC ``RESOURCE_EXHAUSTED`` with a ``retry-after-ms`` hint)
instead of being buffered.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from collectors.auth import AgentIdentity, AuthenticationError, Authenticator
from collectors.directory import Directory, Limits
from collectors.lifecycle import decode_lifecycle_batch, validate_lifecycle
from collectors.ports import BatchSink, IngestMetrics, NoMetrics, SinkError
from collectors.validation import (
    MalformedBatchError,
    Verdict,
    accepted_columns,
    decode_batch,
    validate,
)
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import lifecycle_pb2, rejected_samples_pb2, usage_record_pb2

USAGE_TOPIC = "usage.samples.v1"
REJECTS_TOPIC = "usage.rejects.v1"
LIFECYCLE_TOPIC = "resource.events.v1"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_IN_FLIGHT_PER_STREAM_MAXIMUM = 1024
MAX_IN_FLIGHT_BATCHES_PER_PROCESS_MAXIMUM = 1_000_000
DELIVERY_TIMEOUT_MS_MAXIMUM = 600_000
SINK_SLOW_AFTER_MS_MAXIMUM = 600_000
RETRY_AFTER_MS_MAXIMUM = 600_000

Clock = Callable[[], datetime]
Monotonic = Callable[[], float]
_NO_CODES: Mapping[str, int] = {}
_SAMPLES_OF_BATCH = 4  # SampleBatch.samples
_SAMPLES_OF_RECORD_TAG = bytes([5 << 3 | 2])  # UsageBatchRecord.samples, length-delimited


@runtime_checkable
class SubmittingSink(Protocol):
    """A :class:`BatchSink` that can also produce a record *now* and hand back the future
    of its confirmation (``KafkaSink``): committing a batch then needs no task of its own.
    ``submit`` returns None when it cannot produce right away (the caller falls back to
    ``send``)."""

    def submit(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[None] | None: ...


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_bytes(raw: bytes, number: int) -> bytes | None:
    """The payload of the one length-delimited top-level field ``number`` of a parsed
    message (b"" when absent), or None when it occurs more than once (protobuf would merge
    the occurrences) or the bytes hold a group. A loop per top-level field, not per sample."""
    pos, end, found = 0, len(raw), None
    while pos < end:
        key, pos = _varint(raw, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(raw, pos)
        elif wire_type == 2:
            length, pos = _varint(raw, pos)
            if key >> 3 == number:
                if found is not None:
                    return None
                found = (pos, pos + length)
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            return None
    return b"" if found is None else raw[found[0] : found[1]]


def unix_ms(instant: datetime) -> int:
    """Integer milliseconds since the epoch of an aware datetime (no float on the way)."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"naive datetime {instant!r}: the clock must return aware UTC times")
    return (instant - EPOCH) // timedelta(milliseconds=1)


def _in_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


@dataclass(frozen=True, slots=True)
class IngestSettings:
    collector_id: str
    topic: str = USAGE_TOPIC
    # Where the rejected samples of each batch go, with their reasons (for operators).
    rejects_topic: str = REJECTS_TOPIC
    # Batches of one stream being validated/written before the oldest is acked.
    max_in_flight_per_stream: int = 8
    # Batches of the whole process admitted and not yet confirmed by the sink.
    max_in_flight_batches_per_process: int = 4096
    # Upper bound on waiting for the sink per batch (the Kafka producer's own
    # message.timeout.ms should be lower); past it the batch is not acked.
    delivery_timeout_ms: int = 60_000
    # The sink is "slow" when the oldest unconfirmed batch has waited this long: new
    # batches are refused (RESOURCE_EXHAUSTED) until it catches up.
    sink_slow_after_ms: int = 5_000
    # The hint sent with RESOURCE_EXHAUSTED and UNAVAILABLE (trailing metadata).
    retry_after_ms: int = 1_000
    limits: Limits = field(default_factory=Limits)
    # Where the accepted lifecycle events of each LifecycleBatch go (one record per batch).
    lifecycle_topic: str = LIFECYCLE_TOPIC

    def __post_init__(self) -> None:
        if not self.collector_id:
            raise ValueError("collector_id must not be empty")
        if not self.topic or not self.rejects_topic:
            raise ValueError("topic and rejects_topic must not be empty")
        if self.topic == self.rejects_topic:
            raise ValueError(f"topic and rejects_topic must differ, both are {self.topic!r}")
        if not self.lifecycle_topic or self.lifecycle_topic in {self.topic, self.rejects_topic}:
            raise ValueError(
                f"lifecycle_topic {self.lifecycle_topic!r} must be set and differ from the "
                "sample topics"
            )
        _in_range(
            "max_in_flight_per_stream",
            self.max_in_flight_per_stream,
            1,
            MAX_IN_FLIGHT_PER_STREAM_MAXIMUM,
        )
        _in_range(
            "max_in_flight_batches_per_process",
            self.max_in_flight_batches_per_process,
            1,
            MAX_IN_FLIGHT_BATCHES_PER_PROCESS_MAXIMUM,
        )
        _in_range("delivery_timeout_ms", self.delivery_timeout_ms, 1, DELIVERY_TIMEOUT_MS_MAXIMUM)
        _in_range("sink_slow_after_ms", self.sink_slow_after_ms, 1, SINK_SLOW_AFTER_MS_MAXIMUM)
        _in_range("retry_after_ms", self.retry_after_ms, 1, RETRY_AFTER_MS_MAXIMUM)


class AgentMismatchError(Exception):
    """The batch's agent_id is not the agent of the caller's token (gRPC PERMISSION_DENIED)."""


class OverloadedError(Exception):
    """The process is at its in-flight bound or the sink is slow: retry later."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted batch's place in the process's in-flight bound."""

    number: int
    admitted_at_s: float  # monotonic


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A validated batch: its ack, and the Kafka records to write first (None: nothing)."""

    agent_id: str
    seq: int
    verdict: Verdict
    ack: agent_pb2.BatchAck
    record: bytes | None  # the accepted samples, for ``topic``
    rejects_record: bytes | None  # the rejected samples and reasons, for ``rejects_topic``


def _seen(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True, slots=True)
class PendingCommit:
    """A batch whose records were handed to the sink: ``await ingestor.finish(pending)``."""

    ack: agent_pb2.BatchAck
    confirmed: asyncio.Future[Any] | None  # None: nothing to write
    records: int
    started_at_s: float  # loop time


class Ingestor:
    """``ack = await ingestor.ingest(raw, identity)``.

    Raises ``MalformedBatchError``, ``AgentMismatchError``, ``OverloadedError`` or
    ``SinkError``. ``authenticator=None`` turns authentication off (every caller may send
    any agent's batches for any resource): for the embedded demo and tests only.
    ``directory`` and ``authenticator`` are immutable; the composition root replaces them
    (a plain attribute assignment, atomic on the event loop) when the catalog or the tokens
    change.
    """

    def __init__(
        self,
        directory: Directory,
        sink: BatchSink,
        settings: IngestSettings,
        clock: Clock,
        *,
        authenticator: Authenticator | None = None,
        metrics: IngestMetrics | None = None,
        monotonic: Monotonic = time.monotonic,
    ) -> None:
        self.directory = directory
        self.authenticator = authenticator
        self.settings = settings
        self.metrics: IngestMetrics = metrics if metrics is not None else NoMetrics()
        self._sink = sink
        self._clock = clock
        self._monotonic = monotonic
        self._pending: OrderedDict[int, float] = OrderedDict()  # ticket -> admitted at
        self._tickets = 0
        self._submitting: SubmittingSink | None = sink if isinstance(sink, SubmittingSink) else None

    # -- authentication ------------------------------------------------------------------
    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> AgentIdentity | None:
        """The caller's identity (None when authentication is off); raises
        ``AuthenticationError``."""
        authenticator = self.authenticator
        if authenticator is None:
            return None
        try:
            return authenticator.authenticate(metadata)
        except AuthenticationError as exc:
            self.metrics.auth_failure(exc.reason)
            raise

    # -- flow control --------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def admit(self) -> Ticket:
        """Take a place in the process's in-flight bound, or raise ``OverloadedError``."""
        settings = self.settings
        now = self._monotonic()
        if len(self._pending) >= settings.max_in_flight_batches_per_process:
            raise OverloadedError(
                f"the collector has {len(self._pending)} batches in flight, its maximum",
                settings.retry_after_ms,
            )
        if self._pending:
            waited_ms = (now - next(iter(self._pending.values()))) * 1000
            if waited_ms > settings.sink_slow_after_ms:
                raise OverloadedError(
                    f"Kafka is slow: the oldest unconfirmed batch has waited {waited_ms:.0f} ms "
                    f"(more than {settings.sink_slow_after_ms} ms)",
                    settings.retry_after_ms,
                )
        self._tickets += 1
        self._pending[self._tickets] = now
        self.metrics.in_flight(len(self._pending))
        return Ticket(self._tickets, now)

    def release(self, ticket: Ticket) -> None:
        """Give the place back (the batch was confirmed, refused or abandoned). Idempotent."""
        if self._pending.pop(ticket.number, None) is not None:
            self.metrics.in_flight(len(self._pending))

    def acked(self, ticket: Ticket) -> None:
        """Record the ack latency of an admitted batch (and release it)."""
        self.release(ticket)
        self.metrics.acked(self._monotonic() - ticket.admitted_at_s)

    # -- the batch -----------------------------------------------------------------------
    def prepare(self, raw: bytes, identity: AgentIdentity | None = None) -> PreparedBatch:
        """Decode and validate (CPU only, no I/O); raise ``MalformedBatchError`` or
        ``AgentMismatchError``."""
        limits = self.settings.limits
        metrics = self.metrics
        metrics.batch_received()
        try:
            batch = decode_batch(raw, limits)
        except MalformedBatchError:
            metrics.batch_malformed()
            raise
        if identity is not None and batch.agent_id != identity.agent_id:
            raise AgentMismatchError(
                f"batch agent_id={batch.agent_id!r} seq={batch.seq}: this token belongs to "
                f"agent {identity.agent_id!r}"
            )
        received_at_unix_ms = unix_ms(self._clock())
        verdict = validate(
            batch,
            self.directory,
            limits,
            received_at_unix_ms // 1000,
            identity.scope if identity is not None else None,
        )
        rejections = [r.to_proto() for r in verdict.rejections]
        accepted_count = verdict.accepted_count
        ack = agent_pb2.BatchAck(
            agent_id=batch.agent_id,
            seq=batch.seq,
            accepted_count=accepted_count,
            rejections=rejections,
        )
        record: bytes | None = None
        if accepted_count:
            header = usage_record_pb2.UsageBatchRecord(
                agent_id=batch.agent_id,
                seq=batch.seq,
                received_at_unix_ms=received_at_unix_ms,
                collector_id=self.settings.collector_id,
            ).SerializeToString()
            # Every sample accepted: the batch's own SampleColumns bytes, spliced in as they
            # came (no copy of the columns, no re-encoding); else the accepted ones, compacted.
            samples = field_bytes(raw, _SAMPLES_OF_BATCH) if not rejections else None
            if samples is None:
                samples = accepted_columns(batch, verdict.accepted_mask).SerializeToString()
            record = b"".join(
                (header, _SAMPLES_OF_RECORD_TAG, _encode_varint(len(samples)), samples)
            )
        rejects_record: bytes | None = None
        if rejections:
            rejected = rejected_samples_pb2.RejectedSamples(
                agent_id=batch.agent_id,
                seq=batch.seq,
                received_at_unix_ms=received_at_unix_ms,
                collector_id=self.settings.collector_id,
                rejections=rejections,
            )
            rejected.samples.CopyFrom(accepted_columns(batch, ~verdict.accepted_mask))
            rejects_record = rejected.SerializeToString()
        codes = (
            Counter(agent_pb2.RejectCode.Name(r.code) for r in verdict.rejections)
            if rejections
            else _NO_CODES
        )
        metrics.samples_judged(verdict.sample_count, accepted_count, codes)
        return PreparedBatch(batch.agent_id, batch.seq, verdict, ack, record, rejects_record)

    async def _send(self, topic: str, key: bytes, value: bytes) -> None:
        started = self._monotonic()
        await self._sink.send(topic, key, value)
        self.metrics.kafka_delivery(self._monotonic() - started)

    async def _write_all(self, writes: list[tuple[str, bytes]], key: bytes) -> None:
        """The records through ``BatchSink.send`` (a sink that cannot ``submit``)."""
        outcomes = await asyncio.gather(
            *(self._send(topic, key, value) for topic, value in writes), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def start(self, prepared: PreparedBatch) -> PendingCommit:
        """Hand the batch's records to the sink now (no await); ``finish`` waits for them.

        With a :class:`SubmittingSink` this creates no task: the records are produced here
        and their confirmations are plain futures. May raise ``SinkError``.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        writes = [
            (topic, value)
            for topic, value in (
                (self.settings.topic, prepared.record),
                (self.settings.rejects_topic, prepared.rejects_record),
            )
            if value is not None
        ]
        if not writes:
            return PendingCommit(prepared.ack, None, 0, started)
        key = prepared.agent_id.encode()
        sink = self._submitting
        futures: list[asyncio.Future[None]] = []
        if sink is not None:
            try:
                for topic, value in writes:
                    future = sink.submit(topic, key, value)
                    if future is None:  # the producer's queue is full: wait in send()
                        break
                    futures.append(future)
            except BaseException:
                for future in futures:  # not acked either way; mark the outcome as seen
                    future.add_done_callback(_seen)
                raise
        confirmed: asyncio.Future[Any]
        if len(futures) == len(writes):
            confirmed = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
        else:
            confirmed = asyncio.ensure_future(self._write_all(writes[len(futures) :], key))
            if futures:
                confirmed = asyncio.gather(*futures, confirmed)
        return PendingCommit(prepared.ack, confirmed, len(writes), started)

    async def finish(self, pending: PendingCommit) -> agent_pb2.BatchAck:
        """Wait until the sink confirmed every record of the batch (at most
        ``delivery_timeout_ms`` after ``start``); only then return its ack. Raises
        ``SinkError`` (the records' future is cancelled when the wait times out)."""
        confirmed = pending.confirmed
        if confirmed is None:
            return pending.ack
        timeout_ms = self.settings.delivery_timeout_ms
        try:
            async with asyncio.timeout_at(pending.started_at_s + timeout_ms / 1000):
                await confirmed
        except TimeoutError:
            raise SinkError(f"no delivery confirmation within {timeout_ms} ms") from None
        seconds = asyncio.get_running_loop().time() - pending.started_at_s
        for _ in range(pending.records):
            self.metrics.kafka_delivery(seconds)
        return pending.ack

    async def commit(self, prepared: PreparedBatch) -> agent_pb2.BatchAck:
        """Write the records (if any) and wait for the sink; only then return the ack."""
        return await self.finish(self.start(prepared))

    async def ingest(self, raw: bytes, identity: AgentIdentity | None = None) -> agent_pb2.BatchAck:
        """Admit, prepare and commit one batch (the unary path)."""
        ticket = self.admit()
        try:
            ack = await self.commit(self.prepare(raw, identity))
        finally:
            self.release(ticket)
        self.acked(ticket)
        return ack

    # -- lifecycle events ----------------------------------------------------------------
    async def ingest_lifecycle(
        self, raw: bytes, identity: AgentIdentity | None = None
    ) -> agent_pb2.LifecycleAck:
        """Admit, validate and write one ``LifecycleBatch``; return its ack only after Kafka
        confirmed the record of its accepted events (none accepted: nothing is written).

        Raises ``MalformedLifecycleBatchError``, ``AgentMismatchError``, ``OverloadedError``
        or ``SinkError``. The collector keeps no state: a resent batch is written again and
        rating counts each ``(resource_id, event_id)`` once.
        """
        ticket = self.admit()
        try:
            limits = self.settings.limits
            batch = decode_lifecycle_batch(raw, limits)
            if identity is not None and batch.agent_id != identity.agent_id:
                raise AgentMismatchError(
                    f"lifecycle batch of agent_id={batch.agent_id!r}: this token belongs to "
                    f"agent {identity.agent_id!r}"
                )
            received_at_unix_ms = unix_ms(self._clock())
            verdict = validate_lifecycle(
                batch,
                self.directory,
                limits,
                received_at_unix_ms // 1000,
                identity.scope if identity is not None else None,
            )
            if verdict.accepted:
                record = lifecycle_pb2.LifecycleRecord(
                    agent_id=batch.agent_id,
                    received_at_unix_ms=received_at_unix_ms,
                    collector_id=self.settings.collector_id,
                    events=verdict.accepted,
                )
                try:
                    async with asyncio.timeout(self.settings.delivery_timeout_ms / 1000):
                        await self._send(
                            self.settings.lifecycle_topic,
                            batch.agent_id.encode(),
                            record.SerializeToString(),
                        )
                except TimeoutError:
                    raise SinkError(
                        f"no delivery confirmation within {self.settings.delivery_timeout_ms} ms"
                    ) from None
        finally:
            self.release(ticket)
        self.acked(ticket)
        return agent_pb2.LifecycleAck(
            agent_id=batch.agent_id,
            accepted_count=len(verdict.accepted),
            rejections=verdict.rejections,
        )
