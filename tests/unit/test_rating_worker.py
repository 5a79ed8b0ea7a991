"""Worker pieces that need no broker: settings limits, bounded retries, dead-letter form."""

from __future__ import annotations

import polars as pl
import pytest

from meterline_proto.usage.v1 import samples_pb2, usage_record_pb2
from rating.catalog_file import parse_catalog
from rating.consumer_loop import call_with_retries
from rating.engine import CatalogFrames, rate
from rating.record_codec import RawRecord, decode_records
from rating.worker import WorkerConfig, WorkerStats, undecodable_letter, unresolved_letters


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_records_per_poll", 0),
        ("max_records_per_poll", 100_001),
        ("store_attempts", 0),
        ("poll_timeout_s", 0),
        ("max_sample_duration_s", 10**9),
        ("topic", ""),
    ],
)
def test_config_limits_are_enforced(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"WorkerConfig.{field}"):
        WorkerConfig(bootstrap="b", **{field: value})  # type: ignore[arg-type]


def test_retries_are_bounded_and_back_off() -> None:
    waits: list[float] = []
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("db down")
        return "ok"

    assert (
        call_with_retries(
            "write", flaky, attempts=5, backoff_s=0.1, backoff_max_s=0.15, sleep=waits.append
        )
        == "ok"
    )
    assert waits == [0.1, 0.15]

    def broken() -> str:
        calls.append(1)
        raise ConnectionError("still down")

    calls.clear()
    waits.clear()
    with pytest.raises(ConnectionError, match="still down"):
        call_with_retries(
            "write", broken, attempts=3, backoff_s=1, backoff_max_s=10, sleep=waits.append
        )
    assert len(calls) == 3
    assert waits == [1, 2]


def test_stats_add_up() -> None:
    total = WorkerStats(records=2, samples=5).plus(WorkerStats(records=1, dead_lettered=1))
    assert total == WorkerStats(records=3, samples=5, dead_lettered=1)


CATALOG = parse_catalog(
    {
        "meters": [
            {"name": "m", "kind": "counter", "base_unit": "u", "display_unit": "u",
             "base_per_display": "1"},
        ],
        "plans": [{"id": "p", "name": "P"}],
        "accounts": [{"id": "a", "name": "A", "currency": "EUR", "timezone": "UTC"}],
        "subscriptions": [
            {"id": "s", "account": "a", "plan": "p", "start": "2026-01-01T00:00:00Z"}
        ],
        "resources": [{"id": "r", "subscription": "s", "kind": "server"}],
    },
    "test",
)  # fmt: skip


def test_unresolved_samples_become_one_letter_per_batch() -> None:
    record = usage_record_pb2.UsageBatchRecord(
        agent_id="ag",
        seq=4,
        received_at_unix_ms=1,
        collector_id="c",
        samples=samples_pb2.SampleColumns(
            resource_dict=["r", "x", "y"],
            meter_dict=["m", "nope"],
            resource_index=[0, 1, 0, 2, 1],
            meter_index=[0, 0, 1, 0, 0],
            start_unix_s=[0, 1, 2, 3, 4],
            duration_s=[1, 1, 1, 1, 1],
            value=[10, 11, 12, 13, 14],
        ),
    )
    raw = RawRecord("usage", 1, 77, record.SerializeToString(), b"ag", (("trace", b"t1"),))
    # The same batch twice in the poll: one letter, from the first record.
    records = [raw, RawRecord("usage", 1, 78, raw.value, b"ag")]
    decoded = decode_records(records)
    rated = rate(decoded.samples, CatalogFrames.from_catalog(CATALOG))

    [letter] = unresolved_letters(records, decoded.ledger, rated.unresolved)

    headers = dict(letter.headers)
    assert headers["meterline.error"] == (
        b"unknown resource 'x' (2 samples); unknown meter 'nope' (1 sample); "
        b"unknown resource 'y' (1 sample)"
    )
    assert headers["meterline.error.kind"] == b"unresolved"
    assert headers["meterline.sample_indexes"] == b"1,2,3,4"
    assert headers["meterline.source.offset"] == b"77"
    assert headers["trace"] == b"t1"  # the original headers are kept
    assert letter.key == b"ag"
    assert letter.value is not None
    subset = usage_record_pb2.UsageBatchRecord.FromString(letter.value)
    assert (subset.agent_id, subset.seq) == ("ag", 4)
    assert list(subset.samples.value) == [11, 12, 13, 14]
    assert rated.partials.select(pl.col("quantity").cast(pl.Int64)).to_series().to_list() == [10]


def test_an_undecodable_record_is_dead_lettered_as_it_was() -> None:
    raw = RawRecord("usage", 2, 5, b"\xff", None)
    letter = undecodable_letter(raw, "not a UsageBatchRecord: x")
    assert (letter.key, letter.value) == (None, b"\xff")
    assert dict(letter.headers) == {
        "meterline.error": b"not a UsageBatchRecord: x",
        "meterline.error.kind": b"undecodable",
        "meterline.stage": b"rating",
        "meterline.source.topic": b"usage",
        "meterline.source.partition": b"2",
        "meterline.source.offset": b"5",
    }
