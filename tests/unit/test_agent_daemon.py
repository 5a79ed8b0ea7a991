"""The agent daemon's collect side: readings -> spooled batches, and the full-spool policy.

The reader is the real :class:`HostReader` over a /proc tree written by the test, so the
counters are under the test's control; the sending side is tested against a real collector
in tests/integration/test_agent_daemon.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from collectors.agent_daemon import (
    AgentDaemon,
    DaemonSettings,
    backoff_delay_s,
    read_token_file,
)
from collectors.host_usage import CPU_METER, EGRESS_METER, METERS, STORAGE_METER, HostReader
from collectors.spool import Spool, SpoolSettings
from meterline_proto.agent.v1 import agent_pb2

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
T0_S = 1_795_176_000


@dataclass
class Host:
    """A /proc tree whose counters the test moves."""

    root: Path
    busy_jiffies: int = 1_000
    tx_bytes: int = 5_000
    rx_bytes: int = 9_000
    available_kb: int = 3_000

    def write(self) -> None:
        (self.root / "net").mkdir(parents=True, exist_ok=True)
        (self.root / "stat").write_text(f"cpu  {self.busy_jiffies} 0 0 99999 0 0 0 0 0 0\n")
        (self.root / "meminfo").write_text(
            f"MemTotal: 10000 kB\nMemFree: 1 kB\nMemAvailable: {self.available_kb} kB\n"
        )
        zeros = " 0" * 7
        (self.root / "net" / "dev").write_text(
            "Inter-| Receive | Transmit\n face |bytes packets|bytes packets\n"
            f"  lo: 999{zeros} 999{zeros}\n"
            f"eth0: {self.rx_bytes}{zeros} {self.tx_bytes}{zeros}\n"
        )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)


def make_daemon(
    tmp_path: Path, spool_settings: SpoolSettings | None = None
) -> tuple[AgentDaemon, Host, Clock]:
    host = Host(tmp_path / "proc")
    host.write()
    clock = Clock()
    settings = DaemonSettings(target="127.0.0.1:1", agent_id="host-a", resource_id="srv-1")
    spool = Spool(tmp_path / "spool", "host-a", spool_settings)
    reader = HostReader(proc_root=host.root, mounts=(tmp_path,), clk_tck=100)
    return AgentDaemon(settings, spool, reader, clock), host, clock


def decode(daemon: AgentDaemon, seq: int) -> agent_pb2.SampleBatch:
    return agent_pb2.SampleBatch.FromString(daemon.spool.read(seq))


def by_meter(batch: agent_pb2.SampleBatch) -> dict[str, list[tuple[int, int, int]]]:
    c = batch.samples
    out: dict[str, list[tuple[int, int, int]]] = {}
    for i in range(len(c.value)):
        out.setdefault(c.meter_dict[c.meter_index[i]], []).append(
            (c.start_unix_s[i], c.duration_s[i], c.value[i])
        )
    return out


def test_first_reading_is_the_baseline_then_each_interval_is_one_spooled_batch(
    tmp_path: Path,
) -> None:
    daemon, host, clock = make_daemon(tmp_path)
    assert daemon.collect_once() is None  # baseline
    assert len(daemon.spool) == 0

    clock.advance(10)
    host.busy_jiffies += 250  # 2.5 CPU-seconds
    host.tx_bytes += 1_234
    host.available_kb -= 1_000  # used memory grows from 7000 kB to 8000 kB
    host.write()
    assert daemon.collect_once() == 1

    batch = decode(daemon, 1)
    assert (batch.agent_id, batch.seq, batch.sent_at_unix_ms) == ("host-a", 1, (T0_S + 10) * 1000)
    assert list(batch.samples.resource_dict) == ["srv-1"]
    samples = by_meter(batch)
    assert sorted(samples) == sorted(METERS)
    assert samples[CPU_METER] == [(T0_S, 10, 2_500)]
    assert samples[EGRESS_METER] == [(T0_S, 10, 1_234)]
    assert samples["net.ingress.bytes"] == [(T0_S, 10, 0)]
    assert samples["memory.used.bytes"] == [(T0_S, 10, 7_500 * 1024)]
    assert samples[STORAGE_METER][0][2] > 0

    clock.advance(10)
    assert daemon.collect_once() == 2
    assert by_meter(decode(daemon, 2))[CPU_METER] == [(T0_S + 10, 10, 0)]


def test_full_spool_pauses_readings_and_the_next_batch_covers_the_whole_gap(
    tmp_path: Path,
) -> None:
    daemon, host, clock = make_daemon(tmp_path, SpoolSettings(max_batches=2))
    daemon.collect_once()
    for _ in range(2):
        clock.advance(10)
        host.busy_jiffies += 100
        host.write()
        daemon.collect_once()
    assert daemon.spool.pending() == [1, 2]

    for _ in range(400):  # 4,000 s of usage while the collector does not ack
        clock.advance(10)
        host.busy_jiffies += 100
        host.write()
        assert daemon.collect_once() is None
    assert daemon.stats.cycles_deferred == 400
    assert daemon.spool.pending() == [1, 2]  # nothing dropped

    daemon.spool.ack(1)  # the collector is back
    clock.advance(10)
    host.busy_jiffies += 100
    host.write()
    assert daemon.collect_once() == 3
    cpu = by_meter(decode(daemon, 3))[CPU_METER]
    # [T0+20, T0+4030): 4,010 s cut at 3,600 s; the 401 x 1 s of CPU spread exactly
    assert [(start - T0_S, duration) for start, duration, _ in cpu] == [(20, 3600), (3620, 410)]
    assert sum(value for _, _, value in cpu) == 401 * 1_000
    assert daemon.stats.pieces_dropped == 0


def test_a_read_error_is_counted_and_logged_and_the_baseline_kept(tmp_path: Path) -> None:
    daemon, host, clock = make_daemon(tmp_path)
    daemon.collect_once()
    (host.root / "meminfo").write_text("garbage\n")
    clock.advance(10)
    assert daemon.collect_once() is None
    assert daemon.stats.read_errors == 1
    host.write()
    clock.advance(10)
    assert daemon.collect_once() == 1
    assert by_meter(decode(daemon, 1))[CPU_METER] == [(T0_S, 20, 0)]


def test_backoff_is_exponential_bounded_and_jittered() -> None:
    rng = random.Random(7)
    for failures, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0), (10_000, 30.0)):
        delays = [backoff_delay_s(failures, 0.5, 30.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter


def test_settings_and_token_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        DaemonSettings(target="h:1", agent_id="a", resource_id="r", interval_s=0)
    with pytest.raises(ValueError, match="whitespace"):
        DaemonSettings(target="h:1", agent_id="a", resource_id="r", token="a b")
    token = tmp_path / "token"
    token.write_text("  s3cret-token\n")
    assert read_token_file(token) == "s3cret-token"
    assert "s3cret" not in repr(
        DaemonSettings(target="h:1", agent_id="a", resource_id="r", token="s3cret")
    )
    token.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(token)
