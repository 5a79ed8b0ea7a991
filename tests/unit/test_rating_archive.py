"""The raw-batch archive: what a poll archives, and the Parquet files it lands in.

Given a poll of records (one batch twice, one undecodable), when it is archived, then each
decodable record is in the file of its topic/partition/offset range with its exact bytes and
sample bounds; writing again changes nothing; overlapping files (a replay that polled
differently) still read back each Kafka position once; readers skip records outside a range.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest

from meterline_proto.usage.v1 import samples_pb2, usage_record_pb2
from rating.archive import ARCHIVE_SCHEMA, archive_frame
from rating.parquet_archive import ParquetArchive, archive_files, archive_path, read_archive
from rating.record_codec import RawRecord, decode_records

H = 1_791_000_000 // 3600 * 3600  # 2026-10-03T04:00:00Z
Row = tuple[str, str, int, int, int]  # resource, meter, start, duration, value


def batch(agent: str, seq: int, rows: Sequence[Row]) -> bytes:
    resources = sorted({r[0] for r in rows})
    meters = sorted({r[1] for r in rows})
    return usage_record_pb2.UsageBatchRecord(
        agent_id=agent,
        seq=seq,
        received_at_unix_ms=(H + 4000) * 1000,
        collector_id="t",
        samples=samples_pb2.SampleColumns(
            resource_dict=resources,
            meter_dict=meters,
            resource_index=[resources.index(r[0]) for r in rows],
            meter_index=[meters.index(r[1]) for r in rows],
            start_unix_s=[r[2] for r in rows],
            duration_s=[r[3] for r in rows],
            value=[r[4] for r in rows],
        ),
    ).SerializeToString()


A1 = batch("a", 1, [("srv-1", "net", H + 10, 60, 5), ("vol-1", "disk", H - 600, 7200, 3)])
A2 = batch("a", 2, [("srv-1", "net", H + 7200, 0, 1)])
EMPTY = batch("b", 1, [])
TOPIC = "usage.samples.v1"


def poll() -> list[RawRecord]:
    return [
        RawRecord(TOPIC, 0, 10, A1),
        RawRecord(TOPIC, 1, 3, b"\xff garbage"),
        RawRecord(TOPIC, 0, 11, A1),  # the same batch again
        RawRecord(TOPIC, 1, 4, A2),
        RawRecord(TOPIC, 0, 12, EMPTY),
    ]


def test_archive_frame_holds_each_decodable_record_with_its_bytes_and_bounds() -> None:
    records = poll()
    frame = archive_frame(records, decode_records(records))

    assert frame.schema == pl.Schema(ARCHIVE_SCHEMA)
    assert frame.select("partition", "offset", "agent_id", "seq", "sample_count").rows() == [
        (0, 10, "a", 1, 2),
        (0, 11, "a", 1, 2),
        (0, 12, "b", 1, 0),
        (1, 4, "a", 2, 1),
    ]
    assert frame["value"].to_list() == [A1, A1, EMPTY, A2]
    assert frame.select("first_start_unix_s", "last_end_unix_s").rows() == [
        (H - 600, H + 6600),
        (H - 600, H + 6600),
        (0, 0),
        (H + 7200, H + 7200),
    ]


def test_files_are_named_by_offset_range_and_a_replay_writes_nothing(tmp_path: Path) -> None:
    records = poll()
    frame = archive_frame(records, decode_records(records))
    archive = ParquetArchive(tmp_path)

    assert archive.write(frame) == 2
    assert archive_files(tmp_path, TOPIC) == [
        archive_path(tmp_path, TOPIC, 0, 10, 12),
        archive_path(tmp_path, TOPIC, 1, 4, 4),
    ]
    assert archive_path(tmp_path, TOPIC, 0, 10, 12).name == (
        "00000000000000000010-00000000000000000012.parquet"
    )
    mtime = archive_path(tmp_path, TOPIC, 0, 10, 12).stat().st_mtime_ns
    assert archive.write(frame) == 0
    assert archive_path(tmp_path, TOPIC, 0, 10, 12).stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    assert read_archive(tmp_path, TOPIC).equals(frame)


def test_overlapping_files_read_back_each_position_once(tmp_path: Path) -> None:
    records = poll()
    frame = archive_frame(records, decode_records(records))
    archive = ParquetArchive(tmp_path)
    archive.write(frame.filter(pl.col("offset") <= 11))  # a poll that crashed after archiving
    archive.write(frame)  # its replay polled one record more

    assert len(archive_files(tmp_path, TOPIC)) == 3
    assert read_archive(tmp_path, TOPIC).equals(frame)


def test_reading_a_range_skips_records_whose_samples_cannot_touch_it(tmp_path: Path) -> None:
    records = poll()
    ParquetArchive(tmp_path).write(archive_frame(records, decode_records(records)))

    def offsets(start: int | None, end: int | None) -> list[tuple[int, int]]:
        return read_archive(tmp_path, TOPIC, start, end).select("partition", "offset").rows()

    assert offsets(H, H + 3600) == [(0, 10), (0, 11)]
    assert offsets(H + 7200, H + 10800) == [(1, 4)]
    assert offsets(H + 10800, None) == []
    assert offsets(None, H - 3600) == [(0, 12)]  # no samples: bounds 0, 0
    assert read_archive(tmp_path, "other.topic").is_empty()
    with pytest.raises(ValueError, match="not on a whole hour"):
        read_archive(tmp_path, TOPIC, H + 1, None)


@pytest.mark.parametrize("topic", ["..", "a/b", "", "x" * 250])
def test_a_topic_that_is_not_a_kafka_name_is_refused(tmp_path: Path, topic: str) -> None:
    with pytest.raises(ValueError, match="not a legal Kafka topic name"):
        archive_path(tmp_path, topic, 0, 0, 0)


def test_a_frame_of_another_schema_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ARCHIVE_SCHEMA"):
        ParquetArchive(tmp_path).write(pl.DataFrame({"offset": [1]}))
    assert archive_files(tmp_path, TOPIC) == []
