"""Real usage of the Linux host the agent runs on: parse ``/proc`` and ``statvfs``, and turn two
readings into samples with the right meter kinds.

Pure parsing and arithmetic (``parse_*``, :func:`samples_between`) plus a thin
:class:`HostReader` that reads the files. Quantities are ints in base units; no floats.

Meters emitted (put them in the catalog, or their samples are rejected ``UNKNOWN_METER``):

=============================== ======= =====================================================
meter                           kind    source
=============================== ======= =====================================================
``cpu.usage.millicpu_seconds``  counter ``/proc/stat`` ``cpu`` line: user + nice + system +
                                        irq + softirq jiffies (idle, iowait, steal excluded;
                                        guest/guest_nice are already inside user/nice), as
                                        ``jiffies * 1000 // SC_CLK_TCK``
``memory.used.bytes``           gauge   ``/proc/meminfo``: MemTotal - MemAvailable (kB * 1024)
``net.egress.bytes``            counter ``/proc/net/dev`` transmit bytes, non-loopback
``net.ingress.bytes``           counter ``/proc/net/dev`` receive bytes, non-loopback
``storage.block.bytes``         gauge   ``statvfs`` of the configured mount points, one per
                                        filesystem: ``(f_blocks - f_bfree) * f_frsize``
=============================== ======= =====================================================

Rules where the design docs are silent:

* The first reading only sets the baseline. A sample covers ``[previous reading, this
  reading)`` in whole seconds.
* Counters are deltas of cumulative values. A negative delta means the counter was reset
  (reboot, interface re-created) or wrapped: the new cumulative value is used as the delta
  (a wrap therefore under-counts; Linux's 64-bit counters do not wrap in practice). Network
  deltas are taken per interface, then summed: an interface that appeared since the previous
  reading contributes its whole counter, one that disappeared contributes nothing.
* Gauges: the level held over the interval is the mean of the two readings' levels, rounded
  down (the trapezoid estimate of level x seconds).
* An interval longer than ``MAX_DURATION_S`` (3,600 s: after a suspend, or while the spool was
  full) is cut into pieces of at most 3,600 s; a counter's delta is spread over them in
  proportion to their length, exactly (cumulative floor division, the pieces sum to the
  delta); a gauge's level is repeated. Pieces that start more than ``max_span_s`` before the
  reading are dropped (the collector would reject them as too late) and counted.
* A reading at or before the previous one (clock stepped back) yields no sample; the caller
  restarts the baseline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]

CPU_METER = "cpu.usage.millicpu_seconds"
MEMORY_METER = "memory.used.bytes"
EGRESS_METER = "net.egress.bytes"
INGRESS_METER = "net.ingress.bytes"
STORAGE_METER = "storage.block.bytes"
# Order of the meters in HostSamples.meter_index.
METERS: tuple[str, ...] = (CPU_METER, MEMORY_METER, EGRESS_METER, INGRESS_METER, STORAGE_METER)
COUNTERS = frozenset({CPU_METER, EGRESS_METER, INGRESS_METER})
GAUGES = frozenset({MEMORY_METER, STORAGE_METER})

MAX_DURATION_S = 3600  # longest interval of one sample (the collector's limit)
DEFAULT_MAX_SPAN_S = 35 * 24 * 3600  # the default maximum lateness of a meter
MAX_SPAN_S_MAXIMUM = 400 * 24 * 3600
# /proc/stat cpu fields (0-based after "cpu"): user nice system idle iowait irq softirq steal
_CPU_BUSY_FIELDS = (0, 1, 2, 5, 6)


class HostUsageError(ValueError):
    """A /proc file does not have the expected format; the message names file and line."""


# -- parsers (pure) ----------------------------------------------------------------------------


def parse_proc_stat_busy_jiffies(text: str) -> int:
    """Busy jiffies of all CPUs since boot, from the aggregate ``cpu`` line of /proc/stat."""
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = fields[1:]
            if len(values) < 7:
                raise HostUsageError(
                    f"/proc/stat line {number}: expected at least 7 counters, got {len(values)}"
                )
            try:
                return sum(int(values[i]) for i in _CPU_BUSY_FIELDS)
            except ValueError:
                raise HostUsageError(f"/proc/stat line {number}: non-integer counter") from None
    raise HostUsageError("/proc/stat: no aggregate 'cpu' line")


def jiffies_to_millicpu_seconds(jiffies: int, clk_tck: int) -> int:
    """Cumulative jiffies to cumulative milli-CPU-seconds (floor; deltas of the results are
    exact over time, without drift)."""
    if clk_tck < 1:
        raise ValueError(f"SC_CLK_TCK must be >= 1, got {clk_tck}")
    return jiffies * 1000 // clk_tck


def parse_meminfo_used_bytes(text: str) -> int:
    """MemTotal - MemAvailable, in bytes (the kernel reports kB = 1,024 bytes)."""
    found: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        key, _, rest = line.partition(":")
        if key in {"MemTotal", "MemAvailable"}:
            parts = rest.split()
            if len(parts) != 2 or parts[1] != "kB" or not parts[0].isdigit():
                raise HostUsageError(f"/proc/meminfo line {number}: expected '<n> kB': {line!r}")
            found[key] = int(parts[0]) * 1024
    missing = {"MemTotal", "MemAvailable"} - found.keys()
    if missing:
        raise HostUsageError(f"/proc/meminfo: missing {', '.join(sorted(missing))}")
    return max(0, found["MemTotal"] - found["MemAvailable"])


def parse_net_dev(text: str, exclude: Sequence[str] = ("lo",)) -> dict[str, tuple[int, int]]:
    """Per interface (not in ``exclude``): cumulative ``(rx_bytes, tx_bytes)``."""
    out: dict[str, tuple[int, int]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        name, sep, rest = line.partition(":")
        if not sep or "|" in line:  # the two header lines
            continue
        name = name.strip()
        fields = rest.split()
        if len(fields) < 16:
            raise HostUsageError(
                f"/proc/net/dev line {number} ({name}): expected 16 counters, got {len(fields)}"
            )
        try:
            rx, tx = int(fields[0]), int(fields[8])
        except ValueError:
            raise HostUsageError(f"/proc/net/dev line {number} ({name}): non-integer") from None
        if name not in exclude:
            out[name] = (rx, tx)
    return out


def statvfs_used_bytes(f_blocks: int, f_bfree: int, f_frsize: int) -> int:
    """Allocated bytes of a filesystem: blocks not free (reserved-for-root blocks count as
    used) times the fragment size."""
    return max(0, f_blocks - f_bfree) * f_frsize


# -- readings and samples (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """Cumulative counters and current levels at one instant (whole UTC seconds)."""

    at_unix_s: int
    cpu_millicpu_s: int  # cumulative since boot
    memory_used_bytes: int  # level
    net_bytes: Mapping[str, tuple[int, int]]  # interface -> cumulative (rx, tx)
    storage_used_bytes: int  # level


@dataclass(frozen=True, slots=True)
class HostSamples:
    """Samples of one resource, as columns (``meter_index`` into :data:`METERS`)."""

    meter_index: I64
    start_unix_s: I64
    duration_s: I64
    value: I64
    pieces_dropped: int = 0  # pieces older than max_span_s, not emitted

    def __len__(self) -> int:
        return int(self.value.shape[0])


def counter_delta(previous: int, current: int) -> int:
    """Delta of a cumulative counter; a decrease is a reset: the new value is the delta."""
    delta = current - previous
    return current if delta < 0 else delta


def net_deltas(
    previous: Mapping[str, tuple[int, int]], current: Mapping[str, tuple[int, int]]
) -> tuple[int, int]:
    """Summed (rx, tx) deltas, per interface first (see the module's rules)."""
    rx = tx = 0
    for name, (cur_rx, cur_tx) in current.items():  # per interface, a handful
        prev_rx, prev_tx = previous.get(name, (0, 0))
        rx += counter_delta(prev_rx, cur_rx)
        tx += counter_delta(prev_tx, cur_tx)
    return rx, tx


def samples_between(
    previous: Reading, current: Reading, max_span_s: int = DEFAULT_MAX_SPAN_S
) -> HostSamples:
    """The samples of ``[previous.at_unix_s, current.at_unix_s)``; empty if that is empty."""
    if not 1 <= max_span_s <= MAX_SPAN_S_MAXIMUM:
        raise ValueError(f"max_span_s must be in [1, {MAX_SPAN_S_MAXIMUM}], got {max_span_s}")
    total = current.at_unix_s - previous.at_unix_s
    empty = np.zeros(0, dtype=np.int64)
    if total <= 0:
        return HostSamples(empty, empty, empty, empty)
    rx, tx = net_deltas(previous.net_bytes, current.net_bytes)
    per_meter = np.array(
        [
            counter_delta(previous.cpu_millicpu_s, current.cpu_millicpu_s),
            (previous.memory_used_bytes + current.memory_used_bytes) // 2,
            tx,
            rx,
            (previous.storage_used_bytes + current.storage_used_bytes) // 2,
        ],
        dtype=np.int64,
    )
    is_counter = np.array([m in COUNTERS for m in METERS], dtype=np.bool_)

    pieces = -(-total // MAX_DURATION_S)
    edges = np.minimum(np.arange(pieces + 1, dtype=np.int64) * MAX_DURATION_S, total)
    starts = previous.at_unix_s + edges[:-1]
    durations = np.diff(edges)
    # Counters: exact proportional split, delta * edge // total, differenced (sums to delta).
    # Computed as q times edge plus (r times edge) // total, with q, r = divmod(delta, total):
    # no int64 overflow, since q times edge <= delta and r times edge < total squared.
    q, r = np.divmod(per_meter, total)
    cumulative = q[:, None] * edges[None, :] + (r[:, None] * edges[None, :]) // total
    split = np.diff(cumulative, axis=1)  # meters x pieces
    values = np.where(is_counter[:, None], split, per_meter[:, None])

    keep = starts >= current.at_unix_s - max_span_s
    n_meters = len(METERS)
    kept = int(np.count_nonzero(keep))
    return HostSamples(
        meter_index=np.tile(np.arange(n_meters, dtype=np.int64), kept),
        start_unix_s=np.repeat(starts[keep], n_meters),
        duration_s=np.repeat(durations[keep], n_meters),
        value=values[:, keep].T.reshape(-1),
        pieces_dropped=pieces - kept,
    )


# -- the reader (thin, does I/O) ---------------------------------------------------------------


class HostReader:
    """Read a :class:`Reading` of this host. ``proc_root`` is replaceable for tests."""

    def __init__(
        self,
        *,
        mounts: Sequence[Path] = (Path("/"),),
        net_exclude: Sequence[str] = ("lo",),
        proc_root: Path = Path("/proc"),
        clk_tck: int | None = None,
    ) -> None:
        if not mounts:
            raise ValueError("at least one mount point is needed for storage.block.bytes")
        self._mounts = tuple(mounts)
        self._net_exclude = tuple(net_exclude)
        self._proc = proc_root
        self._clk_tck = clk_tck if clk_tck is not None else os.sysconf("SC_CLK_TCK")

    def storage_used_bytes(self) -> int:
        """Sum over the configured mount points, each filesystem (st_dev) counted once."""
        seen: set[int] = set()
        used = 0
        for mount in self._mounts:
            device = mount.stat().st_dev
            if device in seen:
                continue
            seen.add(device)
            st = os.statvfs(mount)
            used += statvfs_used_bytes(st.f_blocks, st.f_bfree, st.f_frsize)
        return used

    def read(self, at_unix_s: int) -> Reading:
        stat = (self._proc / "stat").read_text()
        meminfo = (self._proc / "meminfo").read_text()
        net_dev = (self._proc / "net" / "dev").read_text()
        return Reading(
            at_unix_s=at_unix_s,
            cpu_millicpu_s=jiffies_to_millicpu_seconds(
                parse_proc_stat_busy_jiffies(stat), self._clk_tck
            ),
            memory_used_bytes=parse_meminfo_used_bytes(meminfo),
            net_bytes=parse_net_dev(net_dev, self._net_exclude),
            storage_used_bytes=self.storage_used_bytes(),
        )
