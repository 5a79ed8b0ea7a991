"""Properties of decode-and-validate: no exception escapes, every sample judged exactly once,
and the vectorised validator equals the per-sample reference."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.auth import Scope
from collectors.directory import Directory, Limits, MeterRule
from collectors.validation import (
    FIELD_OF_CODE,
    MalformedBatchError,
    accepted_columns,
    decode_batch,
    validate,
)
from collectors.validation_reference import reference_codes
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import samples_pb2

NOW = 1_793_491_200  # 2026-11-01T00:00:00Z
DAY = 86_400
DIRECTORY = Directory(
    meters={"m.counter": MeterRule(35 * DAY), "m.short": MeterRule(3600), "m.zero": MeterRule(0)},
    resource_ids=frozenset({"r-1", "r-2", "r-3"}),
)
LIMITS = Limits(
    max_samples_per_batch=64,
    max_labels_per_sample=3,
    max_label_key_bytes=8,
    max_label_value_bytes=8,
    max_label_sets_per_batch=4,
)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)

names_of_resources = st.sampled_from(
    ["r-1", "r-2", "r-3", "r-x", "", "r-1 ", "r-\x07", "r-\x85", "r" * 257, "\u00e9" * 128]
)
scopes = st.one_of(
    st.none(),
    st.just(Scope.of(["*"])),
    st.lists(st.sampled_from(["r-1", "r-2", "r-x", "r-\x07"]), min_size=1).map(Scope.of),
)
names_of_meters = st.sampled_from(["m.counter", "m.short", "m.zero", "m.unknown", ""])
starts = st.one_of(st.integers(NOW - 40 * DAY, NOW + 2 * 3600), INT64)
durations = st.one_of(st.integers(0, 4000), UINT32)
values = st.one_of(
    st.integers(-5, 5), st.integers(2**50 - 2, 2**50 + 2), st.integers(0, 10**12), INT64
)
label_keys = st.sampled_from(
    ["k", "region", "", "k\x07", "k\x85", "k" * 9, "\u00e9" * 4, "\u00e9" * 5]
)
label_values = st.sampled_from(["", "v", "v" * 8, "v" * 9, "\u00e9" * 4, "\u00e9" * 5, "\n"])
label_sets = st.lists(
    st.builds(samples_pb2.Label, key=label_keys, value=label_values), max_size=5
).map(lambda labels: samples_pb2.LabelSet(labels=labels))


@st.composite
def well_formed_batches(draw: st.DrawFn) -> agent_pb2.SampleBatch:
    n = draw(st.integers(0, LIMITS.max_samples_per_batch))
    res_dict = draw(st.lists(names_of_resources, min_size=min(n, 1), max_size=min(n, 5)))
    met_dict = draw(st.lists(names_of_meters, min_size=min(n, 1), max_size=min(n, 4)))

    def column(elements: st.SearchStrategy[int]) -> list[int]:
        return draw(st.lists(elements, min_size=n, max_size=n))

    cols = samples_pb2.SampleColumns(
        resource_dict=res_dict,
        meter_dict=met_dict,
        resource_index=column(st.integers(0, max(len(res_dict) - 1, 0))),
        meter_index=column(st.integers(0, max(len(met_dict) - 1, 0))),
        start_unix_s=column(starts),
        duration_s=column(durations),
        value=column(values),
    )
    if n and draw(st.booleans()):  # labels: none, or a dictionary and one index per sample
        sets = draw(st.lists(label_sets, min_size=1, max_size=min(n, 4)))
        cols.label_sets.extend(sets)
        cols.label_set_index.extend(column(st.integers(0, len(sets) - 1)))
    agent_id = draw(st.text(min_size=1, max_size=8))
    seq = draw(st.integers(1, 2**64 - 1))
    return agent_pb2.SampleBatch(agent_id=agent_id, seq=seq, samples=cols)


def check_judged_exactly_once(batch: agent_pb2.SampleBatch, scope: Scope | None = None) -> None:
    verdict = validate(batch, DIRECTORY, LIMITS, NOW, scope)
    n = len(batch.samples.value)
    rejected = [r.index for r in verdict.rejections]
    assert len(rejected) == len(set(rejected))
    assert sorted(rejected) == rejected
    assert set(rejected) == set(np.flatnonzero(~verdict.accepted_mask).tolist())
    assert verdict.accepted_count + len(rejected) == n
    for r in verdict.rejections:
        assert r.code in FIELD_OF_CODE
        assert r.field == FIELD_OF_CODE[r.code]
        assert r.detail
    # The vectorised rules equal the per-sample reference.
    codes = [0] * n
    for r in verdict.rejections:
        codes[r.index] = r.code
    assert codes == reference_codes(batch, DIRECTORY, LIMITS, NOW, scope)
    # Exactly the accepted samples survive, in order.
    kept = accepted_columns(batch, verdict.accepted_mask)
    mask = verdict.accepted_mask
    assert list(kept.value) == np.array(batch.samples.value, dtype=np.int64)[mask].tolist()
    assert [kept.resource_dict[i] for i in kept.resource_index] == [
        batch.samples.resource_dict[i] for i in np.array(batch.samples.resource_index)[mask]
    ]
    assert [kept.meter_dict[i] for i in kept.meter_index] == [
        batch.samples.meter_dict[i] for i in np.array(batch.samples.meter_index)[mask]
    ]
    if batch.samples.label_set_index:
        assert [kept.label_sets[i] for i in kept.label_set_index] == [
            batch.samples.label_sets[i] for i in np.array(batch.samples.label_set_index)[mask]
        ]
        if not mask.all():  # compacted (all accepted: the batch's own columns)
            assert len(kept.label_sets) == len(set(kept.label_set_index))
    else:
        assert not kept.label_sets
        assert not kept.label_set_index
    assert len(kept.resource_dict) == len(set(kept.resource_index))
    assert len(kept.meter_dict) == len(set(kept.meter_index))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(well_formed_batches(), scopes)
def test_every_sample_is_accepted_or_rejected_exactly_once(
    batch: agent_pb2.SampleBatch, scope: Scope | None
) -> None:
    decoded = decode_batch(batch.SerializeToString(), LIMITS)  # well-formed: no error
    check_judged_exactly_once(decoded, scope)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_malformed_batch_error(data: bytes) -> None:
    try:
        batch = decode_batch(data, LIMITS)
    except MalformedBatchError:
        return
    check_judged_exactly_once(batch)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(well_formed_batches(), st.data())
def test_corrupted_batches_raise_only_malformed_batch_error(
    batch: agent_pb2.SampleBatch, data: st.DataObject
) -> None:
    raw = bytearray(batch.SerializeToString())
    if raw:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decoded = decode_batch(bytes(raw[:cut]), LIMITS)
    except MalformedBatchError:
        return
    check_judged_exactly_once(decoded)


@st.composite
def labelled_batches(draw: st.DrawFn) -> agent_pb2.SampleBatch:
    """Samples that pass every other rule, so that the labels decide."""
    n = draw(st.integers(1, 16))
    sets = draw(st.lists(label_sets, min_size=1, max_size=min(n, 4)))
    cols = samples_pb2.SampleColumns(
        resource_dict=["r-1"],
        meter_dict=["m.counter"],
        resource_index=[0] * n,
        meter_index=[0] * n,
        start_unix_s=[NOW - 3600] * n,
        duration_s=[60] * n,
        value=draw(st.lists(st.integers(0, 10), min_size=n, max_size=n)),
        label_sets=sets,
        label_set_index=draw(st.lists(st.integers(0, len(sets) - 1), min_size=n, max_size=n)),
    )
    return agent_pb2.SampleBatch(agent_id="a", seq=1, samples=cols)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(labelled_batches())
def test_label_limits_equal_the_reference(batch: agent_pb2.SampleBatch) -> None:
    decoded = decode_batch(batch.SerializeToString(), LIMITS)
    check_judged_exactly_once(decoded)
