"""Exactly once under failure, against the simulator's ground truth (issue 3, must-have 3).

Given a simulated fleet's batches on a topic (every sample accepted, so the ground truth is
the fleet's whole output), when the rating pipeline suffers a failure mid-stream and then
recovers, usage_hourly equals the ground truth exactly (nothing lost, nothing doubled) and the
ledger holds every ``(agent_id, seq)`` once:

a. the worker process is killed (SIGKILL) after the store committed a poll and before Kafka
   committed it; b. killed before the store write, and killed inside the store transaction
   (rows written, not committed); c. two workers share the group, the second
   joins mid-stream and the first leaves (two rebalances); d. the broker is stopped and
   started again on the same data dir and port (gracefully: noida-db acks records before they
   are on disk, so a kill -9 may lose records acked within ~1 s, which no consumer can
   recover; see the report); e. the database refuses connections and drops every session
   while the worker runs: the worker retries with bounded backoff and loses nothing.

The crash tests run the worker in a subprocess (``python -m`` this module) and make it kill
itself at a named point through ``rating.worker.CRASH_ENV``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from psycopg import sql

from aggregation.pg_store import PgStore
from aggregation.ports import (
    LEDGER_SCHEMA,
    PARTIALS_SCHEMA,
    ConsumedOffset,
    Store,
    UsageTotal,
)
from collectors.simulator import (
    FleetSpec,
    GroundTruth,
    MeterKind,
    MeterSpec,
    generate_batch,
)
from meterline.embedded_broker import EmbeddedBroker, create_topics
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import usage_record_pb2
from rating.catalog import Catalog
from rating.catalog_file import parse_catalog
from rating.worker import CRASH_ENV, RatingWorker, WorkerConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START = datetime(2026, 10, 3, tzinfo=UTC)
NOW = datetime(2026, 11, 2, tzinfo=UTC)
PARTITIONS = 4
WAIT_S = 60.0

METERS = (
    MeterSpec("net.egress.bytes", MeterKind.COUNTER, 0, 10**12),
    MeterSpec("storage.block.bytes", MeterKind.GAUGE, 10**9, 10**12),
    MeterSpec("ipv4.count", MeterKind.PEAK, 1, 8),
)
SPEC = FleetSpec(
    resource_ids=tuple(f"r-{i:02d}" for i in range(24)),
    meters=METERS,
    start=START,
    end=START + timedelta(hours=5),
    hosts=6,
    interval_s=300,
    batch_size=40,
    seed=3,
    agent_prefix="eo",
)  # 6 agents x 18 batches of 40 samples = 108 batches, 4,320 samples


def _catalog(spec: FleetSpec) -> Catalog:
    """One subscription per resource, so per-resource truth is per-subscription truth."""
    return parse_catalog(
        {
            "meters": [
                {"name": m.name, "kind": str(m.kind), "base_unit": "unit",
                 "display_unit": "unit", "base_per_display": "1"}
                for m in spec.meters
            ],
            "plans": [{"id": "p", "name": "P"}],
            "accounts": [{"id": "a", "name": "A", "currency": "EUR", "timezone": "UTC"}],
            "subscriptions": [
                {"id": f"sub-{r}", "account": "a", "plan": "p", "start": "2026-10-01T00:00:00Z"}
                for r in spec.resource_ids
            ],
            "resources": [
                {"id": r, "subscription": f"sub-{r}", "kind": "server"}
                for r in spec.resource_ids
            ],
        },
        "exactly-once test",
    )  # fmt: skip


CATALOG = _catalog(SPEC)


# -- the fleet, its records and its ground truth ------------------------------------------


def fleet_records(spec: FleetSpec) -> tuple[list[tuple[bytes, bytes]], GroundTruth]:
    """Every batch of the fleet as the collector would write it (all samples accepted),
    interleaved across agents, and the ground truth of those samples."""
    truth = GroundTruth(spec)
    records: list[tuple[bytes, bytes]] = []
    per_host = max(spec.batches_of_host(h) for h in range(spec.hosts))
    for index in range(per_host):  # a loop per batch, not per sample
        for host in range(spec.hosts):
            if index >= spec.batches_of_host(host):
                continue
            generated = generate_batch(spec, host, index)
            batch = generated.batch
            record = usage_record_pb2.UsageBatchRecord(
                agent_id=batch.agent_id,
                seq=batch.seq,
                received_at_unix_ms=batch.sent_at_unix_ms,
                collector_id="eo-test",
            )
            record.samples.CopyFrom(batch.samples)
            records.append((batch.agent_id.encode(), record.SerializeToString()))
            truth.record_ack(
                generated,
                agent_pb2.BatchAck(
                    agent_id=batch.agent_id, seq=batch.seq, accepted_count=len(generated.value)
                ),
            )
            truth.batches_sent += 1
    return records, truth


RECORDS, TRUTH = fleet_records(SPEC)


def expected_totals(truth: GroundTruth) -> list[UsageTotal]:
    """What usage_totals must say: counter = sum, gauge = level x seconds, peak = 0 (billed
    by its max); max and count as the fleet sent them."""
    out: list[UsageTotal] = []
    for s in truth.series():
        quantity = {"counter": s["sum"], "gauge": s.get("level_seconds", 0), "peak": 0}
        out.append(
            UsageTotal(f"sub-{s['resource_id']}", s["meter"], quantity[s["kind"]], s["max"],
                       s["count"])
        )  # fmt: skip
    return sorted(out, key=lambda t: (t.subscription_id, t.meter))


def expected_counter_hours(truth: GroundTruth) -> dict[tuple[str, str, datetime], int]:
    return {
        (f"sub-{s['resource_id']}", s["meter"], datetime.fromisoformat(hour)): total
        for s in truth.series()
        if s["kind"] == "counter"
        for hour, total in s["hourly_sums"].items()
    }


def assert_exactly_the_truth(store: Store, pg_url: str) -> None:
    assert store.usage_totals(START, NOW) == expected_totals(TRUTH)
    hourly = store.usage_hourly(START, NOW).filter(pl.col("meter") == "net.egress.bytes")
    counter_hours = {(sub, meter, hour): int(q) for sub, meter, hour, q, _, _ in hourly.rows()}
    assert counter_hours == expected_counter_hours(TRUTH)
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (agent_id, seq)), sum(sample_count) FROM batch_ledger"
        ).fetchone()
    assert row == (TRUTH.batches_sent, TRUTH.batches_sent, TRUTH.samples_accepted)


# -- Kafka helpers ------------------------------------------------------------------------------


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    errors: list[object] = []

    def on_delivery(error: object, _message: object) -> None:
        if error is not None:
            errors.append(error)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert errors == []


def kafka_committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = consumer.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in parts if tp.offset >= 0}


def config(
    bootstrap: str, topic: str, group: str, instance: str = "", **overrides: float
) -> WorkerConfig:
    """``instance``: a static group member id (``group.instance.id``), which a restarted
    worker takes over at once. noida-db never evicts a member that died without leaving
    (its session does not expire), so a replacement joining as a new dynamic member would
    wait forever for the dead leader's assignment."""
    settings: dict[str, float] = {"max_records_per_poll": 4, "store_backoff_s": 0.05}
    settings.update(overrides)
    consumer: dict[str, str | int] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
    if instance:
        consumer["group.instance.id"] = instance
    return WorkerConfig(
        bootstrap=bootstrap,
        topic=topic,
        deadletter_topic=f"{topic}.dead",
        group_id=group,
        max_records_per_poll=int(settings["max_records_per_poll"]),
        store_backoff_s=settings["store_backoff_s"],
        store_attempts=int(settings.get("store_attempts", 5)),
        store_backoff_max_s=settings.get("store_backoff_max_s", 5.0),
        consumer_config=consumer,
    )


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def rate_until_idle(cfg: WorkerConfig, pg_url: str) -> int:
    """A fresh worker (its own store connection) until idle; the records it consumed."""
    store = PgStore(pg_url)
    try:
        with RatingWorker(cfg, store, CATALOG, lambda: NOW) as worker:
            return worker.run_until_idle(idle_s=1.5, max_seconds=WAIT_S).records
    finally:
        store.close()


class WorkerThread:
    """A worker running ``run(stop)`` in a thread; ``stop()`` re-raises what it raised."""

    def __init__(self, cfg: WorkerConfig, pg_url: str) -> None:
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._store = PgStore(pg_url)
        self._worker = RatingWorker(cfg, self._store, CATALOG, lambda: NOW)
        self._thread = threading.Thread(target=self._run, name="rating-worker")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._worker.run(self._stop)
        except Exception as exc:  # noqa: BLE001 (handed to the test thread by stop())
            self._error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self._worker.close()
        self._store.close()
        if self._error is not None:
            raise self._error


# -- a, b: kill -9 of the worker process ---------------------------------------------------------


def start_worker_process(
    cfg: WorkerConfig, pg_url: str, crash_at: str, log: Path
) -> subprocess.Popen[bytes]:
    """A worker in a subprocess (killing itself at ``crash_at``, unless empty)."""
    env = {**os.environ, CRASH_ENV: crash_at}
    command = [
        sys.executable, "-m", "tests.integration.test_exactly_once_failures",
        cfg.bootstrap, cfg.topic, cfg.group_id, pg_url, str(cfg.max_records_per_poll),
        str(cfg.consumer_config.get("group.instance.id", "")),
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def run_worker_process(cfg: WorkerConfig, pg_url: str, crash_at: str, log: Path) -> int:
    """Run a worker in a subprocess that kills itself at ``crash_at``; its return code."""
    process = start_worker_process(cfg, pg_url, crash_at, log)
    try:
        return process.wait(WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def usage_topic(kafka_bootstrap: str) -> str:
    name = f"eo.usage.{time.time_ns()}"
    create_topics(kafka_bootstrap, [name, f"{name}.dead"], partitions=PARTITIONS)
    produce(kafka_bootstrap, name, RECORDS)
    return name


def test_kill_after_the_store_commit_before_the_kafka_commit(
    kafka_bootstrap: str, usage_topic: str, pg_url: str, pg_store: PgStore, tmp_path: Path
) -> None:
    cfg = config(kafka_bootstrap, usage_topic, f"g-{usage_topic}", "rating-1")
    code = run_worker_process(cfg, pg_url, "after_store_write:3", tmp_path / "worker.log")

    assert code == -9, (tmp_path / "worker.log").read_text()
    # The crash hit the window: the third poll is in the store, not in Kafka.
    in_store = pg_store.committed_offsets(cfg.group_id, usage_topic)
    in_kafka = kafka_committed(kafka_bootstrap, cfg.group_id, usage_topic)
    assert sum(in_store.values()) > sum(in_kafka.values())
    counted = pg_store.ledger_count()
    assert 0 < counted < TRUTH.batches_sent

    consumed = rate_until_idle(cfg, pg_url)

    # The new worker resumed from the store's offsets: it read only what was not counted.
    assert consumed == len(RECORDS) - sum(in_store.values())
    assert_exactly_the_truth(pg_store, pg_url)


def test_kill_before_the_store_write(
    kafka_bootstrap: str, usage_topic: str, pg_url: str, pg_store: PgStore, tmp_path: Path
) -> None:
    cfg = config(kafka_bootstrap, usage_topic, f"g-{usage_topic}", "rating-1")
    code = run_worker_process(cfg, pg_url, "before_store_write:3", tmp_path / "worker.log")

    assert code == -9, (tmp_path / "worker.log").read_text()
    # Two polls counted and committed everywhere; the third was rated but never written.
    in_store = pg_store.committed_offsets(cfg.group_id, usage_topic)
    assert kafka_committed(kafka_bootstrap, cfg.group_id, usage_topic) == in_store
    assert 0 < pg_store.ledger_count() < TRUTH.batches_sent

    consumed = rate_until_idle(cfg, pg_url)

    assert consumed == len(RECORDS) - sum(in_store.values())
    assert_exactly_the_truth(pg_store, pg_url)
    # A group that replays the whole topic changes nothing: the ledger absorbs it.
    replay = config(kafka_bootstrap, usage_topic, f"replay-{usage_topic}")
    assert rate_until_idle(replay, pg_url) == len(RECORDS)
    assert_exactly_the_truth(pg_store, pg_url)


def test_kill_inside_the_store_transaction(
    kafka_bootstrap: str, usage_topic: str, pg_url: str, pg_store: PgStore, tmp_path: Path
) -> None:
    """The worker dies with its transaction open: ledger and hourly rows written, not
    committed (it waits on a lock the test holds on its offset rows)."""
    cfg = config(kafka_bootstrap, usage_topic, f"g-{usage_topic}", "rating-1")
    empty_ledger = pl.DataFrame(schema=LEDGER_SCHEMA)
    empty_partials = pl.DataFrame(schema=PARTIALS_SCHEMA)
    start_at_zero = [ConsumedOffset(cfg.group_id, usage_topic, p, 0) for p in range(PARTITIONS)]
    pg_store.write_rated(empty_ledger, empty_partials, start_at_zero, NOW)

    with (
        psycopg.connect(pg_url) as blocker,
        psycopg.connect(pg_url, autocommit=True) as monitor,
    ):
        blocker.execute(
            "SELECT * FROM consumer_offsets WHERE group_id = %s FOR UPDATE", (cfg.group_id,)
        )
        process = start_worker_process(cfg, pg_url, "", tmp_path / "worker.log")
        try:
            wait_for(
                "the worker's transaction to wait on the offsets lock",
                lambda: bool(
                    monitor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock' "
                        "AND backend_xid IS NOT NULL"  # it has written rows
                    ).fetchone()
                    == (1,)
                ),
            )
        finally:
            process.kill()  # SIGKILL, with the write in flight
            process.wait(WAIT_S)
        blocker.rollback()

    assert process.returncode == -9
    assert pg_store.ledger_count() == 0  # nothing of the open transaction was kept
    assert pg_store.committed_offsets(cfg.group_id, usage_topic) == dict.fromkeys(
        range(PARTITIONS), 0
    )
    assert rate_until_idle(cfg, pg_url) == len(RECORDS)
    assert_exactly_the_truth(pg_store, pg_url)


# -- c: two workers, two rebalances ----------------------------------------------------------------


def test_a_second_worker_joins_and_the_first_leaves_mid_stream(
    kafka_bootstrap: str, usage_topic: str, pg_url: str, pg_store: PgStore
) -> None:
    cfg = config(kafka_bootstrap, usage_topic, f"g-{usage_topic}", max_records_per_poll=1)
    store_a, store_b = PgStore(pg_url), PgStore(pg_url)
    worker_a = RatingWorker(cfg, store_a, CATALOG, lambda: NOW)
    worker_b: RatingWorker | None = None
    try:
        # Worker A alone until about a quarter is counted.
        deadline = time.monotonic() + WAIT_S
        while pg_store.ledger_count() < TRUTH.batches_sent // 4:
            assert time.monotonic() < deadline, "worker A made no progress"
            worker_a.poll_once(0.2)
        assert worker_a._consumer.assignment == tuple(range(PARTITIONS))

        # Worker B joins: both keep polling (one thread, in turns) until B has rated some.
        worker_b = RatingWorker(cfg, store_b, CATALOG, lambda: NOW)
        while worker_b.stats.records == 0:
            assert time.monotonic() < deadline, "worker B never got records"
            worker_a.poll_once(0.2)
            worker_b.poll_once(0.2)
        assert worker_a.stats.records > 0
        assert pg_store.ledger_count() < TRUTH.batches_sent, "no rebalance mid-stream"

        # Worker A leaves the group; B takes over every partition and finishes.
        worker_a.close()
        while pg_store.ledger_count() < TRUTH.batches_sent:
            assert time.monotonic() < deadline, "worker B did not finish"
            worker_b.poll_once(0.2)
        assert worker_b._consumer.assignment == tuple(range(PARTITIONS))
        stats_b = worker_b.run_until_idle(idle_s=1.0, max_seconds=WAIT_S)
    finally:
        worker_a.close()
        if worker_b is not None:
            worker_b.close()
        store_a.close()
        store_b.close()

    # Records both handled around a rebalance were counted once; none were skipped.
    assert worker_a.stats.batches_new + stats_b.batches_new == TRUTH.batches_sent
    assert_exactly_the_truth(pg_store, pg_url)


# -- d: broker restart -----------------------------------------------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_broker_restart_mid_stream(
    own_broker: EmbeddedBroker, pg_url: str, pg_store: PgStore
) -> None:
    bootstrap = own_broker.bootstrap
    usage = "eo.usage.restart"
    create_topics(bootstrap, [usage, f"{usage}.dead"], partitions=PARTITIONS)
    half = len(RECORDS) // 2
    produce(bootstrap, usage, RECORDS[:half])
    worker = WorkerThread(config(bootstrap, usage, f"g-{usage}", max_records_per_poll=2), pg_url)
    try:
        wait_for("the first records counted", lambda: pg_store.ledger_count() > 0)
        # Graceful stop (SIGTERM): noida-db confirms records before they are on disk.
        own_broker.stop()
        time.sleep(1.0)
        own_broker.start()  # same data dir, same port
        produce(bootstrap, usage, RECORDS[half:])
        wait_for(
            "every batch counted",
            lambda: pg_store.ledger_count() >= TRUTH.batches_sent or not worker.alive,
        )
    finally:
        worker.stop()
    assert_exactly_the_truth(pg_store, pg_url)


# -- e: database outage ----------------------------------------------------------------------


def _database(pg_url: str) -> str:
    return urlsplit(pg_url).path.lstrip("/")


def _allow_connections(pg_server_url: str, database: str, allow: bool) -> None:
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.Literal(allow)
            )
        )
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )


def counted_through_outage(store: PgStore) -> int:
    """ledger_count(), or -1 when the call met the dropped session (the next call opens a
    new one)."""
    try:
        return store.ledger_count()
    except psycopg.OperationalError:
        return -1


def test_database_outage_mid_stream(
    kafka_bootstrap: str,
    topic: Callable[..., str],
    pg_server_url: str,
    pg_url: str,
    pg_store: PgStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = topic("eo.usage", partitions=PARTITIONS)
    half = len(RECORDS) // 2
    produce(kafka_bootstrap, usage, RECORDS[:half])
    cfg = config(
        kafka_bootstrap, usage, f"g-{usage}",
        store_attempts=12, store_backoff_s=0.1, store_backoff_max_s=1.0,
    )  # fmt: skip
    database = _database(pg_url)
    caplog.set_level(logging.WARNING, logger="rating.worker")
    worker = WorkerThread(cfg, pg_url)
    try:
        wait_for("the first half counted", lambda: pg_store.ledger_count() == half)
        # Outage: the database refuses new sessions and every open session is dropped.
        _allow_connections(pg_server_url, database, allow=False)
        try:
            produce(kafka_bootstrap, usage, RECORDS[half:])
            wait_for(
                "the worker to meet the outage",
                lambda: any("store.write_rated failed" in r.message for r in caplog.records),
            )
        finally:
            _allow_connections(pg_server_url, database, allow=True)
        wait_for(
            "every batch counted",
            lambda: counted_through_outage(pg_store) >= TRUTH.batches_sent or not worker.alive,
        )
    finally:
        worker.stop()  # re-raises if the worker gave up
    assert_exactly_the_truth(pg_store, pg_url)


# -- the worker subprocess of the crash tests --------------------------------------------------


def _main(argv: list[str]) -> None:
    bootstrap, usage, group, pg_url, per_poll, instance = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config(bootstrap, usage, group, instance, max_records_per_poll=int(per_poll))
    rate_until_idle(cfg, pg_url)


if __name__ == "__main__":
    _main(sys.argv[1:])
