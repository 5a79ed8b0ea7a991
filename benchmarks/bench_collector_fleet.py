"""Fleet budget: many concurrent agent streams on one collector process (figures printed; not
a timed test).

Target (issue 5): >= 20,000 concurrent agent streams on one collector process, each sending
a small batch every 10 s, with p99 ack latency <= 100 ms and bounded memory, on this 2-core
machine.

Set-up: the collector (CollectorServer + Ingestor + KafkaSink, authentication off) in a child
process pinned to CPU 0; the fleet in another child pinned to CPU 1 (with the embedded broker):
``--streams`` long-lived ``StreamBatches`` calls spread over ``--channels`` HTTP/2
connections (one connection per agent would need 2 x streams file descriptors; the server's
per-message work is the same). Streams open at an even pace over ``--ramp`` seconds, then
each sends (at a random phase) a batch of ``--samples`` samples every ``--period`` s and waits
for its ack. Latency = write to ack, measured by the agent, over the ``--seconds`` window
after the ramp.

Printed: streams open, batches acked, p50/p99/max ack latency, errors, the collector's CPU
(share of its core, and CPU-µs per batch) and its peak and final RSS.

Run: ``.venv/bin/python benchmarks/bench_collector_fleet.py [--streams 20000] [--bare]``
(opening streams faster than ~300/s, e.g. ``--ramp 20``, makes gRPC cancel some idle streams here,
even on a bare grpc.aio server; ``--profile FILE`` runs the collector under cProfile)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import resource
import tempfile
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path

from bench_collector_bulk import (
    COLLECTOR_CPU,
    LOAD_CPU,
    METERS,
    STREAM,
    TOPIC,
    collector_process,
    pin_broker,
    proc_sample,
    resource_ids,
)

from meterline.embedded_broker import EmbeddedBroker, create_topics

TARGET_STREAMS = 20_000
TARGET_P99_MS = 100.0


def bare_server_process(cpu: int, conn: Connection) -> None:
    """Baseline: a bare grpc.aio server that parses each batch and acks it at once (no
    validation, no Kafka), pinned to ``cpu``."""
    os.sched_setaffinity(0, {cpu})
    raise_fd_limit()
    asyncio.run(_bare_server(conn))


async def _bare_server(conn: Connection) -> None:
    import grpc

    from meterline_proto.agent.v1 import agent_pb2

    async def stream(requests: AsyncIterator[bytes], _context: object) -> AsyncIterator[bytes]:
        async for raw in requests:
            batch = agent_pb2.SampleBatch.FromString(raw)
            yield agent_pb2.BatchAck(
                agent_id=batch.agent_id, seq=batch.seq, accepted_count=len(batch.samples.value)
            ).SerializeToString()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "meterline.agent.v1.IngestService",
                {"StreamBatches": grpc.stream_stream_rpc_method_handler(stream)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    await server.stop(1.0)


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fleet_process(
    target: str,
    streams: int,
    channels: int,
    samples: int,
    period_s: float,
    ramp_s: float,
    seconds: float,
    conn: Connection,
) -> None:
    os.sched_setaffinity(0, {LOAD_CPU})
    raise_fd_limit()
    conn.send(
        asyncio.run(_fleet(target, streams, channels, samples, period_s, ramp_s, seconds, conn))
    )


async def _fleet(
    target: str,
    streams: int,
    channels: int,
    samples: int,
    period_s: float,
    ramp_s: float,
    seconds: float,
    conn: Connection,
) -> dict[str, object]:
    import grpc

    from meterline_proto.agent.v1 import agent_pb2

    loop = asyncio.get_running_loop()
    t_start = loop.time() + ramp_s + period_s  # after the ramp: every stream is open
    t_end = t_start + seconds
    rng = random.Random(5)
    latencies_ns: list[int] = []
    slices: dict[int, list[int]] = {}  # p99 per period-long slice of the window
    opened = [0]
    errors: list[str] = []
    prefix = f"fleet-{time.time_ns()}"
    meter_index = [i % len(METERS) for i in range(samples)]

    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    methods: list[grpc.aio.StreamStreamMultiCallable[bytes, agent_pb2.BatchAck]] = [
        c.stream_stream(STREAM, None, agent_pb2.BatchAck.FromString) for c in chans
    ]

    async def agent(i: int) -> None:
        await asyncio.sleep(i * ramp_s / streams)  # open at an even pace
        call = methods[i % channels]()
        opened[0] += 1
        agent_id = f"{prefix}-{i:06d}"
        resource_id = f"srv-{i:06d}"
        next_at = loop.time() + rng.uniform(0, period_s)  # a random phase
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        seq = 0
        try:
            while next_at < t_end:
                seq += 1
                now_s = int(time.time())
                batch = agent_pb2.SampleBatch(agent_id=agent_id, seq=seq)
                cols = batch.samples
                cols.resource_dict.append(resource_id)
                cols.meter_dict.extend(METERS)
                cols.resource_index.extend([0] * samples)
                cols.meter_index.extend(meter_index)
                cols.start_unix_s.extend([now_s - 10] * samples)
                cols.duration_s.extend([10] * samples)
                cols.value.extend(range(samples))
                raw = batch.SerializeToString()
                sent_at = loop.time()
                t0 = time.perf_counter_ns()
                await call.write(raw)
                ack = await call.read()
                elapsed = time.perf_counter_ns() - t0
                if ack is grpc.aio.EOF:
                    errors.append("stream ended")
                    return
                if t_start <= sent_at < t_end:
                    latencies_ns.append(elapsed)
                    slices.setdefault(int((sent_at - t_start) // period_s), []).append(elapsed)
                next_at += period_s
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            await call.done_writing()
        except asyncio.InvalidStateError:  # the call had ended while the agent was idle
            errors.append(
                f"{(await call.code()).name}: {await call.details()} "
                f"at t={loop.time() - t_start:+.1f} s (while idle)"
            )
        except grpc.aio.AioRpcError as exc:
            errors.append(
                f"{exc.code().name}: {exc.details()} at t={loop.time() - t_start:+.1f} s "
                f"(window [0, {seconds:g}) s) {(exc.debug_error_string() or '')[:200]}"
            )

    async def mark() -> None:
        await asyncio.sleep(max(0.0, t_start - loop.time()))
        conn.send(("start", opened[0]))
        await asyncio.sleep(max(0.0, t_end - loop.time()))
        conn.send(("end", opened[0]))

    try:
        await asyncio.gather(mark(), *(agent(i) for i in range(streams)))
    finally:
        await asyncio.gather(*(c.close() for c in chans))
    latencies_ns.sort()
    n = len(latencies_ns)
    per_slice = {
        k: sorted(v)[min(len(v) - 1, int(0.99 * len(v)))] / 1e6 for k, v in sorted(slices.items())
    }

    def pct(p: float) -> float:
        return latencies_ns[min(n - 1, int(p * n))] / 1e6 if n else float("nan")

    return {
        "acked": n,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies_ns[-1] / 1e6 if n else float("nan"),
        "errors": len(errors),
        "p99_ms_per_period": ", ".join(f"{v:.0f}" for v in per_slice.values()),
        "first_error": (errors[0] + " ... last: " + errors[-1]) if errors else "",
        "opened": opened[0],
        "fleet_cpu_s": time.process_time(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, default=TARGET_STREAMS)
    parser.add_argument("--channels", type=int, default=100, help="HTTP/2 connections")
    parser.add_argument("--samples", type=int, default=5, help="samples per batch")
    parser.add_argument("--period", type=float, default=10.0, help="seconds between batches")
    parser.add_argument("--ramp", type=float, default=60.0, help="seconds to open the streams")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument(
        "--bare", action="store_true", help="baseline: a bare grpc.aio server instead"
    )
    parser.add_argument("--profile", help="write the collector's cProfile stats to this file")
    args = parser.parse_args()
    raise_fd_limit()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
        pin_broker(broker, LOAD_CPU)
        create_topics(broker.bootstrap, [TOPIC], partitions=4)
        parent_c, child_c = ctx.Pipe()
        collector = (
            ctx.Process(target=bare_server_process, args=(COLLECTOR_CPU, child_c))
            if args.bare
            else ctx.Process(
                target=collector_process,
                args=(
                    broker.bootstrap,
                    TOPIC,
                    resource_ids(args.streams),
                    COLLECTOR_CPU,
                    child_c,
                    args.profile,
                ),
            )
        )
        collector.start()
        port = parent_c.recv()
        parent_f, child_f = ctx.Pipe()
        fleet = ctx.Process(
            target=fleet_process,
            args=(
                f"127.0.0.1:{port}",
                args.streams,
                min(args.channels, args.streams),
                args.samples,
                args.period,
                args.ramp,
                args.seconds,
                child_f,
            ),
        )
        fleet.start()
        assert collector.pid is not None
        _, opened_at_start = parent_f.recv()
        before = proc_sample(collector.pid)
        _, opened_at_end = parent_f.recv()
        after = proc_sample(collector.pid)
        result = parent_f.recv()
        fleet.join()
        parent_c.send("stop")
        collector.join()
    cpu = after.cpu_s - before.cpu_s
    acked = int(str(result["acked"]))
    p99 = float(str(result["p99_ms"]))
    verdict = "meets" if p99 <= TARGET_P99_MS and opened_at_start >= TARGET_STREAMS else "MISSES"
    print(
        f"fleet{' (BARE grpc.aio baseline)' if args.bare else ''}: "
        f"{opened_at_start:,} streams open ({opened_at_end:,} at the end) over "
        f"{min(args.channels, args.streams)} connections, a batch of {args.samples} samples "
        f"every {args.period:g} s each; {acked:,} acks in {args.seconds:g} s; ack latency "
        f"p50 {float(str(result['p50_ms'])):.1f} ms, p99 {p99:.1f} ms, "
        f"max {float(str(result['max_ms'])):.1f} ms ({verdict} 20,000 streams at p99 <= 100 ms); "
        f"errors {result['errors']} {result['first_error']}"
    )
    print(
        f"collector on 1 core: {cpu / args.seconds:.2f} core busy, "
        f"{cpu / max(acked, 1) * 1e6:.0f} CPU-µs per batch, "
        f"{cpu / max(acked * args.samples, 1) * 1e6:.0f} CPU-s per million samples; "
        f"RSS peak {after.rss_peak_kib / 1024:.0f} MiB, "
        f"at the end {after.rss_now_kib / 1024:.0f} MiB "
        f"(at window start {before.rss_now_kib / 1024:.0f} MiB); "
        f"fleet process CPU {float(str(result['fleet_cpu_s'])):.1f} s"
    )
    print(f"p99 ack latency per {args.period:g} s of the window, ms: {result['p99_ms_per_period']}")


if __name__ == "__main__":
    main()
