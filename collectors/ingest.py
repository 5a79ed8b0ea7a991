"""The ingest service: validate a batch, write its accepted samples, then build the ack.

Transport-free (the gRPC adapter is ``grpc_server``; the sink a :class:`BatchSink`). The
order is the contract: a batch is acked only after the sink confirmed its record, and a
batch with no accepted sample writes nothing but is still acked (with its rejections).

The collector keeps no state per agent: a duplicate ``(agent_id, seq)`` is written again
and acked again; rating deduplicates by ``(agent_id, seq)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from collectors.directory import Directory, Limits
from collectors.ports import BatchSink, SinkError
from collectors.validation import Verdict, accepted_columns, decode_batch, validate
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import usage_record_pb2

USAGE_TOPIC = "usage.samples.v1"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_IN_FLIGHT_PER_STREAM_MAXIMUM = 1024
DELIVERY_TIMEOUT_MS_MAXIMUM = 600_000

Clock = Callable[[], datetime]


def unix_ms(instant: datetime) -> int:
    """Integer milliseconds since the epoch of an aware datetime (no float on the way)."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"naive datetime {instant!r}: the clock must return aware UTC times")
    return (instant - EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class IngestSettings:
    collector_id: str
    topic: str = USAGE_TOPIC
    # Batches of one stream being validated/written before the oldest is acked.
    max_in_flight_per_stream: int = 8
    # Upper bound on waiting for the sink per batch (the Kafka producer's own
    # message.timeout.ms should be lower); past it the batch is not acked.
    delivery_timeout_ms: int = 60_000
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not self.collector_id:
            raise ValueError("collector_id must not be empty")
        if not self.topic:
            raise ValueError("topic must not be empty")
        if not 1 <= self.max_in_flight_per_stream <= MAX_IN_FLIGHT_PER_STREAM_MAXIMUM:
            raise ValueError(
                f"max_in_flight_per_stream must be in [1, {MAX_IN_FLIGHT_PER_STREAM_MAXIMUM}], "
                f"got {self.max_in_flight_per_stream}"
            )
        if not 1 <= self.delivery_timeout_ms <= DELIVERY_TIMEOUT_MS_MAXIMUM:
            raise ValueError(
                f"delivery_timeout_ms must be in [1, {DELIVERY_TIMEOUT_MS_MAXIMUM}], "
                f"got {self.delivery_timeout_ms}"
            )


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A validated batch: its ack, and the Kafka record to write first (None: nothing)."""

    agent_id: str
    seq: int
    verdict: Verdict
    ack: agent_pb2.BatchAck
    record: bytes | None


class Ingestor:
    """``ack = await ingestor.ingest(raw)``; raises ``MalformedBatchError`` or ``SinkError``."""

    def __init__(
        self, directory: Directory, sink: BatchSink, settings: IngestSettings, clock: Clock
    ) -> None:
        self.directory = directory  # replace it (atomically) when the catalog changes
        self.settings = settings
        self._sink = sink
        self._clock = clock

    def prepare(self, raw: bytes) -> PreparedBatch:
        """Decode and validate (CPU only, no I/O); raise ``MalformedBatchError``."""
        limits = self.settings.limits
        batch = decode_batch(raw, limits)
        received_at_unix_ms = unix_ms(self._clock())
        verdict = validate(batch, self.directory, limits, received_at_unix_ms // 1000)
        ack = agent_pb2.BatchAck(
            agent_id=batch.agent_id,
            seq=batch.seq,
            accepted_count=verdict.accepted_count,
            rejections=[r.to_proto() for r in verdict.rejections],
        )
        record: bytes | None = None
        if verdict.accepted_count:
            message = usage_record_pb2.UsageBatchRecord(
                agent_id=batch.agent_id,
                seq=batch.seq,
                received_at_unix_ms=received_at_unix_ms,
                collector_id=self.settings.collector_id,
            )
            message.samples.CopyFrom(accepted_columns(batch, verdict.accepted_mask))
            record = message.SerializeToString()
        return PreparedBatch(batch.agent_id, batch.seq, verdict, ack, record)

    async def commit(self, prepared: PreparedBatch) -> agent_pb2.BatchAck:
        """Write the record (if any) and wait for the sink; only then return the ack."""
        if prepared.record is not None:
            try:
                async with asyncio.timeout(self.settings.delivery_timeout_ms / 1000):
                    await self._sink.send(
                        self.settings.topic, prepared.agent_id.encode(), prepared.record
                    )
            except TimeoutError:
                raise SinkError(
                    f"no delivery confirmation within {self.settings.delivery_timeout_ms} ms"
                ) from None
        return prepared.ack

    async def ingest(self, raw: bytes) -> agent_pb2.BatchAck:
        return await self.commit(self.prepare(raw))
