"""``meterline demo``: the whole pipeline on one machine, on the embedded defaults.

Starts a Kafka-protocol broker (noida-db) and a DuckDB store of its own, applies the demo
catalog, runs a collector and a rating worker, simulates the fleet's October 2026 (time
compressed, so the clock is frozen at the start of November), checks the store against the
simulator's ground truth, closes the period and prints the invoices.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

from collectors.directory import Directory
from collectors.grpc_agent import simulate_fleet
from collectors.grpc_server import CollectorServer
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from collectors.simulator import FleetSpec, GroundTruth, MeterSpec
from collectors.simulator import MeterKind as SimKind
from invoicer.close import close_period
from invoicer.documents import invoices_to_text
from meterline.embedded_broker import EmbeddedBroker, create_topics
from meterline.wiring import directory_for, frozen_clock, open_migrated_store
from rating.catalog import Catalog, Resource
from rating.catalog_file import read_catalog_file
from rating.worker import RatingWorker, WorkerConfig

DEMO_CATALOG = Path(str(files("meterline").joinpath("demo_catalog.yaml")))
PERIOD = (2026, 10)
# Every account's October, whatever its timezone, lies inside this UTC window.
WINDOW = (datetime(2026, 9, 30, 12, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC))
# The compressed month ends here: after every account's period end + grace.
DEMO_NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
INTERVAL_S = 300
USAGE_TOPIC = "usage.samples.v1"
DEADLETTER_TOPIC = "usage.deadletter.v1"
REJECTS_TOPIC = "usage.rejects.v1"

# What each kind of resource reports, and the value range of one 300 s sample.
METERS_BY_KIND: Mapping[str, tuple[MeterSpec, ...]] = {
    "server": (
        MeterSpec("net.egress.bytes", SimKind.COUNTER, 0, 2_000_000_000),
        MeterSpec("cpu.usage.millicpu_seconds", SimKind.COUNTER, 0, 600_000),
    ),
    "volume": (MeterSpec("storage.block.bytes", SimKind.GAUGE, 100 * 2**30, 120 * 2**30),),
}


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    seconds: float


def _life_in_window(resource: Resource) -> tuple[datetime, datetime] | None:
    """The resource's life clipped to WINDOW, aligned to the sampling interval."""
    lo, hi = WINDOW
    starts = [max(s.start, lo) for s in resource.spans]
    ends = [hi if s.end is None else min(s.end, hi) for s in resource.spans]
    if not starts:
        return None
    start, end = min(starts), max(ends)
    return (start, end) if start < end else None


def fleet_specs(catalog: Catalog) -> list[FleetSpec]:
    """One fleet per (kind, life): one agent per resource, sampling every INTERVAL_S."""
    groups: dict[tuple[str, datetime, datetime], list[str]] = defaultdict(list)
    for resource in sorted(catalog.resources.values(), key=lambda r: r.id):
        life = _life_in_window(resource)
        if life is not None and resource.kind in METERS_BY_KIND:
            groups[(resource.kind, *life)].append(resource.id)
    return [
        FleetSpec(
            resource_ids=tuple(ids),
            meters=METERS_BY_KIND[kind],
            start=start,
            end=end,
            hosts=len(ids),
            interval_s=INTERVAL_S,
            batch_size=1000,
            seed=index,
            agent_prefix=f"demo{index}",
        )
        for index, ((kind, start, end), ids) in enumerate(sorted(groups.items()))
    ]


def expected_usage(catalog: Catalog, truths: list[GroundTruth]) -> dict[tuple[str, str], int]:
    """(subscription, meter) -> the quantity the store must hold, from the ground truth."""
    expected: dict[tuple[str, str], int] = defaultdict(int)
    for truth in truths:
        for series in truth.series():
            subscription = catalog.resources[series["resource_id"]].subscription_id
            quantity = series["level_seconds"] if series["kind"] == "gauge" else series["sum"]
            expected[(subscription, series["meter"])] += quantity
    return dict(expected)


async def _ingest(
    bootstrap: str, directory: Directory, specs: list[FleetSpec], workdir: Path
) -> tuple[list[GroundTruth], GroundTruth]:
    """Run every fleet through a collector, then replay the first fleet as agents that lost
    their acks would: the same (agent_id, seq) again, which rating must not count twice."""
    sink = KafkaSink(bootstrap)
    ingestor = Ingestor(
        directory, sink, IngestSettings(collector_id="demo-collector"), frozen_clock(DEMO_NOW)
    )
    server = CollectorServer(ingestor, host="127.0.0.1", port=0)
    port = await server.start()
    target = f"127.0.0.1:{port}"
    try:
        truths = await asyncio.gather(
            *(
                simulate_fleet(
                    target,
                    spec,
                    ground_truth_path=workdir / f"ground_truth_{spec.agent_prefix}.json",
                )
                for spec in specs
            )
        )
        replayed = await simulate_fleet(target, specs[0])
        return list(truths), replayed
    finally:
        await server.stop(5.0)
        sink.close()


def run_demo(workdir: Path) -> int:
    stages: list[Stage] = []
    t0 = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    print(f"meterline demo: working in {workdir}")

    with EmbeddedBroker(workdir / "broker") as broker:
        topics = [USAGE_TOPIC, DEADLETTER_TOPIC, REJECTS_TOPIC]
        create_topics(broker.bootstrap, topics, partitions=4)
        store = open_migrated_store(f"duckdb://{(workdir / 'meterline.duckdb').resolve()}")
        try:
            applied = read_catalog_file(DEMO_CATALOG)
            version = store.save_catalog(applied.document, applied.digest, applied.source, DEMO_NOW)
            catalog = applied.catalog
            print(
                f"catalog v{version}: {len(catalog.accounts)} accounts, "
                f"{len(catalog.subscriptions)} subscriptions, {len(catalog.resources)} resources"
            )
            stages.append(Stage("start broker, store, catalog", time.monotonic() - t0))

            t1 = time.monotonic()
            specs = fleet_specs(catalog)
            config = WorkerConfig(bootstrap=broker.bootstrap, topic=USAGE_TOPIC)
            with RatingWorker(config, store, catalog, frozen_clock(DEMO_NOW)) as worker:
                stop = threading.Event()
                rating = threading.Thread(target=worker.run, args=(stop,), name="rating")
                rating.start()
                try:
                    truths, replayed = asyncio.run(
                        _ingest(broker.bootstrap, directory_for(catalog), specs, workdir)
                    )
                    sent = sum(t.samples_accepted for t in truths)
                    batches = sum(t.batches_acked for t in truths)
                    stages.append(
                        Stage(f"simulate + ingest {sent:,} samples", time.monotonic() - t1)
                    )
                    t2 = time.monotonic()
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and (
                        worker.stats.batches_new < batches
                        or worker.stats.batches_duplicate < replayed.batches_acked
                    ):
                        time.sleep(0.05)
                finally:
                    stop.set()
                    rating.join()
            stages.append(Stage("rating drains the topic", time.monotonic() - t2))
            print(
                f"rated {worker.stats.samples:,} samples in {worker.stats.batches_new:,} batches "
                f"({worker.stats.batches_duplicate} replayed batches recognised as duplicates, "
                f"{worker.stats.dead_lettered} dead-lettered)"
            )

            expected = expected_usage(catalog, truths)
            held = {
                (t.subscription_id, t.meter): t.quantity
                for t in store.usage_totals(WINDOW[0], WINDOW[1])
            }
            mismatches = sorted(
                k for k in expected.keys() | held.keys() if expected.get(k) != held.get(k)
            )
            if mismatches:
                print(f"GROUND TRUTH MISMATCH in {len(mismatches)} series: {mismatches[:5]}")
                return 1
            print(
                f"ground truth: the store holds exactly what the agents were told was accepted "
                f"({sent:,} samples, {len(expected)} subscription x meter series)"
            )

            t3 = time.monotonic()
            result = close_period(store, catalog, PERIOD[0], PERIOD[1], DEMO_NOW)
            stages.append(Stage("close 2026-10", time.monotonic() - t3))
            out = workdir / "invoices"
            out.mkdir()
            for stored in result.stored:
                (out / f"{stored.key.replace('/', '_')}.json").write_text(stored.document)
            print()
            print(invoices_to_text(result.invoices))
            print(f"invoice documents (JSON): {out}")
        finally:
            store.close()

    print()
    for stage in stages:
        print(f"  {stage.seconds:6.2f} s  {stage.name}")
    print(f"  {time.monotonic() - t0:6.2f} s  in all")
    return 0
