"""Ports of the collector: where accepted batches go."""

from __future__ import annotations

from typing import Protocol


class SinkError(Exception):
    """The sink did not confirm delivery: the batch must not be acked (the agent resends)."""


class BatchSink(Protocol):
    """Durable destination of accepted batches (Kafka in production: ``KafkaSink``)."""

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Return only once the record is durably stored; raise :class:`SinkError` if not."""
        ...
