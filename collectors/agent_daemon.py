"""The agent daemon (``meterline agent run``): read this host's usage every interval, spool each
batch durably, stream the spool to a collector over one long-lived gRPC stream.

Two loops in one event loop:

* **collect** (every ``interval_s``): take a :class:`~collectors.host_usage.Reading`, turn
  ``[previous reading, this reading)`` into samples (:func:`~collectors.host_usage.samples_between`)
  and append them as one ``SampleBatch`` to the :class:`~collectors.spool.Spool` under the next
  ``seq``. The batch is on disk (fsync'd) before the sender can see it.
* **send**: one ``StreamBatches`` stream; writes every spooled batch oldest first (at most
  ``max_in_flight`` unacked), and deletes a batch from the spool when its ack arrives (acks
  come in order; an ack that does not match the oldest unacked batch ends the stream). The
  bytes sent are the spooled bytes: a resend is byte-identical, same ``(agent_id, seq)``.
  When the stream fails (collector down, network cut, ``UNAVAILABLE``, a bad token ...), the
  sender waits a bounded exponential backoff with jitter and opens a new stream, which starts
  again from the oldest unacked batch. It never gives up and never deletes an unacked batch:
  a batch the collector keeps refusing blocks the spool (logged at ERROR) until an operator
  acts.

**Full spool policy: stop reading, do not drop.** When the spool is at its bound, the collect
loop skips the reading and keeps its previous baseline (``stats.cycles_deferred``, one WARNING
per episode). Counters are cumulative, so no usage is lost: the first batch after room frees
up covers the whole gap (cut into pieces of at most 3,600 s, the counter deltas spread over
them exactly; gauges use the mean of the two readings). Only pieces older than
``max_span_s`` (default 35 days, the default maximum lateness; maximum 60 days, which keeps a
catch-up batch under 10,000 samples) are dropped, with an ERROR log and
``stats.pieces_dropped``. The baseline lives in memory: after a daemon restart the first
reading is a new baseline, so the usage between the last reading before the restart and the
first one after it is not reported.

This module is an adapter (it imports ``grpc``); the host readings and the spool are in
``host_usage`` and ``spool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import grpc

from collectors.auth import bearer_metadata
from collectors.host_usage import (
    DEFAULT_MAX_SPAN_S,
    METERS,
    HostSamples,
    HostUsageError,
    Reading,
    samples_between,
)
from collectors.spool import Spool, SpoolFullError
from meterline_proto.agent.v1 import agent_pb2

_log = logging.getLogger(__name__)

STREAM_METHOD = "/meterline.agent.v1.IngestService/StreamBatches"
INTERVAL_S_MAXIMUM = 3600
MAX_IN_FLIGHT_MAXIMUM = 1024
BACKOFF_S_MAXIMUM = 600.0
MAX_SPAN_S_MAXIMUM = 60 * 24 * 3600
READ_STATUS_TIMEOUT_S = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Statuses that mean "the problem is on this side and will not go away by itself".
_NEEDS_OPERATOR = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

Clock = Callable[[], datetime]
StreamMethod = grpc.aio.StreamStreamMultiCallable[bytes, agent_pb2.BatchAck]
StreamCall = grpc.aio.StreamStreamCall[bytes, agent_pb2.BatchAck]


class UsageReader(Protocol):
    def read(self, at_unix_s: int) -> Reading: ...


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    target: str  # collector host:port
    agent_id: str
    resource_id: str  # the resource this host's samples are reported for
    interval_s: int = 10
    max_in_flight: int = 8  # unacked batches on the stream
    backoff_initial_s: float = 0.5  # first wait after a failed stream
    backoff_max_s: float = 30.0  # cap of the exponential backoff
    max_span_s: int = DEFAULT_MAX_SPAN_S  # oldest usage a catch-up batch may carry
    stop_grace_s: float = 5.0  # on stop: wait this long for the acks of in-flight batches
    token: str | None = field(default=None, repr=False)  # sent as "authorization: Bearer ..."

    def __post_init__(self) -> None:
        if not self.target or not self.agent_id or not self.resource_id:
            raise ValueError("target, agent_id and resource_id must not be empty")
        if not 1 <= self.interval_s <= INTERVAL_S_MAXIMUM:
            raise ValueError(f"interval_s must be in [1, {INTERVAL_S_MAXIMUM}]")
        if not 1 <= self.max_in_flight <= MAX_IN_FLIGHT_MAXIMUM:
            raise ValueError(f"max_in_flight must be in [1, {MAX_IN_FLIGHT_MAXIMUM}]")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s <= BACKOFF_S_MAXIMUM:
            raise ValueError(f"need 0 < backoff_initial_s <= backoff_max_s <= {BACKOFF_S_MAXIMUM}")
        if not 1 <= self.max_span_s <= MAX_SPAN_S_MAXIMUM:
            raise ValueError(f"max_span_s must be in [1, {MAX_SPAN_S_MAXIMUM}]")
        if not 0 <= self.stop_grace_s <= 60:
            raise ValueError("stop_grace_s must be in [0, 60]")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("the token must be non-empty and contain no whitespace")


def read_token_file(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped)."""
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def backoff_delay_s(
    failures: int, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Bounded exponential backoff with "equal jitter": uniform in [d/2, d], where
    d = min(max_s, initial_s * 2^(failures - 1))."""
    ceiling = min(max_s, initial_s * float(2 ** min(max(0, failures - 1), 32)))
    return (rng or random).uniform(ceiling / 2, ceiling)


def build_batch(
    agent_id: str, resource_id: str, seq: int, sent_at_unix_ms: int, samples: HostSamples
) -> bytes:
    """One serialized ``SampleBatch`` of ``samples`` of one resource (columns, no loop per
    sample)."""
    batch = agent_pb2.SampleBatch(agent_id=agent_id, seq=seq, sent_at_unix_ms=sent_at_unix_ms)
    cols = batch.samples
    cols.resource_dict.append(resource_id)
    cols.meter_dict.extend(METERS)
    cols.resource_index.extend([0] * len(samples))
    cols.meter_index.extend(samples.meter_index.tolist())
    cols.start_unix_s.extend(samples.start_unix_s.tolist())
    cols.duration_s.extend(samples.duration_s.tolist())
    cols.value.extend(samples.value.tolist())
    return batch.SerializeToString()


@dataclass(slots=True)
class DaemonStats:
    readings: int = 0
    read_errors: int = 0
    batches_spooled: int = 0
    cycles_deferred: int = 0  # readings skipped because the spool was full
    pieces_dropped: int = 0  # pieces of a catch-up interval older than max_span_s
    sends: int = 0  # writes on a stream, resends included
    reconnects: int = 0
    batches_acked: int = 0
    samples_accepted: int = 0
    samples_rejected: int = 0
    rejections_by_code: dict[str, int] = field(default_factory=dict)


class _StreamEndedError(Exception):
    """The collector ended the stream, or answered out of order; reconnect."""


OnAck = Callable[[agent_pb2.BatchAck], None]
OnSpooled = Callable[[int, bytes], None]  # (seq, the spooled batch bytes)


class AgentDaemon:
    """``await daemon.run()`` until ``daemon.stop()``; or drive it by hand with
    :meth:`collect_once` and :meth:`send` (tests)."""

    def __init__(
        self,
        settings: DaemonSettings,
        spool: Spool,
        reader: UsageReader,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        on_ack: OnAck | None = None,
        on_spooled: OnSpooled | None = None,
    ) -> None:
        if spool.agent_id != settings.agent_id:
            raise ValueError(f"spool of {spool.agent_id!r} given to agent {settings.agent_id!r}")
        self.settings = settings
        self.spool = spool
        self.stats = DaemonStats()
        self._reader = reader
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._on_ack = on_ack
        self._on_spooled = on_spooled
        self._baseline: Reading | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # a new batch, an ack (window), or stop
        self._deferring = False
        self._metadata = bearer_metadata(settings.token) if settings.token else ()

    # -- collecting ---------------------------------------------------------------------------

    def _now_unix_s(self) -> int:
        now = self._clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"naive datetime {now!r}: the clock must return aware UTC times")
        return (now - _EPOCH) // timedelta(seconds=1)

    def collect_once(self) -> int | None:
        """Take a reading and spool the batch since the previous one; return its seq, or None
        (first reading, spool full, read error, no time elapsed)."""
        if not self.spool.has_room():
            self._defer()
            return None
        now_s = self._now_unix_s()
        try:
            reading = self._reader.read(now_s)
        except (OSError, HostUsageError) as exc:
            self.stats.read_errors += 1
            _log.error("agent %s: reading host usage failed: %s", self.settings.agent_id, exc)
            return None
        self.stats.readings += 1
        previous = self._baseline
        if previous is None or reading.at_unix_s < previous.at_unix_s:
            if previous is not None:
                _log.warning(
                    "agent %s: the clock stepped back; new baseline", self.settings.agent_id
                )
            self._baseline = reading
            return None
        if reading.at_unix_s == previous.at_unix_s:
            return None  # keep the older baseline
        samples = samples_between(previous, reading, self.settings.max_span_s)
        if samples.pieces_dropped:
            self.stats.pieces_dropped += samples.pieces_dropped
            _log.error(
                "agent %s: dropped %d hour(s) of usage older than %d s (gap %d..%d)",
                self.settings.agent_id,
                samples.pieces_dropped,
                self.settings.max_span_s,
                previous.at_unix_s,
                reading.at_unix_s,
            )
        sent_at_unix_ms = now_s * 1000
        built: list[bytes] = []

        def build(seq: int) -> bytes:
            built.append(
                build_batch(
                    self.settings.agent_id, self.settings.resource_id, seq, sent_at_unix_ms, samples
                )
            )
            return built[-1]

        try:
            seq = self.spool.append(build)
        except SpoolFullError:
            self._defer()  # keep the baseline: the usage stays in the counters
            return None
        if self._deferring:
            self._deferring = False
            _log.warning("agent %s: spool has room again; reading resumed", self.settings.agent_id)
        self._baseline = reading
        self.stats.batches_spooled += 1
        if self._on_spooled is not None:
            self._on_spooled(seq, built[-1])
        self._wake.set()
        return seq

    def _defer(self) -> None:
        self.stats.cycles_deferred += 1
        if not self._deferring:
            self._deferring = True
            _log.warning(
                "agent %s: spool full (%d batches, %d bytes): readings paused until the "
                "collector acks; no usage is lost (counters are cumulative)",
                self.settings.agent_id,
                len(self.spool),
                self.spool.bytes_used,
            )

    # -- sending ------------------------------------------------------------------------------

    def channel(self) -> grpc.aio.Channel:
        backoff_ms = int(self.settings.backoff_max_s * 1000)
        return grpc.aio.insecure_channel(
            self.settings.target,
            options=[
                # reconnect promptly once the collector is back (grpc's default waits up to 120 s)
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", backoff_ms),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )

    async def send(self, channel: grpc.aio.Channel) -> None:
        """Stream the spool until :meth:`stop`; reconnect with backoff on every failure."""
        method: StreamMethod = channel.stream_stream(
            STREAM_METHOD, None, agent_pb2.BatchAck.FromString
        )
        failures = 0
        while not self._stopping.is_set():
            acked_before = self.stats.batches_acked
            level = logging.WARNING
            try:
                await self._stream_once(method)
                continue  # only returns when stopping
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _NEEDS_OPERATOR:
                    level = logging.ERROR
                error = f"{exc.code().name}: {exc.details()}"
            except _StreamEndedError as exc:
                error = str(exc)
            if self._stopping.is_set():
                break
            failures = 1 if self.stats.batches_acked > acked_before else failures + 1
            delay = backoff_delay_s(
                failures, self.settings.backoff_initial_s, self.settings.backoff_max_s, self._rng
            )
            self.stats.reconnects += 1
            _log.log(
                level,
                "agent %s: stream to %s failed (%s); %d batches spooled, retrying in %.2f s",
                self.settings.agent_id,
                self.settings.target,
                error,
                len(self.spool),
                delay,
            )
            await self._sleep(delay)

    async def _stream_once(self, method: StreamMethod) -> None:
        call: StreamCall = method(metadata=self._metadata)
        unacked: deque[int] = deque()
        spool, limit = self.spool, self.settings.max_in_flight

        async def write() -> None:
            last = 0
            while True:
                self._wake.clear()
                if self._stopping.is_set():
                    break
                nxt = spool.next_after(last) if len(unacked) < limit else None
                if nxt is None:
                    await self._wake.wait()
                    continue
                payload = spool.read(nxt)  # the spooled bytes: a resend is identical
                unacked.append(nxt)
                last = nxt
                self.stats.sends += 1
                await call.write(payload)
            await call.done_writing()

        async def read() -> None:
            while True:
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    return
                assert isinstance(ack, agent_pb2.BatchAck)
                oldest = unacked[0] if unacked else None
                if ack.agent_id != self.settings.agent_id or ack.seq != oldest:
                    raise _StreamEndedError(
                        f"ack for ({ack.agent_id!r}, {ack.seq}) while the oldest unacked "
                        f"seq is {oldest}"
                    )
                unacked.popleft()
                spool.ack(ack.seq)
                self._record_ack(ack)
                self._wake.set()

        writer = asyncio.create_task(write())
        reader = asyncio.create_task(read())
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and writer.exception() is not None and not reader.done():
                # A failed write means the call ended: its status comes from the reader.
                await asyncio.wait({reader}, timeout=READ_STATUS_TIMEOUT_S)
            if writer.done() and writer.exception() is None:
                await reader  # stopping: the acks of what is in flight, then EOF
            if reader.done():
                await reader  # raises the call's status, if it failed
            if writer.done():
                await writer
            if not self._stopping.is_set() or unacked:
                raise _StreamEndedError(f"stream ended with {len(unacked)} batches unacked")
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            call.cancel()

    def _record_ack(self, ack: agent_pb2.BatchAck) -> None:
        stats = self.stats
        stats.batches_acked += 1
        stats.samples_accepted += ack.accepted_count
        stats.samples_rejected += len(ack.rejections)
        for rejection in ack.rejections:  # rejected samples only (a handful per batch)
            code = agent_pb2.RejectCode.Name(rejection.code)
            if code not in stats.rejections_by_code:
                _log.warning(
                    "agent %s: collector rejects samples with %s (%s: %s); first seen in seq %d",
                    self.settings.agent_id,
                    code,
                    rejection.field,
                    rejection.detail,
                    ack.seq,
                )
            stats.rejections_by_code[code] = stats.rejections_by_code.get(code, 0) + 1
        if self._on_ack is not None:
            self._on_ack(ack)

    # -- running ------------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or return early on stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def stop(self) -> None:
        """Ask :meth:`run` to finish: no new reading; in-flight batches get ``stop_grace_s`` to
        be acked; whatever is unacked stays spooled."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        self._stopping.clear()
        loop = asyncio.get_running_loop()
        async with self.channel() as channel:
            sender = asyncio.create_task(self.send(channel))
            try:
                next_at = loop.time()
                while not self._stopping.is_set():
                    self.collect_once()
                    next_at += self.settings.interval_s
                    await self._sleep(max(0.0, next_at - loop.time()))
            finally:
                self.stop()
                try:
                    await asyncio.wait_for(sender, self.settings.stop_grace_s)
                except (TimeoutError, _StreamEndedError, grpc.aio.AioRpcError) as exc:
                    _log.info(
                        "agent %s: stopped with batches unacked (%s)", self.settings.agent_id, exc
                    )
