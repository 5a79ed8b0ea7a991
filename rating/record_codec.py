"""Kafka record values (``UsageBatchRecord`` v1) -> Polars frames, whole batches at a time.

The only per-record Python work is parsing the protobuf and checking the record's shape;
the per-sample columns go straight into NumPy arrays (packed fields convert in bulk) and
the dictionary columns are resolved by one gather over all records of the poll.

A record that cannot be decoded (bad protobuf, empty ``agent_id``, ``seq`` beyond int64,
columns of unequal length, a dictionary index out of range, an impossible
``received_at``) is returned in ``Decoded.undecodable`` with the reason, never dropped.

Within one call, a batch seen twice (same ``(agent_id, seq)``, e.g. a producer retry that
landed twice) contributes its samples once, from its first record in the order given; the
ledger keeps a row per record, and the store counts each ``(agent_id, seq)`` once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl
from google.protobuf.message import DecodeError

from aggregation.ports import LEDGER_SCHEMA
from meterline_proto.usage.v1 import samples_pb2, usage_record_pb2

# One row per sample. ``sample_index`` is the sample's position in its batch's columns.
SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "agent_id": pl.String(),
    "seq": pl.Int64(),
    "sample_index": pl.Int64(),
    "resource_id": pl.String(),
    "meter": pl.String(),
    "start_unix_s": pl.Int64(),
    "duration_s": pl.Int64(),
    "value": pl.Int64(),
}

_INT64_MAX = 2**63 - 1
# received_at must be a representable instant: [1970-01-01, 10000-01-01).
_RECEIVED_AT_MAX_MS = 253_402_300_800_000


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A Kafka record as consumed; ``offset`` is the record's own offset."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Undecodable:
    record: RawRecord
    error: str


@dataclass(frozen=True, slots=True)
class Decoded:
    ledger: pl.DataFrame  # LEDGER_SCHEMA, one row per decodable record
    samples: pl.DataFrame  # SAMPLES_SCHEMA, the samples of each distinct batch once
    undecodable: tuple[Undecodable, ...]


class _RecordError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class _Columns:
    resource_index: npt.NDArray[np.int64]
    meter_index: npt.NDArray[np.int64]
    start_unix_s: npt.NDArray[np.int64]
    duration_s: npt.NDArray[np.int64]
    value: npt.NDArray[np.int64]


def _columns(samples: samples_pb2.SampleColumns) -> _Columns:
    lengths = {
        "resource_index": len(samples.resource_index),
        "meter_index": len(samples.meter_index),
        "start_unix_s": len(samples.start_unix_s),
        "duration_s": len(samples.duration_s),
        "value": len(samples.value),
    }
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise _RecordError(f"sample columns of unequal length: {detail}")
    cols = _Columns(
        resource_index=np.array(samples.resource_index, dtype=np.int64),
        meter_index=np.array(samples.meter_index, dtype=np.int64),
        start_unix_s=np.array(samples.start_unix_s, dtype=np.int64),
        duration_s=np.array(samples.duration_s, dtype=np.int64),
        value=np.array(samples.value, dtype=np.int64),
    )
    n = lengths["value"]
    if n:
        for name, index, size in (
            ("resource_index", cols.resource_index, len(samples.resource_dict)),
            ("meter_index", cols.meter_index, len(samples.meter_dict)),
        ):
            top = int(index.max())
            if top >= size:
                position = int(np.argmax(index >= size))
                raise _RecordError(
                    f"{name}[{position}] = {int(index[position])} is out of range "
                    f"(dictionary has {size} entries)"
                )
    return cols


def parse_record(value: bytes | None) -> usage_record_pb2.UsageBatchRecord:
    """Parse and check a record value; raise ValueError naming what is wrong."""
    if value is None:
        raise _RecordError("record has no value")
    msg = usage_record_pb2.UsageBatchRecord()
    try:
        msg.ParseFromString(value)
    except DecodeError as exc:
        raise _RecordError(f"not a UsageBatchRecord: {exc}") from exc
    if not msg.agent_id:
        raise _RecordError("agent_id is empty")
    if msg.seq > _INT64_MAX:
        raise _RecordError(f"seq {msg.seq} is beyond int64")
    if not 0 <= msg.received_at_unix_ms < _RECEIVED_AT_MAX_MS:
        raise _RecordError(f"received_at_unix_ms {msg.received_at_unix_ms} is out of range")
    return msg


def decode_records(records: Sequence[RawRecord]) -> Decoded:
    """Decode a poll's worth of records into a ledger frame and one samples frame."""
    undecodable: list[Undecodable] = []
    ledger_rows: dict[str, list[object]] = {k: [] for k in LEDGER_SCHEMA}
    seen: set[tuple[str, int]] = set()

    batches = _Batches()

    for record in records:
        try:
            msg = parse_record(record.value)
            cols = _columns(msg.samples)
        except _RecordError as exc:
            undecodable.append(Undecodable(record, str(exc)))
            continue
        n = len(cols.value)
        ledger_rows["agent_id"].append(msg.agent_id)
        ledger_rows["seq"].append(msg.seq)
        ledger_rows["topic"].append(record.topic)
        ledger_rows["partition"].append(record.partition)
        ledger_rows["offset"].append(record.offset)
        ledger_rows["received_at"].append(msg.received_at_unix_ms * 1000)
        ledger_rows["sample_count"].append(n)
        identity = (msg.agent_id, msg.seq)
        if identity in seen:
            continue
        seen.add(identity)
        batches.add(msg, cols)

    ledger = pl.DataFrame(
        ledger_rows,
        schema={**LEDGER_SCHEMA, "received_at": pl.Int64()},
    ).with_columns(pl.col("received_at").cast(LEDGER_SCHEMA["received_at"]))
    return Decoded(
        ledger=ledger,
        samples=batches.frame(),
        undecodable=tuple(undecodable),
    )


class _Batches:
    """The distinct batches of one poll, gathered into one samples frame at the end."""

    def __init__(self) -> None:
        self.agents: list[str] = []
        self.seqs: list[int] = []
        self.counts: list[int] = []
        self.columns: list[_Columns] = []
        self.resource_bases: list[int] = []
        self.meter_bases: list[int] = []
        self.resource_dict: list[str] = []
        self.meter_dict: list[str] = []

    def add(self, msg: usage_record_pb2.UsageBatchRecord, cols: _Columns) -> None:
        self.agents.append(msg.agent_id)
        self.seqs.append(msg.seq)
        self.counts.append(len(cols.value))
        self.columns.append(cols)
        self.resource_bases.append(len(self.resource_dict))
        self.meter_bases.append(len(self.meter_dict))
        self.resource_dict.extend(msg.samples.resource_dict)
        self.meter_dict.extend(msg.samples.meter_dict)

    def frame(self) -> pl.DataFrame:
        if sum(self.counts) == 0:
            return pl.DataFrame(schema=SAMPLES_SCHEMA)
        columns = self.columns
        counts = np.array(self.counts, dtype=np.int64)
        batch_of_sample = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        first = np.cumsum(counts) - counts
        sample_index = np.arange(int(counts.sum()), dtype=np.int64) - first[batch_of_sample]
        resource_index = np.concatenate(
            [c.resource_index + b for c, b in zip(columns, self.resource_bases, strict=True)]
        )
        meter_index = np.concatenate(
            [c.meter_index + b for c, b in zip(columns, self.meter_bases, strict=True)]
        )
        return pl.DataFrame(
            {
                "agent_id": pl.Series(self.agents, dtype=pl.String).gather(batch_of_sample),
                "seq": pl.Series(self.seqs, dtype=pl.Int64).gather(batch_of_sample),
                "sample_index": sample_index,
                "resource_id": pl.Series(self.resource_dict, dtype=pl.String).gather(
                    resource_index
                ),
                "meter": pl.Series(self.meter_dict, dtype=pl.String).gather(meter_index),
                "start_unix_s": np.concatenate([c.start_unix_s for c in columns]),
                "duration_s": np.concatenate([c.duration_s for c in columns]),
                "value": np.concatenate([c.value for c in columns]),
            },
            schema=SAMPLES_SCHEMA,
        )


def subset_record(
    msg: usage_record_pb2.UsageBatchRecord, sample_indexes: Sequence[int]
) -> usage_record_pb2.UsageBatchRecord:
    """A copy of ``msg`` holding only the given samples (same identity and dictionaries):
    the dead-letter form of a batch's unresolved samples."""
    picks = np.asarray(sample_indexes, dtype=np.int64)
    src = msg.samples
    out = usage_record_pb2.UsageBatchRecord(
        agent_id=msg.agent_id,
        seq=msg.seq,
        received_at_unix_ms=msg.received_at_unix_ms,
        collector_id=msg.collector_id,
    )
    dst = out.samples
    dst.resource_dict.extend(src.resource_dict)
    dst.meter_dict.extend(src.meter_dict)
    dst.resource_index.extend(np.array(src.resource_index, dtype=np.int64)[picks].tolist())
    dst.meter_index.extend(np.array(src.meter_index, dtype=np.int64)[picks].tolist())
    dst.start_unix_s.extend(np.array(src.start_unix_s, dtype=np.int64)[picks].tolist())
    dst.duration_s.extend(np.array(src.duration_s, dtype=np.int64)[picks].tolist())
    dst.value.extend(np.array(src.value, dtype=np.int64)[picks].tolist())
    return out
