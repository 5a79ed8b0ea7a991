"""A slow, obviously correct reference of ``validation.validate``: one sample at a time.

Not on the data path (a Python loop per sample): property tests prove the vectorised
``validate`` equal to it.
"""

from __future__ import annotations

import unicodedata

from collectors.auth import Scope
from collectors.directory import Directory, Limits
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import samples_pb2


def _malformed(resource: str, limits: Limits) -> bool:
    return (
        not resource
        or len(resource.encode()) > limits.max_resource_id_bytes
        or any(unicodedata.category(ch) == "Cc" for ch in resource)
    )


def _labels_out_of_range(label_set: samples_pb2.LabelSet, limits: Limits) -> bool:
    keys = [label.key for label in label_set.labels]
    return (
        len(keys) > limits.max_labels_per_sample
        or len(set(keys)) != len(keys)
        or any(
            not key
            or len(key.encode()) > limits.max_label_key_bytes
            or any(unicodedata.category(ch) == "Cc" for ch in key)
            for key in keys
        )
        or any(
            len(label.value.encode()) > limits.max_label_value_bytes for label in label_set.labels
        )
    )


def reference_codes(
    batch: agent_pb2.SampleBatch,
    directory: Directory,
    limits: Limits,
    now_unix_s: int,
    scope: Scope | None = None,
) -> list[int]:
    """Per sample: 0 when accepted, else the code of the first rule it fails."""
    cols = batch.samples
    codes: list[int] = []
    for i in range(len(cols.value)):
        meter = cols.meter_dict[cols.meter_index[i]]
        resource = cols.resource_dict[cols.resource_index[i]]
        value = cols.value[i]
        start = cols.start_unix_s[i]
        duration = cols.duration_s[i]
        rule = directory.meters.get(meter)
        code: int
        if rule is None:
            code = agent_pb2.UNKNOWN_METER
        elif _malformed(resource, limits):
            code = agent_pb2.MALFORMED_RESOURCE_ID
        elif scope is not None and not scope.allows(resource):
            code = agent_pb2.FORBIDDEN_RESOURCE
        elif resource not in directory.resource_ids:
            code = agent_pb2.UNKNOWN_RESOURCE
        elif value < 0:
            code = agent_pb2.NEGATIVE_QUANTITY
        elif value > limits.max_value:
            code = agent_pb2.QUANTITY_OVERFLOW
        elif not limits.min_duration_s <= duration <= limits.max_duration_s:
            code = agent_pb2.INTERVAL_OUT_OF_RANGE
        elif (
            start + duration > now_unix_s + limits.max_clock_skew_s
            or start < now_unix_s - rule.max_lateness_s
        ):
            code = agent_pb2.TIMESTAMP_OUT_OF_RANGE
        elif cols.label_set_index and _labels_out_of_range(
            cols.label_sets[cols.label_set_index[i]], limits
        ):
            code = agent_pb2.LABELS_OUT_OF_RANGE
        else:
            code = 0
        codes.append(code)
    return codes
