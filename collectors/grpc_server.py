"""The gRPC adapter of the ingest service (the only server module importing ``grpc``).

Handlers are registered with identity (bytes) request deserializers, so that the collector
parses each batch itself and a malformed one is answered ``INVALID_ARGUMENT`` with a message
naming the problem, instead of grpc's generic deserialization failure.

``StreamBatches`` is pipelined: up to ``max_in_flight_per_stream`` batches of one stream are
validated and written to Kafka concurrently, and their acks go back in arrival order, each
only after its records were confirmed. A batch that cannot be taken ends the stream after
the acks of the batches before it, with the status that says why (nothing after it is
read); a Kafka failure ends it with ``UNAVAILABLE`` and acks nothing more. Batches not acked
are the agent's to resend (with the same ``(agent_id, seq)``).

Statuses: ``UNAUTHENTICATED`` (no, unknown or revoked token; checked when a call starts and
again on the next batch after the credentials were refreshed), ``PERMISSION_DENIED`` (a
batch of another agent than the token's), ``INVALID_ARGUMENT`` (malformed batch),
``RESOURCE_EXHAUSTED`` (the process is at its in-flight bound or Kafka is slow),
``UNAVAILABLE`` (Kafka did not confirm, or the collector is shutting down). The last two
carry the trailing metadata ``retry-after-ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from collectors.auth import AgentIdentity, AuthenticationError
from collectors.ingest import (
    AgentMismatchError,
    Ingestor,
    OverloadedError,
    PendingCommit,
    Ticket,
)
from collectors.lifecycle import MalformedLifecycleBatchError
from collectors.ports import SinkError
from collectors.validation import MalformedBatchError

_log = logging.getLogger(__name__)

SERVICE_NAME = "meterline.agent.v1.IngestService"
RETRY_HINT = "retry the batch with the same (agent_id, seq)"
RETRY_AFTER_KEY = "retry-after-ms"
SHUTTING_DOWN = "the collector is shutting down; reconnect (to another collector)"

Context = grpc.aio.ServicerContext[bytes, bytes]


@dataclass(frozen=True, slots=True)
class _Refused:
    """Why the stream ends at this batch (after the acks of the batches before it)."""

    code: grpc.StatusCode
    message: str
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class _InFlight:
    pending: PendingCommit
    ticket: Ticket


_Item = _InFlight | _Refused | None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark the outcome of an abandoned batch as seen (it is not acked either way)."""
    if not future.cancelled():
        future.exception()


def _release(ingestor: Ingestor, ticket: Ticket, _confirmed: object) -> None:
    ingestor.release(ticket)  # confirmed, failed or abandoned: the place is free again


def _abandon(ingestor: Ingestor, item: _InFlight) -> None:
    """A batch that will not be acked: stop waiting for its records, free its place."""
    confirmed = item.pending.confirmed
    if confirmed is not None:
        confirmed.cancel()
        confirmed.add_done_callback(_retrieve)
    ingestor.release(item.ticket)


def _trailer(retry_after_ms: int | None) -> Sequence[tuple[str, str]]:
    return () if retry_after_ms is None else ((RETRY_AFTER_KEY, str(retry_after_ms)),)


def _refusal(exc: Exception, retry_after_ms: int) -> _Refused:
    """The status of a batch that is not taken (``exc`` raised by admit/prepare)."""
    if isinstance(exc, MalformedBatchError | MalformedLifecycleBatchError):
        return _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, AuthenticationError):
        return _Refused(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    if isinstance(exc, AgentMismatchError):
        return _Refused(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, OverloadedError):
        return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc.retry_after_ms)
    if isinstance(exc, SinkError):
        return _Refused(grpc.StatusCode.UNAVAILABLE, f"{exc}; {RETRY_HINT}", retry_after_ms)
    raise exc


_REFUSED_ERRORS = (
    MalformedBatchError,
    MalformedLifecycleBatchError,
    AuthenticationError,
    AgentMismatchError,
    OverloadedError,
)


class IngestHandlers:
    """The two RPCs over an :class:`Ingestor`, on raw bytes."""

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor
        self._draining = False
        self._readers: set[asyncio.Task[None]] = set()

    def drain(self) -> None:
        """Refuse new calls, stop reading open streams; batches already read finish (and
        are acked), then each stream ends ``UNAVAILABLE``."""
        self._draining = True
        for reader in list(self._readers):
            reader.cancel()

    async def _abort(self, context: Context, refused: _Refused) -> NoReturn:
        await context.abort(refused.code, refused.message, _trailer(refused.retry_after_ms))

    async def _start_call(self, context: Context) -> AgentIdentity | None:
        """Refuse a new call while draining; authenticate it."""
        retry_after_ms = self._ingestor.settings.retry_after_ms
        if self._draining:
            await self._abort(
                context, _Refused(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, retry_after_ms)
            )
        try:
            return self._ingestor.authenticate(context.invocation_metadata() or ())
        except AuthenticationError as exc:
            await self._abort(context, _refusal(exc, retry_after_ms))

    async def submit_batch(self, raw: bytes, context: Context) -> bytes:
        identity = await self._start_call(context)
        try:
            ack = await self._ingestor.ingest(raw, identity)
        except (*_REFUSED_ERRORS, SinkError) as exc:
            await self._abort(context, _refusal(exc, self._ingestor.settings.retry_after_ms))
        return ack.SerializeToString()

    async def send_lifecycle_events(self, raw: bytes, context: Context) -> bytes:
        identity = await self._start_call(context)
        try:
            ack = await self._ingestor.ingest_lifecycle(raw, identity)
        except (*_REFUSED_ERRORS, SinkError) as exc:
            await self._abort(context, _refusal(exc, self._ingestor.settings.retry_after_ms))
        return ack.SerializeToString()

    async def stream_batches(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        ingestor = self._ingestor
        retry_after_ms = ingestor.settings.retry_after_ms
        authenticator = ingestor.authenticator
        identity = await self._start_call(context)
        metadata = tuple(context.invocation_metadata() or ())
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        slots = asyncio.Semaphore(ingestor.settings.max_in_flight_per_stream)

        async def read_all() -> None:
            nonlocal authenticator, identity
            ordinal = 0
            async for raw in requests:
                await slots.acquire()  # bounded in-flight batches per stream
                ordinal += 1
                try:
                    if ingestor.authenticator is not authenticator:  # refreshed tokens
                        authenticator = ingestor.authenticator
                        identity = ingestor.authenticate(metadata)
                    ticket = ingestor.admit()
                    try:
                        # Records handed to Kafka here; no task per batch (see Ingestor.start).
                        pending = ingestor.start(ingestor.prepare(raw, identity))
                    except BaseException:
                        ingestor.release(ticket)
                        raise
                except (*_REFUSED_ERRORS, SinkError) as exc:
                    refused = _refusal(exc, retry_after_ms)
                    message = (
                        f"batch #{ordinal} of this stream: {refused.message} (the batches "
                        f"before it were acked; nothing after it was read)"
                    )
                    queue.put_nowait(_Refused(refused.code, message, refused.retry_after_ms))
                    return
                if pending.confirmed is None:
                    ingestor.release(ticket)  # nothing to confirm
                else:  # the place is freed when Kafka confirmed, even if the ack waits
                    pending.confirmed.add_done_callback(
                        functools.partial(_release, ingestor, ticket)
                    )
                queue.put_nowait(_InFlight(pending, ticket))

        def reader_done(task: asyncio.Task[None]) -> None:
            # Here, not in a `finally` of read_all: a task cancelled before its first step
            # never runs its body.
            self._readers.discard(task)
            if task.cancelled() and self._draining:
                queue.put_nowait(
                    _Refused(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, retry_after_ms)
                )
            queue.put_nowait(None)

        reader = asyncio.create_task(read_all())
        self._readers.add(reader)
        reader.add_done_callback(reader_done)
        if self._draining:  # drain() ran between _start_call and here
            reader.cancel()
        current: _InFlight | None = None  # taken from the queue, not acked yet
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, _Refused):
                    await self._abort(context, item)
                current = item
                try:
                    ack = await ingestor.finish(item.pending)
                except SinkError as exc:
                    await self._abort(context, _refusal(exc, retry_after_ms))
                current = None
                ingestor.acked(item.ticket)
                slots.release()
                yield ack.SerializeToString()
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # surface an error of the reading side
        finally:
            reader.cancel()
            if current is not None:  # failed, or the call ended while waiting for Kafka
                _abandon(ingestor, current)
            while not queue.empty():  # batches behind an abort stay unacked
                left = queue.get_nowait()
                if isinstance(left, _InFlight):
                    _abandon(ingestor, left)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # No request deserializer: the handlers get the raw bytes and parse them themselves;
        # no response serializer: they return serialized BatchAcks.
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "StreamBatches": grpc.stream_stream_rpc_method_handler(self.stream_batches),
                "SubmitBatch": grpc.unary_unary_rpc_method_handler(self.submit_batch),
                "SendLifecycleEvents": grpc.unary_unary_rpc_method_handler(
                    self.send_lifecycle_events
                ),
            },
        )


@dataclass(frozen=True, slots=True)
class ServerTls:
    """TLS for the collector (PEM bytes). With ``client_ca`` set, mutual TLS: a client must
    present a certificate signed by that CA, or the TLS handshake fails (no call is made).
    The bearer token is still required on top (the certificate says "a fleet machine", the
    token which agent and scope)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


# A collector keeps hundreds of thousands of long-lived objects (the state of every open
# agent stream). With CPython's default thresholds (700, 10, 10) a full collection walks all
# of them every few seconds: a pause of hundreds of milliseconds that shows up as ack latency
# (bench_collector_fleet.py, 20,000 streams: p99 211 ms with the defaults, 13 ms with these).
SERVING_GC_THRESHOLDS = (100_000, 50, 100)


def tune_gc_for_serving() -> None:
    """For a process whose job is serving: objects alive at start-up (modules, catalog,
    directory) are frozen out of collections, and collections run far less often. Called by
    :func:`serve`; a process that embeds a collector decides for itself."""
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


class CollectorServer:
    """``port = await server.start()`` ... ``await server.stop(grace_s)``.

    ``port=0`` binds a free port; ``start`` returns the bound one. ``tls`` serves TLS (mutual
    TLS when it carries a client CA) instead of plaintext.
    """

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTls | None = None,
    ) -> None:
        self._ingestor = ingestor
        self._tls = tls
        self._address = f"{host}:{port}"
        self._server: grpc.aio.Server | None = None
        self._handlers: IngestHandlers | None = None
        self.port: int | None = None

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("the collector server is already started")
        max_bytes = self._ingestor.settings.limits.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        handlers = IngestHandlers(self._ingestor)
        server.add_generic_rpc_handlers((handlers.generic_handler(),))
        if self._tls is None:
            port = server.add_insecure_port(self._address)
        else:
            port = server.add_secure_port(self._address, self._tls.credentials())
        if port == 0:
            raise RuntimeError(f"could not bind the collector to {self._address}")
        await server.start()
        self._server, self._handlers, self.port = server, handlers, port
        _log.info("collector listening on port %d (%s)", port, self._address)
        return port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop accepting calls and reading open streams; let the batches already read
        finish and be acked for up to ``grace_s``, then cancel what is left (it stays
        unacked and is resent by its agents). Open streams end ``UNAVAILABLE``."""
        server, self._server = self._server, None
        if self._handlers is not None:
            self._handlers.drain()
        if server is not None:
            await server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(
    ingestor: Ingestor,
    host: str,
    port: int,
    grace_s: float = 5.0,
    tls: ServerTls | None = None,
) -> None:
    """Run a collector until cancelled; then stop it gracefully."""
    tune_gc_for_serving()
    server = CollectorServer(ingestor, host=host, port=port, tls=tls)
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        await asyncio.shield(server.stop(grace_s))
