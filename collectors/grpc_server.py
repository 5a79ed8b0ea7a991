"""The gRPC adapter of the ingest service (the only server module importing ``grpc``).

Handlers are registered with identity (bytes) request deserializers, so that the collector
parses each batch itself and a malformed one is answered ``INVALID_ARGUMENT`` with a message
naming the problem, instead of grpc's generic deserialization failure.

``StreamBatches`` is pipelined: up to ``max_in_flight_per_stream`` batches of one stream are
validated and written to Kafka concurrently, and their acks go back in arrival order, each
only after its record was confirmed. A malformed batch aborts the stream with
``INVALID_ARGUMENT`` after the acks of the batches before it; a Kafka failure aborts it with
``UNAVAILABLE`` and acks nothing more. Batches not acked are the agent's to resend (with the
same ``(agent_id, seq)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from collectors.ingest import Ingestor
from collectors.ports import SinkError
from collectors.validation import MalformedBatchError
from meterline_proto.agent.v1 import agent_pb2

_log = logging.getLogger(__name__)

SERVICE_NAME = "meterline.agent.v1.IngestService"
RETRY_HINT = "retry the batch with the same (agent_id, seq)"

Context = grpc.aio.ServicerContext[bytes, bytes]


@dataclass(frozen=True, slots=True)
class _Malformed:
    ordinal: int  # 1-based position of the batch in its stream
    error: MalformedBatchError


_Item = asyncio.Task[agent_pb2.BatchAck] | _Malformed | None


def _retrieve(task: asyncio.Task[agent_pb2.BatchAck]) -> None:
    """Mark the outcome of an abandoned batch as seen (it is not acked either way)."""
    if not task.cancelled():
        task.exception()


class IngestHandlers:
    """The two RPCs over an :class:`Ingestor`, on raw bytes."""

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor

    async def submit_batch(self, raw: bytes, context: Context) -> bytes:
        try:
            ack = await self._ingestor.ingest(raw)
        except MalformedBatchError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SinkError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; {RETRY_HINT}")
        return ack.SerializeToString()

    async def stream_batches(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        ingestor = self._ingestor
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        slots = asyncio.Semaphore(ingestor.settings.max_in_flight_per_stream)

        async def read_all() -> None:
            ordinal = 0
            try:
                async for raw in requests:
                    await slots.acquire()  # bounded in-flight batches per stream
                    ordinal += 1
                    try:
                        prepared = ingestor.prepare(raw)
                    except MalformedBatchError as exc:
                        queue.put_nowait(_Malformed(ordinal, exc))
                        return  # read nothing after a malformed batch
                    queue.put_nowait(asyncio.create_task(ingestor.commit(prepared)))
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, _Malformed):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"batch #{item.ordinal} of this stream: {item.error} "
                        f"(the batches before it were acked; nothing after it was read)",
                    )
                try:
                    ack = await item
                except SinkError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; {RETRY_HINT}")
                slots.release()
                yield ack.SerializeToString()
            await reader  # surface an error of the reading side
        finally:
            reader.cancel()
            while not queue.empty():  # batches behind an abort stay unacked
                left = queue.get_nowait()
                if isinstance(left, asyncio.Task):
                    left.cancel()
                    left.add_done_callback(_retrieve)
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
            },
        )


class CollectorServer:
    """``port = await server.start()`` ... ``await server.stop(grace_s)``.

    ``port=0`` binds a free port; ``start`` returns the bound one.
    """

    def __init__(self, ingestor: Ingestor, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._ingestor = ingestor
        self._address = f"{host}:{port}"
        self._server: grpc.aio.Server | None = None
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
        server.add_generic_rpc_handlers((IngestHandlers(self._ingestor).generic_handler(),))
        port = server.add_insecure_port(self._address)
        if port == 0:
            raise RuntimeError(f"could not bind the collector to {self._address}")
        await server.start()
        self._server, self.port = server, port
        _log.info("collector listening on port %d (%s)", port, self._address)
        return port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop accepting; let running batches finish for up to ``grace_s``, then cancel them
        (cancelled batches stay unacked and are resent by their agents)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(ingestor: Ingestor, host: str, port: int, grace_s: float = 5.0) -> None:
    """Run a collector until cancelled; then stop it gracefully."""
    server = CollectorServer(ingestor, host=host, port=port)
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        await asyncio.shield(server.stop(grace_s))
