"""The host usage parsers (fixture text in the kernel's real formats) and the sample maths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from collectors.host_usage import (
    CPU_METER,
    EGRESS_METER,
    INGRESS_METER,
    MEMORY_METER,
    METERS,
    STORAGE_METER,
    HostReader,
    HostSamples,
    HostUsageError,
    Reading,
    counter_delta,
    jiffies_to_millicpu_seconds,
    net_deltas,
    parse_meminfo_used_bytes,
    parse_net_dev,
    parse_proc_stat_busy_jiffies,
    samples_between,
    statvfs_used_bytes,
)

PROC_STAT = """\
cpu  19831 7 7143 480028 912 3 645 11 0 0
cpu0 6760 0 2716 244348 60 0 305 3 0 0
cpu1 13071 7 4427 235680 852 3 340 8 0 0
intr 1966430 0 9 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 3711049
btime 1795590000
processes 8839
procs_running 2
procs_blocked 0
softirq 1233221 0 310046 1 141370 0 0 11 364128 0 417665
"""

MEMINFO = """\
MemTotal:       24684084 kB
MemFree:        23820312 kB
MemAvailable:   24316284 kB
Buffers:            9004 kB
Cached:           663524 kB
SwapCached:            0 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 719659409  820044    0    0    0     0          0         0 719659409  820044    0    0    0     0       0          0
  eth0: 381623247    8747    0    0    0     0          0         0   354045    4080    0    0    0     0       0          0
  eth1:      1000      10    0    0    0     0          0         0     2000      20    0    0    0     0       0          0
"""  # noqa: E501 - the kernel's own line format


def test_proc_stat_busy_jiffies_excludes_idle_iowait_steal_and_guest() -> None:
    # user + nice + system + irq + softirq of the aggregate line only
    assert parse_proc_stat_busy_jiffies(PROC_STAT) == 19831 + 7 + 7143 + 3 + 645


def test_jiffies_to_millicpu_seconds_is_exact_integer_math() -> None:
    assert jiffies_to_millicpu_seconds(27629, 100) == 276_290
    assert jiffies_to_millicpu_seconds(7, 300) == 23  # floor; deltas of cumulative values add up
    with pytest.raises(ValueError, match="SC_CLK_TCK"):
        jiffies_to_millicpu_seconds(1, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu0 1 2 3 4 5 6 7\n", "no aggregate 'cpu' line"),
        ("cpu  1 2 3\n", "line 1: expected at least 7 counters"),
        ("intr 1\ncpu  1 2 x 4 5 6 7 8\n", "line 2: non-integer"),
    ],
)
def test_proc_stat_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(HostUsageError, match=message):
        parse_proc_stat_busy_jiffies(text)


def test_meminfo_used_is_total_minus_available_in_bytes() -> None:
    assert parse_meminfo_used_bytes(MEMINFO) == (24684084 - 24316284) * 1024


def test_meminfo_without_mem_available_is_an_error() -> None:
    with pytest.raises(HostUsageError, match="missing MemAvailable"):
        parse_meminfo_used_bytes("MemTotal: 10 kB\nMemFree: 5 kB\n")
    with pytest.raises(HostUsageError, match="line 1"):
        parse_meminfo_used_bytes("MemTotal: 10 MB\nMemAvailable: 5 kB\n")


def test_net_dev_reads_rx_and_tx_bytes_and_skips_loopback() -> None:
    assert parse_net_dev(NET_DEV) == {"eth0": (381623247, 354045), "eth1": (1000, 2000)}
    assert parse_net_dev(NET_DEV, exclude=("lo", "eth1")) == {"eth0": (381623247, 354045)}


def test_net_dev_short_line_is_an_error() -> None:
    with pytest.raises(HostUsageError, match=r"line 3 \(eth0\): expected 16 counters"):
        parse_net_dev(NET_DEV.splitlines()[0] + "\n" + NET_DEV.splitlines()[1] + "\neth0: 1 2\n")


def test_statvfs_used_bytes() -> None:
    assert statvfs_used_bytes(f_blocks=1000, f_bfree=250, f_frsize=4096) == 750 * 4096


def test_counter_reset_uses_the_new_value_as_delta() -> None:
    assert counter_delta(100, 150) == 50
    assert counter_delta(100, 30) == 30  # reset (reboot) or wrap
    # per interface: eth1 was re-created (reset), eth2 is new, eth0 vanished
    previous = {"eth0": (10, 10), "eth1": (500, 800)}
    current = {"eth1": (40, 70), "eth2": (5, 6)}
    assert net_deltas(previous, current) == (40 + 5, 70 + 6)


def reading(at: int, cpu: int, mem: int, tx: int, rx: int, disk: int) -> Reading:
    return Reading(at, cpu, mem, {"eth0": (rx, tx)}, disk)


def as_rows(samples: HostSamples) -> list[tuple[str, int, int, int]]:
    return [
        (METERS[m], s, d, v)
        for m, s, d, v in zip(
            samples.meter_index.tolist(),
            samples.start_unix_s.tolist(),
            samples.duration_s.tolist(),
            samples.value.tolist(),
            strict=True,
        )
    ]


def test_samples_between_two_readings_counters_as_deltas_gauges_as_mean_level() -> None:
    a = reading(1000, cpu=5_000, mem=100, tx=1_000, rx=2_000, disk=7_000)
    b = reading(1010, cpu=6_500, mem=301, tx=1_300, rx=2_050, disk=7_000)
    assert as_rows(samples_between(a, b)) == [
        (CPU_METER, 1000, 10, 1_500),
        (MEMORY_METER, 1000, 10, 200),  # (100 + 301) // 2
        (EGRESS_METER, 1000, 10, 300),
        (INGRESS_METER, 1000, 10, 50),
        (STORAGE_METER, 1000, 10, 7_000),
    ]
    assert samples_between(a, b).value.dtype == np.int64


def test_samples_after_a_reboot_count_from_zero() -> None:
    a = reading(1000, cpu=900_000, mem=1, tx=10**9, rx=10**9, disk=1)
    b = reading(1010, cpu=400, mem=1, tx=77, rx=88, disk=1)
    rows = {m: v for m, _, _, v in as_rows(samples_between(a, b))}
    assert rows[CPU_METER] == 400
    assert rows[EGRESS_METER] == 77
    assert rows[INGRESS_METER] == 88


def test_no_time_elapsed_gives_no_sample() -> None:
    a = reading(1000, 1, 1, 1, 1, 1)
    assert len(samples_between(a, a)) == 0
    assert len(samples_between(a, reading(999, 2, 2, 2, 2, 2))) == 0


def test_a_long_gap_is_cut_into_hours_and_counters_are_split_exactly() -> None:
    a = reading(0, cpu=0, mem=10, tx=0, rx=0, disk=50)
    b = reading(7201, cpu=10_001, mem=10, tx=7, rx=2**50, disk=50)
    s = samples_between(a, b)
    assert sorted(set(s.start_unix_s.tolist())) == [0, 3600, 7200]
    assert s.duration_s.tolist() == [3600] * 5 + [3600] * 5 + [1] * 5
    assert int(s.duration_s.max()) <= 3600
    per_meter = {name: s.value[s.meter_index == i].tolist() for i, name in enumerate(METERS)}
    assert per_meter[CPU_METER] == [4999, 5000, 2]  # floor(10001 * edge / 7201), differenced
    assert sum(per_meter[CPU_METER]) == 10_001
    assert sum(per_meter[EGRESS_METER]) == 7
    assert sum(per_meter[INGRESS_METER]) == 2**50  # no int64 overflow on the way
    assert per_meter[MEMORY_METER] == [10, 10, 10]  # a gauge's level repeats
    assert per_meter[STORAGE_METER] == [50, 50, 50]


def test_pieces_older_than_the_span_are_dropped_and_counted() -> None:
    a = reading(0, 0, 1, 0, 0, 1)
    b = reading(10 * 3600, 36_000, 1, 0, 0, 1)
    s = samples_between(a, b, max_span_s=2 * 3600)
    assert s.pieces_dropped == 8
    assert sorted(set(s.start_unix_s.tolist())) == [8 * 3600, 9 * 3600]
    assert s.value[s.meter_index == 0].tolist() == [3600, 3600]


def write_proc(root: Path, stat: str, meminfo: str, net_dev: str) -> None:
    (root / "net").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(stat)
    (root / "meminfo").write_text(meminfo)
    (root / "net" / "dev").write_text(net_dev)


def test_host_reader_reads_a_proc_tree(tmp_path: Path) -> None:
    write_proc(tmp_path, PROC_STAT, MEMINFO, NET_DEV)
    reader = HostReader(proc_root=tmp_path, mounts=(tmp_path, tmp_path), clk_tck=100)
    r = reader.read(at_unix_s=1_795_600_000)
    st = os.statvfs(tmp_path)
    assert r.at_unix_s == 1_795_600_000
    assert r.cpu_millicpu_s == (19831 + 7 + 7143 + 3 + 645) * 10
    assert r.memory_used_bytes == (24684084 - 24316284) * 1024
    assert r.net_bytes == {"eth0": (381623247, 354045), "eth1": (1000, 2000)}
    # one filesystem given twice is counted once (sizes may move a little between calls)
    used = statvfs_used_bytes(st.f_blocks, st.f_bfree, st.f_frsize)
    assert abs(r.storage_used_bytes - used) < used // 2


def test_host_reader_reads_this_machine() -> None:
    r = HostReader().read(at_unix_s=1)
    assert r.cpu_millicpu_s > 0
    assert r.memory_used_bytes > 0
    assert r.storage_used_bytes > 0
    assert "lo" not in r.net_bytes
