"""Ports of the collector: where accepted batches go, and where its metrics go."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class SinkError(Exception):
    """The sink did not confirm delivery: the batch must not be acked (the agent resends)."""


class BatchSink(Protocol):
    """Durable destination of accepted batches (Kafka in production: ``KafkaSink``)."""

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Return only once the record is durably stored; raise :class:`SinkError` if not."""
        ...


class IngestMetrics(Protocol):
    """What the ingest service reports (Prometheus in production: ``prometheus_metrics``).

    Called on the event loop, at most a few times per batch, never per sample.
    """

    def batch_received(self) -> None:
        """A batch arrived (before decoding; malformed ones included)."""
        ...

    def batch_malformed(self) -> None: ...

    def samples_judged(
        self, received: int, accepted: int, rejected_by_code: Mapping[str, int]
    ) -> None:
        """The samples of one well-formed, authorised batch, as validation judged them."""
        ...

    def auth_failure(self, reason: str) -> None: ...

    def in_flight(self, batches: int) -> None:
        """The process's batches admitted and not yet confirmed or refused."""
        ...

    def kafka_delivery(self, seconds: float) -> None:
        """Time from handing a record to the sink to its confirmation (successes only)."""
        ...

    def acked(self, seconds: float) -> None:
        """A batch was acked; ``seconds`` since it was admitted."""
        ...


class NoMetrics:
    """The null :class:`IngestMetrics` (tests, benchmarks, the embedded demo)."""

    def batch_received(self) -> None:
        pass

    def batch_malformed(self) -> None:
        pass

    def samples_judged(
        self, received: int, accepted: int, rejected_by_code: Mapping[str, int]
    ) -> None:
        pass

    def auth_failure(self, reason: str) -> None:
        pass

    def in_flight(self, batches: int) -> None:
        pass

    def kafka_delivery(self, seconds: float) -> None:
        pass

    def acked(self, seconds: float) -> None:
        pass
