"""Collector ingest budgets (figures printed; not a timed test).

Targets (issue 5, one core): decode + validate + build the Kafka record >= 10 M samples/s
(ENVIRONMENT.md: parse + np.array of columnar batches is ~14-17 M/s); the whole path over
loopback gRPC, acked after Kafka delivery, >= 2 M samples/s per collector core. The walking
skeleton measures and reports; it does not yet meet the second target (the agent and the
collector share this process here, and the embedded broker runs beside them).

Run: ``.venv/bin/python benchmarks/bench_collector_ingest.py [--e2e]``
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from collectors.directory import Directory, MeterRule
from collectors.grpc_agent import simulate_fleet
from collectors.grpc_server import CollectorServer
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from collectors.simulator import FleetSpec, MeterKind, MeterSpec, generate_batch
from meterline.embedded_broker import EmbeddedBroker, create_topics

END = datetime(2026, 11, 1, tzinfo=UTC)
METERS = (
    MeterSpec("net.egress.bytes", MeterKind.COUNTER, 0, 10**9),
    MeterSpec("cpu.usage.millicpu_seconds", MeterKind.COUNTER, 0, 300_000),
    MeterSpec("storage.block.bytes", MeterKind.GAUGE, 10**9, 10**12),
    MeterSpec("ipv4.count", MeterKind.PEAK, 1, 4),
)


def fleet(resources: int, hosts: int, days: int) -> FleetSpec:
    return FleetSpec(
        resource_ids=tuple(f"srv-{i}" for i in range(resources)),
        meters=METERS,
        start=END - timedelta(days=days),
        end=END,
        hosts=hosts,
        batch_size=1000,
        agent_prefix=f"bench-{time.time_ns()}",
    )


def directory(spec: FleetSpec, drop_every: int = 0) -> Directory:
    known = (
        spec.resource_ids[::1]
        if not drop_every
        else tuple(r for i, r in enumerate(spec.resource_ids) if i % drop_every)
    )
    return Directory({m.name: MeterRule() for m in spec.meters}, frozenset(known))


class NoSink:
    async def send(self, topic: str, key: bytes, value: bytes) -> None:  # noqa: ARG002
        raise RuntimeError("prepare only")


def bench_prepare() -> None:
    spec = fleet(resources=250, hosts=1, days=2)
    raws = [generate_batch(spec, 0, i).batch.SerializeToString() for i in range(100)]
    samples = 100 * 1000
    for label, known in (("all accepted", directory(spec)), ("2% rejected", directory(spec, 50))):
        ingestor = Ingestor(known, NoSink(), IngestSettings("bench"), clock=lambda: END)
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for raw in raws:
                ingestor.prepare(raw)
            best = min(best, time.process_time() - t0)
        print(f"prepare ({label}): {samples / best / 1e6:.2f} M samples/s per core")


async def _e2e(bootstrap: str) -> None:
    create_topics(bootstrap, ["usage.samples.v1"], partitions=4)
    spec = fleet(resources=400, hosts=8, days=7)
    sink = KafkaSink(bootstrap)
    server = CollectorServer(Ingestor(directory(spec), sink, IngestSettings("bench"), lambda: END))
    port = await server.start()
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        truth = await simulate_fleet(f"127.0.0.1:{port}", spec, concurrency=8, max_in_flight=8)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await server.stop(1.0)
        sink.close(10.0)
    n = truth.samples_accepted
    print(
        f"e2e (agent + collector in one process, acked after Kafka): {n} samples in "
        f"{wall:.2f} s = {n / wall / 1e6:.2f} M samples/s; "
        f"{cpu / (n / 1e6):.2f} CPU-s per million samples (both sides); "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--e2e", action="store_true", help="also run gRPC + Kafka end to end")
    args = parser.parse_args()
    bench_prepare()
    if args.e2e:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
            asyncio.run(_e2e(broker.bootstrap))


if __name__ == "__main__":
    main()
