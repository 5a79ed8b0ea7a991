"""The collector's metrics on Prometheus (the only module importing ``prometheus_client``).

Each :class:`PrometheusMetrics` owns its own ``CollectorRegistry`` (two collectors in one
process, as in tests, never collide) and can serve it on ``/metrics`` over HTTP.

Names (all prefixed ``meterline_collector_``):

====================================  =========  =========================================
``batches_received_total``            counter    batches that arrived (malformed included)
``batches_malformed_total``           counter    batches refused INVALID_ARGUMENT
``samples_received_total``            counter    samples of well-formed, authorised batches
``samples_accepted_total``            counter    ... judged valid (acked once Kafka confirms)
``samples_rejected_total{code}``      counter    ... rejected, by RejectCode name
``auth_failures_total{reason}``       counter    missing / malformed / unknown token
``in_flight_batches``                 gauge      admitted, not yet confirmed or refused
``kafka_delivery_seconds``            histogram  one record: produce to broker confirmation
``ack_latency_seconds``               histogram  one batch: admitted to ack handed to gRPC
====================================  =========  =========================================
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from collectors.auth import REASONS

NAMESPACE = "meterline_collector"
# Seconds. Kafka with acks=all on loopback confirms in ~1-20 ms; a broker outage shows up in
# the top buckets (the producer's message timeout is 30 s by default).
KAFKA_DELIVERY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Ack latency includes waiting behind earlier batches of the same stream; the fleet target
# is p99 <= 100 ms, so the buckets are dense around it.
ACK_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint: ``port`` bound, ``stop()`` to close it."""

    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class PrometheusMetrics:
    """An ``IngestMetrics`` on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self._batches_received = Counter(
            "batches_received", "Batches that arrived", namespace=ns, registry=r
        )
        self._batches_malformed = Counter(
            "batches_malformed", "Batches refused as malformed", namespace=ns, registry=r
        )
        self._samples_received = Counter(
            "samples_received", "Samples of well-formed batches", namespace=ns, registry=r
        )
        self._samples_accepted = Counter(
            "samples_accepted", "Samples judged valid", namespace=ns, registry=r
        )
        self._samples_rejected = Counter(
            "samples_rejected", "Samples rejected, by code", ["code"], namespace=ns, registry=r
        )
        self._auth_failures = Counter(
            "auth_failures", "Calls refused UNAUTHENTICATED", ["reason"], namespace=ns, registry=r
        )
        for reason in REASONS:  # export zeros, so that rate() works from the start
            self._auth_failures.labels(reason=reason)
        self._in_flight = Gauge(
            "in_flight_batches", "Batches admitted, not yet confirmed", namespace=ns, registry=r
        )
        self._kafka_delivery = Histogram(
            "kafka_delivery_seconds",
            "Produce to broker confirmation, per record",
            namespace=ns,
            registry=r,
            buckets=KAFKA_DELIVERY_BUCKETS_S,
        )
        self._ack_latency = Histogram(
            "ack_latency_seconds",
            "Batch admitted to ack sent",
            namespace=ns,
            registry=r,
            buckets=ACK_LATENCY_BUCKETS_S,
        )

    def batch_received(self) -> None:
        self._batches_received.inc()

    def batch_malformed(self) -> None:
        self._batches_malformed.inc()

    def samples_judged(
        self, received: int, accepted: int, rejected_by_code: Mapping[str, int]
    ) -> None:
        self._samples_received.inc(received)
        self._samples_accepted.inc(accepted)
        for code, count in rejected_by_code.items():  # per distinct code
            self._samples_rejected.labels(code=code).inc(count)

    def auth_failure(self, reason: str) -> None:
        self._auth_failures.labels(reason=reason).inc()

    def in_flight(self, batches: int) -> None:
        self._in_flight.set(batches)

    def kafka_delivery(self, seconds: float) -> None:
        self._kafka_delivery.observe(seconds)

    def acked(self, seconds: float) -> None:
        self._ack_latency.observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread."""
        httpd, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(int(httpd.server_port), httpd, thread)
