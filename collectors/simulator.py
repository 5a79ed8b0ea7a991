"""A deterministic fleet simulator (pure): columnar batches, and the ground truth of what was
accepted.

The fleet: ``hosts`` hosts, each with one agent reporting a group of the resources (host
``h`` gets ``resource_ids[h::hosts]``). Over ``[start, end)`` every resource reports every
meter once per ``interval_s`` (the last interval is cut at ``end``); samples are ordered by
interval, then resource, then meter, and cut into batches of up to ``batch_size``, numbered
``seq`` 1, 2, ... per agent. Values are drawn uniformly from each meter's inclusive range
by a generator seeded with ``(seed, host, batch)``, so a batch can be regenerated exactly.
Columns are built with NumPy per batch, never a Python loop per sample.

The ground truth folds in only the samples an ack reported as accepted (a batch acked
twice after a retry is counted once). Per (resource, meter): the sum, the max, the count,
and for gauges the level-seconds (value x duration) that gauges are billed on; for
counters, the sum per hour, attributed to the hour in which the sample's interval starts
(exact for rating when no interval crosses an hour: see ``intervals_cross_hours``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from meterline_proto.agent.v1 import agent_pb2

I64 = npt.NDArray[np.int64]

SIM_VALUE_MAXIMUM = 2**40  # largest value a simulated meter may produce, base units
SIM_BATCH_SIZE_MAXIMUM = 10_000
SIM_HOSTS_MAXIMUM = 1_000_000
SIM_INTERVAL_S_MAXIMUM = 3600
_SUM_BOUND = 2**62  # ground-truth accumulators are int64: refuse plans that could overflow
GROUND_TRUTH_FORMAT = "meterline.ground_truth.v1"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MeterKind(StrEnum):
    COUNTER = "counter"  # value = delta over the interval
    GAUGE = "gauge"  # value = level held over the interval
    PEAK = "peak"  # value = level seen


@dataclass(frozen=True, slots=True)
class MeterSpec:
    name: str
    kind: MeterKind
    value_min: int  # inclusive, base units
    value_max: int  # inclusive, base units

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("MeterSpec.name must not be empty")
        if not 0 <= self.value_min <= self.value_max <= SIM_VALUE_MAXIMUM:
            raise ValueError(
                f"meter {self.name!r}: need 0 <= value_min <= value_max <= {SIM_VALUE_MAXIMUM}, "
                f"got [{self.value_min}, {self.value_max}]"
            )


def _unix_s(instant: datetime) -> int:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"naive datetime {instant!r}: use aware UTC datetimes")
    return (instant - _EPOCH) // timedelta(seconds=1)


def _iso(unix_s: int) -> str:
    return (_EPOCH + timedelta(seconds=unix_s)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class FleetSpec:
    resource_ids: tuple[str, ...]
    meters: tuple[MeterSpec, ...]
    start: datetime  # inclusive, aware
    end: datetime  # exclusive, aware
    hosts: int
    interval_s: int = 300
    batch_size: int = 1000
    seed: int = 0
    # Agent ids are f"{agent_prefix}-{host:05d}". Use a new prefix for a new run into the same
    # store: rating deduplicates by (agent_id, seq).
    agent_prefix: str = "sim"
    start_unix_s: int = field(init=False)
    end_unix_s: int = field(init=False)

    def __post_init__(self) -> None:
        start_s, end_s = _unix_s(self.start), _unix_s(self.end)
        object.__setattr__(self, "start_unix_s", start_s)
        object.__setattr__(self, "end_unix_s", end_s)
        if start_s >= end_s:
            raise ValueError(f"start {self.start} must be before end {self.end}")
        if not self.resource_ids or len(set(self.resource_ids)) != len(self.resource_ids):
            raise ValueError("resource_ids must be non-empty and distinct")
        if not self.meters or len({m.name for m in self.meters}) != len(self.meters):
            raise ValueError("meters must be non-empty with distinct names")
        if not 1 <= self.hosts <= min(len(self.resource_ids), SIM_HOSTS_MAXIMUM):
            raise ValueError(
                f"hosts must be in [1, min(resources={len(self.resource_ids)}, "
                f"{SIM_HOSTS_MAXIMUM})], got {self.hosts}"
            )
        if not 1 <= self.interval_s <= SIM_INTERVAL_S_MAXIMUM:
            raise ValueError(f"interval_s must be in [1, {SIM_INTERVAL_S_MAXIMUM}]")
        if not 1 <= self.batch_size <= SIM_BATCH_SIZE_MAXIMUM:
            raise ValueError(f"batch_size must be in [1, {SIM_BATCH_SIZE_MAXIMUM}]")
        if not self.agent_prefix:
            raise ValueError("agent_prefix must not be empty")
        top = max(m.value_max for m in self.meters)
        if self.slot_count * top * self.interval_s >= _SUM_BOUND:
            raise ValueError(
                f"{self.slot_count} intervals of up to {top} x {self.interval_s} s could "
                "overflow the ground truth; shorten the range or the value ranges"
            )

    @property
    def slot_count(self) -> int:
        return -(-(self.end_unix_s - self.start_unix_s) // self.interval_s)

    def host_resources(self, host: int) -> tuple[str, ...]:
        return self.resource_ids[host :: self.hosts]

    def agent_id(self, host: int) -> str:
        return f"{self.agent_prefix}-{host:05d}"

    def samples_of_host(self, host: int) -> int:
        return self.slot_count * len(self.host_resources(host)) * len(self.meters)

    def batches_of_host(self, host: int) -> int:
        return -(-self.samples_of_host(host) // self.batch_size)

    def slot_starts(self) -> I64:
        return np.arange(self.start_unix_s, self.end_unix_s, self.interval_s, dtype=np.int64)

    def intervals_cross_hours(self) -> bool:
        starts = self.slot_starts()
        ends = np.minimum(starts + self.interval_s, self.end_unix_s)
        return bool(np.any((ends - 1) // 3600 != starts // 3600))


@dataclass(frozen=True, slots=True)
class GeneratedBatch:
    """One batch and, per sample, what the ground truth needs (host-local indices)."""

    host: int
    batch: agent_pb2.SampleBatch
    resource_local: I64  # index into spec.host_resources(host)
    meter: I64  # index into spec.meters
    start_unix_s: I64
    duration_s: I64
    value: I64


def generate_batch(spec: FleetSpec, host: int, batch_index: int) -> GeneratedBatch:
    """Batch ``batch_index`` (0-based; seq = batch_index + 1) of ``host``'s agent."""
    resources = spec.host_resources(host)
    n_res, n_met = len(resources), len(spec.meters)
    total = spec.samples_of_host(host)
    first = batch_index * spec.batch_size
    if not 0 <= first < total:
        raise IndexError(f"host {host} has {spec.batches_of_host(host)} batches, not {batch_index}")
    i = np.arange(first, min(first + spec.batch_size, total), dtype=np.int64)
    slot = i // (n_res * n_met)
    resource_local = (i // n_met) % n_res
    meter = i % n_met
    start = spec.start_unix_s + slot * spec.interval_s
    duration = np.minimum(start + spec.interval_s, spec.end_unix_s) - start
    lows = np.array([m.value_min for m in spec.meters], dtype=np.int64)
    highs = np.array([m.value_max for m in spec.meters], dtype=np.int64)
    rng = np.random.default_rng((spec.seed, host, batch_index))
    value = rng.integers(lows[meter], highs[meter], endpoint=True, dtype=np.int64)

    # Compact dictionaries: only the entries this batch uses (in index order).
    used_res, res_index = np.unique(resource_local, return_inverse=True)
    used_met, met_index = np.unique(meter, return_inverse=True)
    batch = agent_pb2.SampleBatch(
        agent_id=spec.agent_id(host),
        seq=batch_index + 1,
        sent_at_unix_ms=int(start[-1] + duration[-1]) * 1000,  # simulated agent clock
    )
    cols = batch.samples
    cols.resource_dict.extend([resources[j] for j in used_res.tolist()])
    cols.meter_dict.extend([spec.meters[j].name for j in used_met.tolist()])
    cols.resource_index.extend(res_index.tolist())
    cols.meter_index.extend(met_index.tolist())
    cols.start_unix_s.extend(start.tolist())
    cols.duration_s.extend(duration.tolist())
    cols.value.extend(value.tolist())
    return GeneratedBatch(host, batch, resource_local, meter, start, duration, value)


def host_batches(spec: FleetSpec, host: int) -> Iterator[GeneratedBatch]:
    """All batches of ``host``'s agent, seq 1, 2, ... (generated lazily)."""
    for batch_index in range(spec.batches_of_host(host)):
        yield generate_batch(spec, host, batch_index)


@dataclass(slots=True)
class _HostTruth:
    sums: I64
    maxima: I64
    counts: I64
    level_seconds: I64
    hourly_sums: I64  # [resource, meter, hour]; counters only are reported
    hourly_counts: I64


class GroundTruth:
    """What the fleet sent and what the collector acked as accepted."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.hour0_unix_s = spec.start_unix_s - spec.start_unix_s % 3600
        self.hours = -(-(spec.end_unix_s - self.hour0_unix_s) // 3600)
        self._hosts: dict[int, _HostTruth] = {}
        self.batches_sent = 0  # distinct (agent_id, seq) sent at least once
        self.sends = 0  # every write of a batch on a stream, resends included
        self.retries = 0  # reconnections after a failed stream
        self.batches_acked = 0
        self.samples_sent = 0
        self.samples_accepted = 0
        self.rejections_by_code: dict[str, int] = {}

    def _host(self, host: int) -> _HostTruth:
        truth = self._hosts.get(host)
        if truth is None:
            shape = (len(self.spec.host_resources(host)), len(self.spec.meters))
            truth = _HostTruth(
                sums=np.zeros(shape, dtype=np.int64),
                maxima=np.full(shape, -1, dtype=np.int64),
                counts=np.zeros(shape, dtype=np.int64),
                level_seconds=np.zeros(shape, dtype=np.int64),
                hourly_sums=np.zeros((*shape, self.hours), dtype=np.int64),
                hourly_counts=np.zeros((*shape, self.hours), dtype=np.int64),
            )
            self._hosts[host] = truth
        return truth

    def record_ack(self, generated: GeneratedBatch, ack: agent_pb2.BatchAck) -> None:
        """Fold in the samples ``ack`` accepted (call once per batch)."""
        n = generated.value.shape[0]
        rejected = np.array([r.sample_index for r in ack.rejections], dtype=np.int64)
        accepted = np.ones(n, dtype=np.bool_)
        accepted[rejected[(rejected >= 0) & (rejected < n)]] = False
        for r in ack.rejections:  # rejected samples only
            name = agent_pb2.RejectCode.Name(r.code)
            self.rejections_by_code[name] = self.rejections_by_code.get(name, 0) + 1
        self.batches_acked += 1
        self.samples_sent += n
        self.samples_accepted += int(np.count_nonzero(accepted))
        truth = self._host(generated.host)
        res = generated.resource_local[accepted]
        met = generated.meter[accepted]
        val = generated.value[accepted]
        hour = (generated.start_unix_s[accepted] - self.hour0_unix_s) // 3600
        np.add.at(truth.sums, (res, met), val)
        np.maximum.at(truth.maxima, (res, met), val)
        np.add.at(truth.counts, (res, met), 1)
        np.add.at(truth.level_seconds, (res, met), val * generated.duration_s[accepted])
        np.add.at(truth.hourly_sums, (res, met, hour), val)
        np.add.at(truth.hourly_counts, (res, met, hour), 1)

    def series(self) -> list[dict[str, Any]]:
        """Per (resource, meter) with at least one accepted sample, sorted."""
        out: list[dict[str, Any]] = []
        for host in sorted(self._hosts):  # a loop per host and per series, not per sample
            truth = self._hosts[host]
            resources = self.spec.host_resources(host)
            for r, m in zip(*np.nonzero(truth.counts), strict=True):
                meter = self.spec.meters[int(m)]
                item: dict[str, Any] = {
                    "resource_id": resources[int(r)],
                    "meter": meter.name,
                    "kind": str(meter.kind),
                    "count": int(truth.counts[r, m]),
                    "sum": int(truth.sums[r, m]),
                    "max": int(truth.maxima[r, m]),
                }
                if meter.kind is MeterKind.GAUGE:
                    item["level_seconds"] = int(truth.level_seconds[r, m])
                if meter.kind is MeterKind.COUNTER:
                    hours = np.flatnonzero(truth.hourly_counts[r, m])
                    item["hourly_sums"] = {
                        _iso(self.hour0_unix_s + 3600 * int(h)): int(truth.hourly_sums[r, m, h])
                        for h in hours
                    }
                out.append(item)
        out.sort(key=lambda s: (s["resource_id"], s["meter"]))
        return out

    def totals(self) -> Mapping[tuple[str, str], int]:
        """(resource_id, meter) -> sum of accepted values."""
        return {(s["resource_id"], s["meter"]): s["sum"] for s in self.series()}

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "format": GROUND_TRUTH_FORMAT,
            "start": _iso(spec.start_unix_s),
            "end": _iso(spec.end_unix_s),
            "interval_s": spec.interval_s,
            "batch_size": spec.batch_size,
            "hosts": spec.hosts,
            "seed": spec.seed,
            "agent_ids": [spec.agent_id(h) for h in range(spec.hosts)],
            "hourly_attribution": "hour containing the interval start",
            "intervals_cross_hours": spec.intervals_cross_hours(),
            "batches_sent": self.batches_sent,
            "batches_acked": self.batches_acked,
            "sends": self.sends,
            "retries": self.retries,
            "samples_sent": self.samples_sent,
            "samples_accepted": self.samples_accepted,
            "rejections_by_code": dict(sorted(self.rejections_by_code.items())),
            "series": self.series(),
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
