"""Decoding UsageBatchRecords gives back exactly the samples that were encoded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline_proto.usage.v1 import samples_pb2, usage_record_pb2
from rating.record_codec import RawRecord, decode_records

Row = tuple[str, str, int, int, int]  # resource, meter, start, duration, value

rows_st = st.lists(
    st.tuples(
        st.sampled_from(["r0", "r1", "réservé-2", ""]),
        st.sampled_from(["m.a", "m.b"]),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(-(2**63), 2**63 - 1),
    ),
    max_size=20,
)


def _encode(agent: str, seq: int, rows: list[Row], shuffle_dict: bool) -> bytes:
    resources = sorted({r[0] for r in rows}, reverse=shuffle_dict)
    meters = sorted({r[1] for r in rows}, reverse=shuffle_dict)
    cols = samples_pb2.SampleColumns(
        resource_dict=resources,
        meter_dict=meters,
        resource_index=[resources.index(r[0]) for r in rows],
        meter_index=[meters.index(r[1]) for r in rows],
        start_unix_s=[r[2] for r in rows],
        duration_s=[r[3] for r in rows],
        value=[r[4] for r in rows],
    )
    record = usage_record_pb2.UsageBatchRecord(
        agent_id=agent, seq=seq, received_at_unix_ms=1_790_000_000_123, samples=cols
    )
    return record.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), rows_st, st.booleans()), max_size=6))
def test_decode_round_trips(batches: list[tuple[int, list[Row], bool]]) -> None:
    records = [
        RawRecord("t", 0, offset, _encode("agent", seq, rows, shuffle))
        for offset, (seq, rows, shuffle) in enumerate(batches)
    ]
    decoded = decode_records(records)

    assert decoded.undecodable == ()
    assert decoded.ledger.height == len(batches)
    expected: list[tuple[object, ...]] = []
    seen: set[int] = set()
    for seq, rows, _ in batches:
        if seq in seen:  # a batch repeated within the poll counts once (the first)
            continue
        seen.add(seq)
        expected.extend(("agent", seq, i, *row) for i, row in enumerate(rows))
    assert decoded.samples.rows() == expected
