"""Decoding Kafka records: frames out, bad records named and kept."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from aggregation.ports import LEDGER_SCHEMA
from meterline_proto.usage.v1 import samples_pb2, usage_record_pb2
from rating.record_codec import SAMPLES_SCHEMA, RawRecord, decode_records, subset_record


def _record(
    agent: str = "agent-1", seq: int = 1, **columns: list[int] | list[str]
) -> usage_record_pb2.UsageBatchRecord:
    cols: dict[str, list[int] | list[str]] = {
        "resource_dict": ["srv-1", "srv-2"],
        "meter_dict": ["net.egress.bytes"],
        "resource_index": [0, 1, 1],
        "meter_index": [0, 0, 0],
        "start_unix_s": [1_790_000_000, 1_790_000_060, 1_790_000_120],
        "duration_s": [60, 60, 60],
        "value": [10, 20, 30],
    }
    cols.update(columns)
    return usage_record_pb2.UsageBatchRecord(
        agent_id=agent,
        seq=seq,
        received_at_unix_ms=1_790_000_200_500,
        collector_id="collector-1",
        samples=samples_pb2.SampleColumns(**cols),  # type: ignore[arg-type]
    )


def _raw(value: bytes | None, offset: int = 0, partition: int = 0) -> RawRecord:
    return RawRecord("usage", partition, offset, value, key=b"agent-1")


def test_a_record_becomes_a_ledger_row_and_sample_rows() -> None:
    decoded = decode_records([_raw(_record().SerializeToString(), offset=41, partition=2)])

    assert decoded.undecodable == ()
    assert decoded.ledger.schema == pl.Schema(LEDGER_SCHEMA)
    assert decoded.ledger.rows() == [
        ("agent-1", 1, "usage", 2, 41, datetime(2026, 9, 21, 14, 16, 40, 500000, tzinfo=UTC), 3)
    ]
    assert decoded.samples.schema == pl.Schema(SAMPLES_SCHEMA)
    assert decoded.samples.rows() == [
        ("agent-1", 1, 0, "srv-1", "net.egress.bytes", 1_790_000_000, 60, 10),
        ("agent-1", 1, 1, "srv-2", "net.egress.bytes", 1_790_000_060, 60, 20),
        ("agent-1", 1, 2, "srv-2", "net.egress.bytes", 1_790_000_120, 60, 30),
    ]


def test_records_are_concatenated_with_their_own_dictionaries() -> None:
    other = _record(
        agent="agent-2",
        seq=7,
        resource_dict=["vol-9"],
        meter_dict=["a", "storage.block.bytes"],
        resource_index=[0],
        meter_index=[1],
        start_unix_s=[5],
        duration_s=[3600],
        value=[2**63 - 1],
    )
    decoded = decode_records(
        [_raw(_record().SerializeToString()), _raw(other.SerializeToString(), offset=1)]
    )
    assert decoded.samples.height == 4
    assert decoded.samples.row(3) == (
        "agent-2", 7, 0, "vol-9", "storage.block.bytes", 5, 3600, 2**63 - 1,
    )  # fmt: skip


def test_a_batch_twice_in_one_poll_contributes_its_samples_once() -> None:
    value = _record().SerializeToString()
    decoded = decode_records([_raw(value, 0), _raw(value, 1)])
    assert decoded.ledger["offset"].to_list() == [0, 1]
    assert decoded.samples.height == 3


def test_empty_input_and_empty_batches_give_typed_empty_frames() -> None:
    decoded = decode_records([])
    assert decoded.ledger.schema == pl.Schema(LEDGER_SCHEMA)
    assert decoded.samples.schema == pl.Schema(SAMPLES_SCHEMA)
    empty = usage_record_pb2.UsageBatchRecord(agent_id="a", seq=1)
    decoded = decode_records([_raw(empty.SerializeToString())])
    assert decoded.ledger["sample_count"].to_list() == [0]
    assert decoded.samples.height == 0


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b"\xff\xff\xff", "not a UsageBatchRecord"),
        (None, "record has no value"),
        (_record(agent="").SerializeToString(), "agent_id is empty"),
        (_record(seq=2**63).SerializeToString(), "seq 9223372036854775808 is beyond int64"),
        (
            _record(resource_index=[0, 2, 1]).SerializeToString(),
            "resource_index[1] = 2 is out of range (dictionary has 2 entries)",
        ),
        (
            _record(meter_index=[0, 0, 5]).SerializeToString(),
            "meter_index[2] = 5 is out of range (dictionary has 1 entries)",
        ),
        (
            _record(value=[1, 2]).SerializeToString(),
            (
                "sample columns of unequal length: resource_index=3, meter_index=3, "
                "start_unix_s=3, duration_s=3, value=2"
            ),
        ),
    ],
    ids=["garbage", "tombstone", "no-agent", "seq", "resource-index", "meter-index", "lengths"],
)
def test_a_bad_record_is_returned_with_its_reason(value: bytes | None, error: str) -> None:
    good = _raw(_record(seq=9).SerializeToString(), offset=0)
    bad = _raw(value, offset=1)
    decoded = decode_records([good, bad])

    assert [(u.record, u.error) for u in decoded.undecodable if not u.error.startswith(error)] == []
    assert [u.record for u in decoded.undecodable] == [bad]
    # The good record of the same poll is unaffected.
    assert decoded.ledger["seq"].to_list() == [9]
    assert decoded.samples.height == 3


def test_subset_record_keeps_identity_and_only_the_chosen_samples() -> None:
    original = _record()
    subset = subset_record(original, [2, 0])
    assert (subset.agent_id, subset.seq, subset.collector_id) == ("agent-1", 1, "collector-1")
    assert subset.received_at_unix_ms == original.received_at_unix_ms
    decoded = decode_records([_raw(subset.SerializeToString())])
    assert decoded.samples.select("resource_id", "value").rows() == [("srv-2", 30), ("srv-1", 10)]
