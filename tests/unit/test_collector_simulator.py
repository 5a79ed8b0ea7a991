"""The fleet simulator (pure part) and its ground truth; the ingest service's prepare step."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from collectors.directory import Directory, Limits, MeterRule
from collectors.ingest import Ingestor, IngestSettings, unix_ms
from collectors.simulator import (
    FleetSpec,
    GroundTruth,
    MeterKind,
    MeterSpec,
    generate_batch,
    host_batches,
)
from collectors.validation import decode_batch, validate
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import usage_record_pb2

START = datetime(2026, 10, 1, tzinfo=UTC)
METERS = (
    MeterSpec("net.egress.bytes", MeterKind.COUNTER, 0, 10**9),
    MeterSpec("storage.block.bytes", MeterKind.GAUGE, 10**10, 10**11),
    MeterSpec("ipv4.count", MeterKind.PEAK, 1, 6),
)
RESOURCES = tuple(f"srv-{i}" for i in range(7))


def spec(**changes: object) -> FleetSpec:
    options: dict[str, object] = {
        "resource_ids": RESOURCES,
        "meters": METERS,
        "start": START,
        "end": START + timedelta(hours=5, minutes=7),  # the last interval is cut short
        "hosts": 3,
        "interval_s": 600,
        "batch_size": 40,
        "seed": 7,
    }
    options.update(changes)
    return FleetSpec(**options)  # type: ignore[arg-type]


def directory_for(fleet: FleetSpec, drop: str | None = None) -> Directory:
    return Directory(
        meters={m.name: MeterRule() for m in fleet.meters},
        resource_ids=frozenset(r for r in fleet.resource_ids if r != drop),
    )


def test_batches_cover_every_resource_meter_and_interval_exactly_once() -> None:
    fleet = spec()
    seen: list[tuple[str, str, int, int]] = []
    for host in range(fleet.hosts):
        batches = list(host_batches(fleet, host))
        assert [g.batch.seq for g in batches] == list(range(1, len(batches) + 1))
        assert len(batches) == fleet.batches_of_host(host)
        for g in batches:
            cols = g.batch.samples
            assert g.batch.agent_id == fleet.agent_id(host)
            assert 1 <= len(cols.value) <= fleet.batch_size
            assert set(cols.resource_dict) <= set(fleet.host_resources(host))
            seen.extend(
                zip(
                    [cols.resource_dict[i] for i in cols.resource_index],
                    [cols.meter_dict[i] for i in cols.meter_index],
                    cols.start_unix_s,
                    cols.duration_s,
                    strict=True,
                )
            )
    slots = fleet.slot_starts().tolist()
    expected = {
        (r, m.name, s, min(600, fleet.end_unix_s - s))
        for r in RESOURCES
        for m in METERS
        for s in slots
    }
    assert len(seen) == len(expected) == len(RESOURCES) * len(METERS) * 31
    assert set(seen) == expected
    assert min(d for *_, d in seen) == 420  # 5 h 07 min: the last interval is 7 min


def test_generation_is_deterministic_and_seeded() -> None:
    a = generate_batch(spec(), 1, 2).batch.SerializeToString()
    assert a == generate_batch(spec(), 1, 2).batch.SerializeToString()
    assert a != generate_batch(spec(seed=8), 1, 2).batch.SerializeToString()


def test_values_stay_in_their_meter_range() -> None:
    fleet = spec()
    for g in host_batches(fleet, 0):
        lows = np.array([m.value_min for m in METERS])[g.meter]
        highs = np.array([m.value_max for m in METERS])[g.meter]
        assert np.all((lows <= g.value) & (g.value <= highs))


def test_generated_batches_pass_validation_at_the_period_end() -> None:
    fleet = spec()
    now = fleet.end_unix_s
    for host in range(fleet.hosts):
        for g in host_batches(fleet, host):
            batch = decode_batch(g.batch.SerializeToString())
            verdict = validate(batch, directory_for(fleet), Limits(), now)
            assert verdict.rejections == ()


def fold(fleet: FleetSpec, directory: Directory) -> GroundTruth:
    """Ack every batch as the collector would (validate), and fold the acks in."""
    truth = GroundTruth(fleet)
    for host in range(fleet.hosts):
        for g in host_batches(fleet, host):
            verdict = validate(g.batch, directory, Limits(), fleet.end_unix_s)
            ack = agent_pb2.BatchAck(
                agent_id=g.batch.agent_id,
                seq=g.batch.seq,
                accepted_count=verdict.accepted_count,
                rejections=[r.to_proto() for r in verdict.rejections],
            )
            truth.record_ack(g, ack)
    return truth


def test_ground_truth_counts_only_accepted_samples() -> None:
    fleet = spec()
    truth = fold(fleet, directory_for(fleet, drop="srv-4"))
    series = truth.series()
    assert {s["resource_id"] for s in series} == set(RESOURCES) - {"srv-4"}
    per_series_samples = 31
    assert all(s["count"] == per_series_samples for s in series)
    assert truth.samples_sent == len(RESOURCES) * len(METERS) * per_series_samples
    assert truth.samples_accepted == (len(RESOURCES) - 1) * len(METERS) * per_series_samples
    assert truth.rejections_by_code == {"UNKNOWN_RESOURCE": len(METERS) * per_series_samples}

    # Recompute one series directly from the generated batches.
    host = RESOURCES.index("srv-5") % fleet.hosts
    values = []
    durations = []
    for g in host_batches(fleet, host):
        pick = (np.array(fleet.host_resources(host))[g.resource_local] == "srv-5") & (g.meter == 1)
        values.extend(g.value[pick].tolist())
        durations.extend(g.duration_s[pick].tolist())
    gauge = next(s for s in series if s["resource_id"] == "srv-5" and s["meter"] == METERS[1].name)
    assert gauge["sum"] == sum(values)
    assert gauge["max"] == max(values)
    assert gauge["level_seconds"] == sum(v * d for v, d in zip(values, durations, strict=True))


def test_hourly_sums_of_counters_add_up_and_json_round_trips(tmp_path: Path) -> None:
    fleet = spec()
    truth = fold(fleet, directory_for(fleet))
    for s in truth.series():
        if s["kind"] == "counter":
            assert sum(s["hourly_sums"].values()) == s["sum"]
            assert list(s["hourly_sums"]) == [f"2026-10-01T0{h}:00:00Z" for h in range(6)]
        else:
            assert "hourly_sums" not in s
    path = tmp_path / "truth.json"
    truth.write_json(path)
    loaded = json.loads(path.read_text())
    assert loaded["format"] == "meterline.ground_truth.v1"
    assert loaded["series"] == truth.series()
    assert loaded["intervals_cross_hours"] is False
    assert spec(start=START + timedelta(minutes=55)).intervals_cross_hours() is True


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"start": datetime(2026, 10, 1)}, "naive"),  # noqa: DTZ001
        ({"end": START}, "must be before"),
        ({"hosts": 8}, "hosts must be"),
        ({"interval_s": 3601}, "interval_s"),
        ({"batch_size": 0}, "batch_size"),
        ({"resource_ids": ("a", "a")}, "distinct"),
        ({"end": START + timedelta(days=3650), "interval_s": 1}, "overflow"),
    ],
)
def test_fleet_spec_refuses_bad_plans(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_meter_spec_refuses_bad_ranges() -> None:
    with pytest.raises(ValueError, match="value_min"):
        MeterSpec("x", MeterKind.COUNTER, 5, 4)


# --- the ingest service's prepare step (pure: decode, validate, build the record) ---------


class UnusedSink:
    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError("prepare must not write")


def test_prepare_builds_the_record_of_the_accepted_samples_and_the_ack() -> None:
    fleet = spec()
    received = datetime(2026, 10, 1, 5, 7, 0, 123_000, tzinfo=UTC)
    ingestor = Ingestor(
        directory_for(fleet, drop="srv-3"),
        UnusedSink(),
        IngestSettings(collector_id="collector-7"),
        clock=lambda: received,
    )
    g = generate_batch(fleet, 0, 0)  # host 0 reports srv-0, srv-3, srv-6
    prepared = ingestor.prepare(g.batch.SerializeToString())
    n = len(g.batch.samples.value)
    rejected = [r.sample_index for r in prepared.ack.rejections]
    assert prepared.ack.agent_id == g.batch.agent_id
    assert prepared.ack.seq == 1
    assert prepared.ack.accepted_count == n - len(rejected) > 0
    assert {r.code for r in prepared.ack.rejections} == {agent_pb2.UNKNOWN_RESOURCE}
    assert prepared.record is not None
    record = usage_record_pb2.UsageBatchRecord.FromString(prepared.record)
    assert (record.agent_id, record.seq, record.collector_id) == (
        g.batch.agent_id,
        1,
        "collector-7",
    )
    assert record.received_at_unix_ms == unix_ms(received) == 1_790_831_220_123
    assert "srv-3" not in record.samples.resource_dict
    assert len(record.samples.value) == prepared.ack.accepted_count


def test_prepare_writes_nothing_when_nothing_is_accepted() -> None:
    fleet = spec()
    ingestor = Ingestor(
        Directory(meters={}, resource_ids=frozenset()),
        UnusedSink(),
        IngestSettings(collector_id="c"),
        clock=lambda: START,
    )
    prepared = ingestor.prepare(generate_batch(fleet, 0, 0).batch.SerializeToString())
    assert prepared.record is None
    assert prepared.ack.accepted_count == 0


def test_the_clock_must_be_aware() -> None:
    with pytest.raises(ValueError, match="naive"):
        unix_ms(datetime(2026, 10, 1))  # noqa: DTZ001
