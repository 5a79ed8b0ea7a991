"""Edge validation: every reject code, malformed batches, accepted columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from collectors.auth import Scope
from collectors.directory import LIMIT_MAXIMA, Directory, Limits, MeterRule
from collectors.lifecycle import LIFECYCLE_ONLY_CODES
from collectors.validation import (
    FIELD_OF_CODE,
    RULE_ORDER,
    MalformedBatchError,
    accepted_columns,
    decode_batch,
    encode_columns,
    resource_id_problem,
    validate,
)
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import samples_pb2

NOW = 1_793_491_200  # 2026-11-01T00:00:00Z
HOUR = 3600
DIRECTORY = Directory(
    meters={
        "net.egress.bytes": MeterRule(max_lateness_s=35 * 24 * HOUR),
        "cpu.usage.millicpu_seconds": MeterRule(max_lateness_s=2 * HOUR),
    },
    resource_ids=frozenset({"srv-1", "srv-2", "vol-1"}),
)
LIMITS = Limits()


@dataclass(frozen=True)
class S:
    """One sample, written as a row for readability of the tests."""

    resource: str = "srv-1"
    meter: str = "net.egress.bytes"
    start: int = NOW - HOUR
    duration: int = 300
    value: int = 1000


def batch_of(samples: Sequence[S], agent_id: str = "agent-1", seq: int = 1) -> bytes:
    cols = encode_columns(
        [s.resource for s in samples],
        [s.meter for s in samples],
        [s.start for s in samples],
        [s.duration for s in samples],
        [s.value for s in samples],
    )
    return agent_pb2.SampleBatch(agent_id=agent_id, seq=seq, samples=cols).SerializeToString()


def judge(samples: Sequence[S]) -> tuple[agent_pb2.SampleBatch, list[tuple[int, int, str]]]:
    batch = decode_batch(batch_of(samples))
    verdict = validate(batch, DIRECTORY, LIMITS, NOW)
    return batch, [(r.index, r.code, r.field) for r in verdict.rejections]


# --- per-sample rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "code", "field"),
    [
        (S(meter="gpu.hours"), agent_pb2.UNKNOWN_METER, "meter_index"),
        (S(resource="srv-404"), agent_pb2.UNKNOWN_RESOURCE, "resource_index"),
        (S(value=-1), agent_pb2.NEGATIVE_QUANTITY, "value"),
        (S(value=2**50 + 1), agent_pb2.QUANTITY_OVERFLOW, "value"),
        (S(duration=0), agent_pb2.INTERVAL_OUT_OF_RANGE, "duration_s"),
        (S(duration=HOUR + 1), agent_pb2.INTERVAL_OUT_OF_RANGE, "duration_s"),
        # ends 301 s after the collector clock (skew 300 s)
        (S(start=NOW + 1, duration=300), agent_pb2.TIMESTAMP_OUT_OF_RANGE, "start_unix_s"),
        # starts more than the meter's max lateness (2 h for cpu) before the clock
        (
            S(meter="cpu.usage.millicpu_seconds", start=NOW - 2 * HOUR - 1),
            agent_pb2.TIMESTAMP_OUT_OF_RANGE,
            "start_unix_s",
        ),
        (S(start=NOW - 35 * 24 * HOUR - 1), agent_pb2.TIMESTAMP_OUT_OF_RANGE, "start_unix_s"),
    ],
)
def test_a_bad_sample_is_rejected_alone_with_its_code(bad: S, code: int, field: str) -> None:
    good = S()
    batch, rejections = judge([good, bad, good, S(resource="srv-2", value=0)])
    assert rejections == [(1, code, field)]
    verdict = validate(batch, DIRECTORY, LIMITS, NOW)
    assert verdict.accepted_mask.tolist() == [True, False, True, True]
    assert verdict.accepted_count == 3
    assert verdict.rejections[0].detail  # says what is wrong


def test_boundaries_that_are_still_accepted() -> None:
    _, rejections = judge(
        [
            S(value=0),
            S(value=2**50),
            S(duration=1),
            S(duration=HOUR),
            S(start=NOW + 300 - 300, duration=300),  # ends exactly at now + skew
            S(meter="cpu.usage.millicpu_seconds", start=NOW - 2 * HOUR),  # exactly max lateness
        ]
    )
    assert rejections == []


def test_each_sample_gets_only_the_first_failing_rule() -> None:
    everything_wrong = S(
        meter="gpu.hours", resource="srv-404", value=-5, duration=0, start=NOW + 10**6
    )
    _, rejections = judge([everything_wrong, S(resource="srv-404", value=-5), S(value=-5)])
    assert rejections == [
        (0, agent_pb2.UNKNOWN_METER, "meter_index"),
        (1, agent_pb2.UNKNOWN_RESOURCE, "resource_index"),
        (2, agent_pb2.NEGATIVE_QUANTITY, "value"),
    ]


def test_rule_order_covers_every_reject_code_once() -> None:
    codes = set(agent_pb2.RejectCode.values()) - {agent_pb2.REJECT_CODE_UNSPECIFIED}
    codes -= LIFECYCLE_ONLY_CODES  # lifecycle events only (collectors/lifecycle.py)
    assert sorted(RULE_ORDER) == sorted(codes)
    assert set(FIELD_OF_CODE) == codes


def test_details_name_the_problem() -> None:
    batch = decode_batch(
        batch_of([S(meter="gpu.hours"), S(resource="srv-404"), S(value=-7), S(start=NOW + 10)])
    )
    details = [r.detail for r in validate(batch, DIRECTORY, LIMITS, NOW).rejections]
    assert "gpu.hours" in details[0]
    assert "srv-404" in details[1]
    assert "-7" in details[2]
    assert "after the collector clock" in details[3]


def test_every_sample_rejected_and_empty_batch() -> None:
    batch, rejections = judge([S(value=-1), S(value=-2)])
    assert [r[0] for r in rejections] == [0, 1]
    assert len(accepted_columns(batch, np.zeros(2, dtype=np.bool_)).value) == 0

    empty = decode_batch(agent_pb2.SampleBatch(agent_id="a", seq=3).SerializeToString())
    verdict = validate(empty, DIRECTORY, LIMITS, NOW)
    assert verdict.sample_count == 0
    assert verdict.rejections == ()


# --- malformed batches ------------------------------------------------------------------


def raw(
    agent_id: str = "agent-1",
    seq: int = 1,
    cols: samples_pb2.SampleColumns | None = None,
) -> bytes:
    if cols is None:
        cols = samples_pb2.SampleColumns(
            resource_dict=["srv-1"],
            meter_dict=["net.egress.bytes"],
            resource_index=[0, 0],
            meter_index=[0, 0],
            start_unix_s=[NOW - HOUR, NOW - HOUR],
            duration_s=[300, 300],
            value=[1, 2],
        )
    return agent_pb2.SampleBatch(agent_id=agent_id, seq=seq, samples=cols).SerializeToString()


def cols_with(**changes: list[int] | list[str]) -> samples_pb2.SampleColumns:
    cols = agent_pb2.SampleBatch.FromString(raw()).samples
    for name, values in changes.items():
        cols.ClearField(name)  # type: ignore[arg-type]
        getattr(cols, name).extend(values)
    return cols


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xff\xff", "not a meterline.agent.v1.SampleBatch"),
        (b"\x0a\x05ab", "not a meterline.agent.v1.SampleBatch"),  # truncated field
        (b"\x0a\x02\xff\xfe", "not a meterline.agent.v1.SampleBatch"),  # agent_id not UTF-8
        (raw(agent_id=""), "agent_id is empty"),
        (raw(seq=0), "seq must be >= 1"),
        (raw(cols=cols_with(value=[1])), "columns of unequal length"),
        (raw(cols=cols_with(duration_s=[1, 2, 3])), "duration_s=3"),
        (raw(cols=cols_with(resource_index=[0, 1])), "resource_index[1] = 1 is out of range"),
        (raw(cols=cols_with(meter_index=[7, 0])), "meter_index[0] = 7 is out of range"),
        (raw(cols=cols_with(meter_index=[0, 0], meter_dict=[])), "meter_index[0] = 0"),
        (raw(cols=cols_with(resource_dict=["a", "b", "c"])), "resource_dict has 3 entries"),
    ],
)
def test_malformed_batches_raise_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(MalformedBatchError) as caught:
        decode_batch(data)
    assert message in str(caught.value)


def test_too_many_samples_and_too_many_bytes() -> None:
    limits = Limits(max_samples_per_batch=3, max_message_bytes=10_000)
    four = batch_of([S()] * 4)
    with pytest.raises(MalformedBatchError, match="4 samples exceed the limit of 3"):
        decode_batch(four, limits)
    decode_batch(batch_of([S()] * 3), limits)
    with pytest.raises(MalformedBatchError, match="exceeds the limit of 10000 bytes"):
        decode_batch(b"\x00" * 10_001, limits)


def test_where_is_named_in_the_message() -> None:
    with pytest.raises(MalformedBatchError, match=r"agent_id='agent-9' seq=4"):
        decode_batch(raw(agent_id="agent-9", seq=4, cols=cols_with(value=[])))


# --- accepted columns -------------------------------------------------------------------


def rows(cols: samples_pb2.SampleColumns) -> list[tuple[str, str, int, int, int]]:
    return [
        (
            cols.resource_dict[cols.resource_index[i]],
            cols.meter_dict[cols.meter_index[i]],
            cols.start_unix_s[i],
            cols.duration_s[i],
            cols.value[i],
        )
        for i in range(len(cols.value))
    ]


def test_accepted_columns_keep_exactly_the_accepted_samples() -> None:
    samples = [
        S(resource="vol-1", value=10),
        S(resource="srv-404", value=11),
        S(resource="srv-2", meter="cpu.usage.millicpu_seconds", value=12),
        S(meter="gpu.hours", value=13),
        S(resource="srv-2", value=14, start=NOW - 600),
    ]
    batch, _ = judge(samples)
    verdict = validate(batch, DIRECTORY, LIMITS, NOW)
    out = accepted_columns(batch, verdict.accepted_mask)
    assert rows(out) == [
        ("vol-1", "net.egress.bytes", NOW - HOUR, 300, 10),
        ("srv-2", "cpu.usage.millicpu_seconds", NOW - HOUR, 300, 12),
        ("srv-2", "net.egress.bytes", NOW - 600, 300, 14),
    ]
    # Dictionaries are compact: rejected-only entries are gone, each entry is used.
    assert sorted(out.resource_dict) == ["srv-2", "vol-1"]
    assert sorted(out.meter_dict) == ["cpu.usage.millicpu_seconds", "net.egress.bytes"]
    assert set(out.resource_index) == set(range(len(out.resource_dict)))
    assert set(out.meter_index) == set(range(len(out.meter_dict)))


def test_accepted_columns_pass_through_when_all_accepted() -> None:
    batch, rejections = judge([S(), S(resource="srv-2")])
    assert rejections == []
    assert accepted_columns(batch, np.ones(2, dtype=np.bool_)) is batch.samples


def test_limits_refuse_values_outside_their_documented_range() -> None:
    with pytest.raises(ValueError, match="max_samples_per_batch"):
        Limits(max_samples_per_batch=0)
    with pytest.raises(ValueError, match="max_value"):
        Limits(max_value=2**60)
    with pytest.raises(ValueError, match="min_duration_s"):
        Limits(min_duration_s=10, max_duration_s=5)
    with pytest.raises(ValueError, match="max_lateness_s"):
        MeterRule(max_lateness_s=-1)


# --- resource ids and scope --------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "problem"),
    [
        ("", "resource id is empty"),
        ("s" * 257, "257 bytes exceeds the limit of 256 bytes"),
        ("\u00e9" * 129, "258 bytes exceeds the limit of 256 bytes"),  # 2 UTF-8 bytes each
        ("srv\x00-1", "control character"),
        ("srv-1\n", "control character"),
        ("srv\x7f", "control character"),
        ("srv\x85", "control character"),  # C1 (NEXT LINE)
    ],
)
def test_malformed_resource_ids_are_rejected_with_their_problem(
    resource: str, problem: str
) -> None:
    batch = decode_batch(batch_of([S(), S(resource=resource), S(resource=resource, value=-1)]))
    verdict = validate(batch, DIRECTORY, LIMITS, NOW)
    assert [(r.index, r.code, r.field) for r in verdict.rejections] == [
        (1, agent_pb2.MALFORMED_RESOURCE_ID, "resource_index"),
        (2, agent_pb2.MALFORMED_RESOURCE_ID, "resource_index"),  # before NEGATIVE_QUANTITY
    ]
    assert problem in verdict.rejections[0].detail
    assert len(verdict.rejections[0].detail) < 200  # a long id is cut in the detail


def test_resource_id_length_boundary_is_accepted_and_well_formed_unicode_is_fine() -> None:
    directory = Directory(
        meters=DIRECTORY.meters,
        resource_ids=frozenset({"s" * 256, "\u00e9" * 128, "serveur-\u00e9t\u00e9 1"}),
    )
    batch = decode_batch(
        batch_of([S(resource="s" * 256), S(resource="\u00e9" * 128), S(resource="serveur-été 1")])
    )
    assert validate(batch, directory, LIMITS, NOW).rejections == ()
    assert resource_id_problem("s" * 256, LIMITS) is None
    assert resource_id_problem("s" * 10, Limits(max_resource_id_bytes=9)) is not None


def test_scope_forbids_resources_outside_it_before_telling_whether_they_exist() -> None:
    scope = Scope.of(["srv-1"])
    batch = decode_batch(
        batch_of([S(), S(resource="srv-2"), S(resource="srv-404"), S(resource=""), S(value=-1)])
    )
    verdict = validate(batch, DIRECTORY, LIMITS, NOW, scope)
    assert [(r.index, r.code) for r in verdict.rejections] == [
        (1, agent_pb2.FORBIDDEN_RESOURCE),
        (2, agent_pb2.FORBIDDEN_RESOURCE),  # unknown too, but the agent is not told
        (3, agent_pb2.MALFORMED_RESOURCE_ID),
        (4, agent_pb2.NEGATIVE_QUANTITY),
    ]
    assert "outside the scope" in verdict.rejections[0].detail
    # "*" and no scope at all (auth off) forbid nothing.
    for open_scope in (Scope.of(["*"]), None):
        codes = [r.code for r in validate(batch, DIRECTORY, LIMITS, NOW, open_scope).rejections]
        assert agent_pb2.FORBIDDEN_RESOURCE not in codes


# --- labels ------------------------------------------------------------------------------

Labels = Sequence[tuple[str, str]]  # pairs, so that a set may repeat a key


def labelled(
    samples: Sequence[S], label_sets: Sequence[Labels], index: Sequence[int]
) -> agent_pb2.SampleBatch:
    """A decoded batch of ``samples`` with the given label dictionary and per-sample index."""
    batch = agent_pb2.SampleBatch.FromString(batch_of(samples))
    for pairs in label_sets:
        batch.samples.label_sets.add().labels.extend(
            samples_pb2.Label(key=k, value=v) for k, v in pairs
        )
    batch.samples.label_set_index.extend(index)
    return decode_batch(batch.SerializeToString())


def labels_of(cols: samples_pb2.SampleColumns) -> list[list[tuple[str, str]]]:
    return [
        [(label.key, label.value) for label in cols.label_sets[j].labels]
        for j in cols.label_set_index
    ]


GOOD_LABELS = [("region", "eu-west"), ("tier", "gold")]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ([(f"k{i}", "v") for i in range(17)], "17 labels exceed the limit of 16 per sample"),
        ([("k" * 65, "v")], "of 65 bytes exceeds the limit of 64 bytes (max_label_key_bytes)"),
        ([("\u00e9" * 33, "v")], "of 66 bytes exceeds the limit of 64 bytes"),
        ([("k", "v" * 257)], "of 257 bytes exceeds the limit of 256 bytes (max_label_value_bytes)"),
        ([("", "v")], "a label key is empty"),
        ([("re\ngion", "v")], "contains a control character"),
        ([("k\x85", "v")], "contains a control character"),
        ([("region", "a"), ("tier", "b"), ("region", "c")], "label key 'region' is repeated"),
    ],
)
def test_a_label_set_over_a_limit_rejects_only_its_samples(bad: Labels, problem: str) -> None:
    batch = labelled(
        [S(), S(value=2), S(value=3), S(value=-1)], [GOOD_LABELS, bad, []], [0, 1, 2, 1]
    )
    verdict = validate(batch, DIRECTORY, LIMITS, NOW)
    assert [(r.index, r.code, r.field) for r in verdict.rejections] == [
        (1, agent_pb2.LABELS_OUT_OF_RANGE, "label_set_index"),
        (3, agent_pb2.NEGATIVE_QUANTITY, "value"),  # labels are judged last
    ]
    assert problem in verdict.rejections[0].detail
    assert "(label set 1)" in verdict.rejections[0].detail
    kept = accepted_columns(batch, verdict.accepted_mask)
    assert list(kept.value) == [1000, 3]
    assert labels_of(kept) == [GOOD_LABELS, []]


def test_label_limits_boundaries_are_accepted_and_limits_are_settings() -> None:
    at_limit = [
        [(f"k{i:02}", "v") for i in range(16)],
        [("k" * 64, "v" * 256)],
        [("\u00e9" * 32, "\u00e9" * 128), ("\u30e9\u30d9\u30eb", "\x00\n")],  # values: any text
    ]
    batch = labelled([S(), S(), S()], at_limit, [0, 1, 2])
    assert validate(batch, DIRECTORY, LIMITS, NOW).rejections == ()
    tight = Limits(max_labels_per_sample=15, max_label_key_bytes=63, max_label_value_bytes=255)
    verdict = validate(batch, DIRECTORY, tight, NOW)
    assert [(r.index, r.code) for r in verdict.rejections] == [
        (0, agent_pb2.LABELS_OUT_OF_RANGE),
        (1, agent_pb2.LABELS_OUT_OF_RANGE),
        (2, agent_pb2.LABELS_OUT_OF_RANGE),
    ]
    assert "16 labels exceed the limit of 15 per sample" in verdict.rejections[0].detail
    assert "64 bytes exceeds the limit of 63 bytes (max_label_key_bytes)" in (
        verdict.rejections[1].detail
    )
    assert "64 bytes exceeds the limit of 63 bytes (max_label_key_bytes)" in (
        verdict.rejections[2].detail  # 32 two-byte characters
    )
    loose_keys = Limits(max_label_value_bytes=255)
    verdict = validate(batch, DIRECTORY, loose_keys, NOW)
    assert [r.index for r in verdict.rejections] == [1, 2]
    assert "256 bytes exceeds the limit of 255 bytes (max_label_value_bytes)" in (
        verdict.rejections[1].detail  # 128 two-byte characters
    )
    for name in (
        "max_labels_per_sample",
        "max_label_key_bytes",
        "max_label_value_bytes",
        "max_label_sets_per_batch",
    ):
        with pytest.raises(ValueError, match=name):
            Limits(**{name: 0})
        with pytest.raises(ValueError, match=name):
            Limits(**{name: LIMIT_MAXIMA[name] + 1})


def with_labels(label_sets: int, index: list[int]) -> bytes:
    cols = cols_with()
    for _ in range(label_sets):
        cols.label_sets.add().labels.add(key="k", value="v")
    cols.label_set_index.extend(index)
    return raw(cols=cols)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (with_labels(1, [0]), "label_set_index has 1 entries for 2 samples"),
        (with_labels(1, [0, 0, 0]), "label_set_index has 3 entries for 2 samples"),
        (with_labels(1, [0, 1]), "label_set_index[1] = 1 is out of range for label_sets of 1"),
        (with_labels(0, [0, 0]), "label_set_index[0] = 0 is out of range"),
        (with_labels(1, []), "label_sets has 1 entries but label_set_index is empty"),
        (with_labels(3, [0, 1]), "label_sets has 3 entries for 2 samples"),
    ],
)
def test_malformed_labels_raise_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(MalformedBatchError) as caught:
        decode_batch(data)
    assert message in str(caught.value)


def test_too_many_label_sets_make_the_batch_malformed() -> None:
    limits = Limits(max_label_sets_per_batch=1)
    decode_batch(with_labels(1, [0, 0]), limits)
    with pytest.raises(
        MalformedBatchError,
        match=r"2 label sets exceed the limit of 1 per batch \(max_label_sets_per_batch\)",
    ):
        decode_batch(with_labels(2, [0, 1]), limits)


def test_accepted_columns_compact_the_label_sets_of_accepted_samples() -> None:
    sets: list[Labels] = [[("a", "1")], [("b", "2")], [], [("c", "3")]]
    samples = [S(value=1), S(resource="srv-404"), S(value=3), S(value=4), S(meter="gpu.hours")]
    batch = labelled(samples, sets, [3, 1, 2, 3, 0])
    verdict = validate(batch, DIRECTORY, LIMITS, NOW)
    kept = accepted_columns(batch, verdict.accepted_mask)
    assert list(kept.value) == [1, 3, 4]
    assert labels_of(kept) == [[("c", "3")], [], [("c", "3")]]
    assert len(kept.label_sets) == 2  # ("a",) and ("b",) only had rejected samples
    rejected = accepted_columns(batch, ~verdict.accepted_mask)  # the rejects topic's view
    assert labels_of(rejected) == [[("b", "2")], [("a", "1")]]
    # No labels in, no labels out; all accepted: the very same columns, labels and all.
    plain, _ = judge([S(), S(resource="srv-404")])
    assert not accepted_columns(plain, np.array([True, False])).label_set_index
    all_good = labelled([S(), S()], [GOOD_LABELS], [0, 0])
    assert accepted_columns(all_good, np.ones(2, dtype=np.bool_)) is all_good.samples
