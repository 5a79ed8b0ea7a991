"""Bulk ingest budget: one collector process on one core (figures printed; not a timed test).

Target (issue 5): one collector process pinned to ONE core ingests >= 2,000,000 samples/s in
batches of 1,000 samples from a simulated agent over loopback gRPC, each batch acked only
after Kafka confirmed it (idempotent producer, acks=all).

Set-up: the collector (CollectorServer + Ingestor + KafkaSink, authentication off) runs in a
child process pinned to CPU 0 (``os.sched_setaffinity``; librdkafka's and gRPC's threads
inherit it); the load generator in another child pinned to CPU 1, with ``--agents`` streams
of ``--in-flight`` unacked batches each; the embedded broker (noida-db) is pinned to CPU 1
too, so that the collector has its core to itself. Batches are pre-serialized columns with
a per-batch header (agent_id, seq) prepended, so the generator spends little CPU.

Printed: samples/s acked, the collector's CPU-seconds per million samples (from
/proc/<pid>/stat over the measured window), and its peak RSS (VmHWM).

Run: ``.venv/bin/python benchmarks/bench_collector_bulk.py [--seconds 10] [--agents 4]``
(``--profile FILE``: the collector under cProfile; read with ``python -m pstats FILE``.)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from meterline.embedded_broker import EmbeddedBroker, create_topics

TARGET_SAMPLES_PER_S = 2_000_000
COLLECTOR_CPU = 0
LOAD_CPU = 1
STREAM = "/meterline.agent.v1.IngestService/StreamBatches"
TOPIC = "usage.samples.v1"
METERS = ("cpu.usage.millicpu_seconds", "net.egress.bytes", "storage.block.bytes", "ipv4.count")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def resource_ids(n: int) -> list[str]:
    return [f"srv-{i:06d}" for i in range(n)]


# -- the collector process (shared with bench_collector_fleet) ---------------------------------


def collector_process(
    bootstrap: str,
    topic: str,
    resources: list[str],
    cpu: int,
    conn: Connection,
    profile_path: str | None = None,
) -> None:
    """Run a collector pinned to ``cpu``; send its port, wait for "stop". With
    ``profile_path``, the event loop's thread runs under cProfile (stats dumped there)."""
    os.sched_setaffinity(0, {cpu})
    if profile_path is None:
        asyncio.run(_serve_collector(bootstrap, topic, resources, conn))
        return
    import cProfile

    with cProfile.Profile() as profile:
        asyncio.run(_serve_collector(bootstrap, topic, resources, conn))
    profile.dump_stats(profile_path)


async def _serve_collector(
    bootstrap: str, topic: str, resources: list[str], conn: Connection
) -> None:
    from collectors.directory import Directory, MeterRule
    from collectors.grpc_server import CollectorServer, tune_gc_for_serving
    from collectors.ingest import Ingestor, IngestSettings
    from collectors.kafka_sink import KafkaSink

    directory = Directory({m: MeterRule() for m in METERS}, frozenset(resources))
    sink = KafkaSink(bootstrap)
    settings = IngestSettings(
        collector_id="bench", topic=topic, max_in_flight_per_stream=64
    )  # authentication off (authenticator=None), as in the embedded demo
    ingestor = Ingestor(directory, sink, settings, lambda: datetime.now(UTC))
    server = CollectorServer(ingestor, port=0)
    tune_gc_for_serving()  # as `meterline collector serve` does (collectors.grpc_server.serve)
    port = await server.start()
    conn.send(port)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, conn.recv)  # "stop"
    await server.stop(1.0)
    sink.close(10.0)


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float
    rss_peak_kib: int
    rss_now_kib: int


def proc_sample(pid: int) -> ProcSample:
    """CPU seconds (user + system, all threads) and RSS of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return ProcSample(cpu_s, int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0]))


def pin_broker(broker: EmbeddedBroker, cpu: int) -> None:
    process = broker._process  # private: a benchmark pins the broker's process
    if process is not None:
        os.sched_setaffinity(process.pid, {cpu})


# -- the load generator (bulk) -----------------------------------------------------------------


def batch_body(resources: list[str], n: int, now_s: int) -> bytes:
    """A serialized SampleBatch holding only the columns (field 4): prepend a header."""
    from meterline_proto.agent.v1 import agent_pb2

    i = np.arange(n, dtype=np.int64)
    batch = agent_pb2.SampleBatch()
    cols = batch.samples
    cols.resource_dict.extend(resources[: max(1, n // len(METERS))])
    cols.meter_dict.extend(METERS)
    cols.resource_index.extend((i // len(METERS) % len(cols.resource_dict)).tolist())
    cols.meter_index.extend((i % len(METERS)).tolist())
    cols.start_unix_s.extend(((now_s - 7200) - (now_s - 7200) % 300 + 0 * i).tolist())
    cols.duration_s.extend(np.full(n, 300, dtype=np.int64).tolist())
    cols.value.extend((i * 7919 % 10**9).tolist())
    return batch.SerializeToString()


def bulk_load_process(
    target: str,
    resources: list[str],
    agents: int,
    in_flight: int,
    batch_size: int,
    warmup_s: float,
    seconds: float,
    conn: Connection,
) -> None:
    os.sched_setaffinity(0, {LOAD_CPU})
    conn.send(
        asyncio.run(
            _bulk_load(target, resources, agents, in_flight, batch_size, warmup_s, seconds, conn)
        )
    )


async def _bulk_load(
    target: str,
    resources: list[str],
    agents: int,
    in_flight: int,
    batch_size: int,
    warmup_s: float,
    seconds: float,
    conn: Connection,
) -> tuple[int, int, float]:
    import grpc

    from meterline_proto.agent.v1 import agent_pb2

    body = batch_body(resources, batch_size, int(time.time()))
    loop = asyncio.get_running_loop()
    t_start = loop.time() + warmup_s
    t_end = t_start + seconds
    counted = [0, 0]  # samples, batches acked inside the window
    prefix = f"bulk-{time.time_ns()}"

    async with grpc.aio.insecure_channel(target) as channel:
        method: grpc.aio.StreamStreamMultiCallable[bytes, agent_pb2.BatchAck] = (
            channel.stream_stream(STREAM, None, agent_pb2.BatchAck.FromString)
        )

        async def agent(a: int) -> None:
            call = method()
            window = asyncio.Semaphore(in_flight)
            agent_id = f"{prefix}-{a}"

            async def write() -> None:
                seq = 0
                while loop.time() < t_end:
                    await window.acquire()
                    seq += 1
                    head = agent_pb2.SampleBatch(agent_id=agent_id, seq=seq).SerializeToString()
                    await call.write(head + body)
                await call.done_writing()

            async def read() -> None:
                while (ack := await call.read()) is not grpc.aio.EOF:
                    assert isinstance(ack, agent_pb2.BatchAck)
                    if t_start <= loop.time() < t_end:
                        counted[0] += ack.accepted_count
                        counted[1] += 1
                    window.release()

            await asyncio.gather(write(), read())

        async def mark() -> None:
            await asyncio.sleep(max(0.0, t_start - loop.time()))
            conn.send("start")
            await asyncio.sleep(max(0.0, t_end - loop.time()))
            conn.send("end")

        await asyncio.gather(mark(), *(agent(a) for a in range(agents)))
    return counted[0], counted[1], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--agents", type=int, default=4, help="concurrent streams")
    parser.add_argument("--in-flight", type=int, default=16, help="unacked batches per stream")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--profile", help="write the collector's cProfile stats to this file")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    resources = resource_ids(250)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
        pin_broker(broker, LOAD_CPU)
        create_topics(broker.bootstrap, [TOPIC], partitions=4)
        parent_c, child_c = ctx.Pipe()
        collector = ctx.Process(
            target=collector_process,
            args=(broker.bootstrap, TOPIC, resources, COLLECTOR_CPU, child_c, args.profile),
        )
        collector.start()
        port = parent_c.recv()
        parent_l, child_l = ctx.Pipe()
        load = ctx.Process(
            target=bulk_load_process,
            args=(
                f"127.0.0.1:{port}",
                resources,
                args.agents,
                args.in_flight,
                args.batch_size,
                args.warmup,
                args.seconds,
                child_l,
            ),
        )
        load.start()
        assert collector.pid is not None
        assert parent_l.recv() == "start"
        before = proc_sample(collector.pid)
        assert parent_l.recv() == "end"
        after = proc_sample(collector.pid)
        samples, batches, seconds = parent_l.recv()
        load.join()
        parent_c.send("stop")
        collector.join()
    rate = samples / seconds
    cpu = after.cpu_s - before.cpu_s
    verdict = "meets" if rate >= TARGET_SAMPLES_PER_S else "MISSES"
    print(
        f"bulk: {samples:,} samples in {batches:,} batches of {args.batch_size} acked in "
        f"{seconds:.1f} s = {rate / 1e6:.2f} M samples/s ({verdict} the 2.00 M target); "
        f"collector on 1 core: {cpu / seconds:.2f} core busy, "
        f"{cpu / max(samples, 1) * 1e6:.2f} CPU-s per million samples, "
        f"peak RSS {after.rss_peak_kib / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
