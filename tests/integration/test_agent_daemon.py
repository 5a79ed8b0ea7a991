"""The agent daemon against a real collector and a real Kafka-protocol broker, reading the real
/proc of this machine: network cut and agent crash, nothing lost, nothing invented.

Each test runs its own event loop: a collector (CollectorServer + Ingestor + KafkaSink) on a
fixed loopback port so that it can be stopped and started again at the same address, and
the daemon with a 1 s interval and a short backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from collectors.agent_daemon import AgentDaemon, DaemonSettings, read_token_file
from collectors.auth import AgentCredential, Authenticator, hash_token, new_token
from collectors.directory import Directory, MeterRule
from collectors.grpc_server import CollectorServer
from collectors.host_usage import METERS, HostReader
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from collectors.spool import Spool
from meterline.embedded_broker import free_port
from meterline_proto.agent.v1 import agent_pb2
from tests.fixtures.kafka import TopicFactory
from tests.integration.test_collector_kafka import read_topic

pytestmark = pytest.mark.integration

RESOURCE = "srv-agent-it"
DIRECTORY = Directory(meters={m: MeterRule() for m in METERS}, resource_ids=frozenset({RESOURCE}))
WAIT_S = 60.0  # upper bound of every wait below (they normally take a second or two)


def utc_now() -> datetime:
    return datetime.now(UTC)


@contextlib.asynccontextmanager
async def collector(
    bootstrap: str, topic: str, port: int, authenticator: Authenticator | None = None
) -> AsyncIterator[CollectorServer]:
    sink = KafkaSink(bootstrap, message_timeout_ms=10_000)
    ingestor = Ingestor(
        DIRECTORY,
        sink,
        IngestSettings(collector_id="it-agent-collector", topic=topic),
        utc_now,
        authenticator=authenticator,
    )
    server = CollectorServer(ingestor, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(None)  # an abrupt stop: in-flight batches stay unacked
        sink.close(5.0)


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


def daemon_settings(port: int, agent_id: str, token: str | None = None) -> DaemonSettings:
    return DaemonSettings(
        token=token,
        target=f"127.0.0.1:{port}",
        agent_id=agent_id,
        resource_id=RESOURCE,
        interval_s=1,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
    )


def copies_by_seq(
    bootstrap: str, topic: str, agent_id: str, spooled: dict[int, bytes]
) -> Counter[int]:
    """Copies of each seq in the topic; every copy must be the spooled batch's samples."""
    copies: Counter[int] = Counter()
    for key, record in read_topic(bootstrap, topic):
        assert key == agent_id.encode()
        assert record.agent_id == agent_id
        assert record.seq in spooled, f"seq {record.seq} was never spooled"
        sent = agent_pb2.SampleBatch.FromString(spooled[record.seq])
        assert record.samples == sent.samples  # every sample accepted, byte for byte
        copies[record.seq] += 1
    return copies


def test_collector_outage_every_spooled_batch_arrives_none_lost_none_invented(
    kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path
) -> None:
    name = topic("usage")
    port = free_port()
    agent_id = "agent-cut"
    spooled: dict[int, bytes] = {}
    acked: list[int] = []

    async def scenario() -> tuple[AgentDaemon, range]:
        daemon = AgentDaemon(
            daemon_settings(port, agent_id),
            Spool(tmp_path / "spool", agent_id),
            HostReader(),
            utc_now,
            on_ack=lambda ack: acked.append(ack.seq),
            on_spooled=spooled.__setitem__,
        )
        running = asyncio.create_task(daemon.run())
        async with collector(kafka_bootstrap, name, port):
            await until(lambda: len(acked) >= 3, "three batches acked")
            # the cut: whatever is unacked now (or spooled during the stop) may be resent
            cut_from = min(daemon.spool.pending(), default=daemon.spool.next_seq)
        cut = range(cut_from, daemon.spool.next_seq)
        down_from = daemon.spool.next_seq
        await until(
            lambda: daemon.spool.next_seq >= down_from + 3 and daemon.stats.reconnects >= 2,
            "three batches spooled while the collector is down, and retries",
        )
        assert len(daemon.spool) >= 3  # kept, not dropped
        async with collector(kafka_bootstrap, name, port):
            target = daemon.spool.next_seq + 2
            await until(
                lambda: daemon.spool.next_seq >= target and len(daemon.spool) == 0,
                "the backlog and two fresh batches acked",
            )
            daemon.stop()
            await running
        return daemon, cut

    daemon, cut = asyncio.run(scenario())
    assert daemon.stats.samples_rejected == 0
    assert len(daemon.spool) == 0
    copies = copies_by_seq(kafka_bootstrap, name, agent_id, spooled)
    assert sorted(copies) == sorted(spooled) == list(range(1, max(spooled) + 1))  # none lost
    assert sorted(acked) == sorted(spooled)
    # exactly once, except a batch in flight at the cut: written, its ack lost, resent (rating
    # deduplicates it by (agent_id, seq))
    assert all(n == 1 for seq, n in copies.items() if seq not in cut), copies
    assert all(n <= 2 for n in copies.values()), copies
    daemon.spool.close()


def test_agent_crash_with_a_non_empty_spool_resends_with_the_original_seqs(
    kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path
) -> None:
    name = topic("usage")
    port = free_port()  # nothing listens yet: the collector is down
    agent_id = "agent-crash"
    spool_dir = tmp_path / "spool"
    spooled: dict[int, bytes] = {}

    async def before_crash() -> None:
        daemon = AgentDaemon(
            daemon_settings(port, agent_id),
            Spool(spool_dir, agent_id),
            HostReader(),
            utc_now,
            on_spooled=spooled.__setitem__,
        )
        running = asyncio.create_task(daemon.run())
        await until(lambda: len(daemon.spool) >= 3, "three batches spooled")
        running.cancel()  # the crash: no graceful stop
        with contextlib.suppress(asyncio.CancelledError):
            await running

    asyncio.run(before_crash())
    gc.collect()  # the crashed daemon and its spool are gone (their lock with them)
    before = dict(spooled)
    assert len(before) >= 3

    async def after_restart() -> AgentDaemon:
        spool = Spool(spool_dir, agent_id)
        assert spool.pending() == sorted(before)  # the same seqs, still on disk
        assert all(spool.read(seq) == raw for seq, raw in before.items())
        daemon = AgentDaemon(
            daemon_settings(port, agent_id),
            spool,
            HostReader(),
            utc_now,
            on_spooled=spooled.__setitem__,
        )
        async with collector(kafka_bootstrap, name, port):
            running = asyncio.create_task(daemon.run())
            await until(
                lambda: spool.next_seq > max(before) + 2 and len(spool) == 0,
                "the old spool and two new batches acked",
            )
            daemon.stop()
            await running
        return daemon

    daemon = asyncio.run(after_restart())
    copies = copies_by_seq(kafka_bootstrap, name, agent_id, spooled)
    assert set(before) <= set(copies)  # every batch of the crashed agent, original seq
    assert sorted(copies) == sorted(spooled)
    assert min(set(spooled) - set(before)) > max(before)  # new batches never reuse a seq
    assert all(n == 1 for n in copies.values()), copies  # nothing was ever cut mid-flight
    assert daemon.stats.batches_acked == len(spooled)
    daemon.spool.close()


def test_the_token_file_authenticates_the_daemon_and_a_bad_token_loses_nothing(
    kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path
) -> None:
    name = topic("usage")
    port = free_port()
    agent_id = "agent-token"
    token = new_token()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    authenticator = Authenticator([AgentCredential(hash_token(token), agent_id, (RESOURCE,))])
    spooled: dict[int, bytes] = {}

    async def scenario() -> AgentDaemon:
        async with collector(kafka_bootstrap, name, port, authenticator):
            spool = Spool(tmp_path / "spool", agent_id)
            wrong = AgentDaemon(
                daemon_settings(port, agent_id, token=new_token()),
                spool,
                HostReader(),
                utc_now,
                on_spooled=spooled.__setitem__,
            )
            running = asyncio.create_task(wrong.run())
            await until(
                lambda: len(spool) >= 2 and wrong.stats.reconnects >= 2,
                "batches spooled and refused with a wrong token",
            )
            wrong.stop()
            await running
            assert wrong.stats.batches_acked == 0
            refused = spool.pending()

            daemon = AgentDaemon(
                daemon_settings(port, agent_id, token=read_token_file(token_file)),
                spool,
                HostReader(),
                utc_now,
                on_spooled=spooled.__setitem__,
            )
            running = asyncio.create_task(daemon.run())
            await until(
                lambda: spool.next_seq > max(refused) + 1 and len(spool) == 0,
                "the refused batches and a new one acked with the right token",
            )
            daemon.stop()
            await running
            spool.close()
            return daemon

    daemon = asyncio.run(scenario())
    copies = copies_by_seq(kafka_bootstrap, name, agent_id, spooled)
    assert sorted(copies) == sorted(spooled)  # the refused batches were kept and delivered
    assert all(n == 1 for n in copies.values()), copies
    assert daemon.stats.samples_rejected == 0
