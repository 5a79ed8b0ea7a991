"""Edge validation of lifecycle events: every rule, its code and field, and malformed batches."""

from __future__ import annotations

from typing import TypeAlias

import pytest

from collectors.auth import Scope
from collectors.directory import Directory, Limits
from collectors.lifecycle import (
    MalformedLifecycleBatchError,
    decode_lifecycle_batch,
    validate_lifecycle,
)
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import lifecycle_pb2

NOW = 1_793_491_200
LIMITS = Limits()
DIRECTORY = Directory(
    meters={},
    resource_ids=frozenset({"srv-1", "srv-2"}),
    plan_ids=frozenset({"small", "large"}),
    subscription_ids=frozenset({"sub-1", "sub-2"}),
)
Kind: TypeAlias = lifecycle_pb2.LifecycleKind.ValueType


def ev(
    kind: Kind = lifecycle_pb2.CREATED,
    *,
    event_id: str = "e",
    resource: str = "srv-1",
    plan: str = "small",
    subscription: str = "",
    at: int = NOW - 60,
) -> lifecycle_pb2.LifecycleEvent:
    return lifecycle_pb2.LifecycleEvent(
        event_id=event_id, resource_id=resource, kind=kind, plan_id=plan,
        subscription_id=subscription, occurred_at_unix_s=at,
    )  # fmt: skip


CASES: list[tuple[lifecycle_pb2.LifecycleEvent, str, str]] = [
    (ev(event_id=""), "MALFORMED_EVENT", "event_id"),
    (ev(event_id="x" * 129), "MALFORMED_EVENT", "event_id"),
    (ev(event_id="a\nb"), "MALFORMED_EVENT", "event_id"),
    (ev(lifecycle_pb2.LIFECYCLE_KIND_UNSPECIFIED), "MALFORMED_EVENT", "kind"),
    (ev(resource=""), "MALFORMED_RESOURCE_ID", "resource_id"),
    (ev(resource="srv-2"), "FORBIDDEN_RESOURCE", "resource_id"),
    (ev(resource="srv-9"), "UNKNOWN_RESOURCE", "resource_id"),
    (ev(lifecycle_pb2.DELETED), "MALFORMED_EVENT", "plan_id"),
    (ev(plan=""), "UNKNOWN_PLAN", "plan_id"),
    (ev(lifecycle_pb2.RESIZED, plan="huge"), "UNKNOWN_PLAN", "plan_id"),
    (ev(lifecycle_pb2.DELETED, plan="", subscription="sub-1"), "MALFORMED_EVENT", "subscription_id"),  # noqa: E501
    (ev(lifecycle_pb2.MOVED), "UNKNOWN_SUBSCRIPTION", "subscription_id"),
    (ev(subscription="sub-9"), "UNKNOWN_SUBSCRIPTION", "subscription_id"),
    (ev(at=NOW + LIMITS.max_clock_skew_s + 1), "TIMESTAMP_OUT_OF_RANGE", "occurred_at_unix_s"),
    (ev(at=NOW - LIMITS.max_event_lateness_s - 1), "TIMESTAMP_OUT_OF_RANGE", "occurred_at_unix_s"),
]  # fmt: skip

VALID = [
    ev(),
    ev(lifecycle_pb2.RESIZED, plan="large", subscription="sub-2"),
    ev(lifecycle_pb2.MOVED, plan="large", subscription="sub-2"),
    ev(lifecycle_pb2.DELETED, plan=""),
    ev(at=NOW + LIMITS.max_clock_skew_s),  # boundaries are accepted
    ev(at=NOW - LIMITS.max_event_lateness_s),
]


def test_each_rule_rejects_with_its_code_and_field_and_the_good_events_pass() -> None:
    batch = agent_pb2.LifecycleBatch(
        agent_id="agent-1", events=[*VALID, *(case for case, _, _ in CASES)]
    )
    verdict = validate_lifecycle(batch, DIRECTORY, LIMITS, NOW, Scope.of(["srv-1", "srv-9"]))
    assert list(verdict.accepted) == VALID
    got = [(r.event_index, agent_pb2.RejectCode.Name(r.code), r.field) for r in verdict.rejections]
    assert got == [(len(VALID) + i, code, field) for i, (_, code, field) in enumerate(CASES)]
    assert all(r.detail for r in verdict.rejections)


def test_without_a_scope_every_known_resource_is_allowed() -> None:
    batch = agent_pb2.LifecycleBatch(agent_id="a", events=[ev(resource="srv-2")])
    assert len(validate_lifecycle(batch, DIRECTORY, LIMITS, NOW).accepted) == 1


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xff", "not a LifecycleBatch"),
        (agent_pb2.LifecycleBatch(events=[ev()]).SerializeToString(), "agent_id is empty"),
        (agent_pb2.LifecycleBatch(agent_id="a").SerializeToString(), "no event"),
        (
            agent_pb2.LifecycleBatch(agent_id="a", events=[ev()] * 3).SerializeToString(),
            "3 events exceed the limit of 2",
        ),
    ],
)
def test_malformed_batches_are_refused_whole(raw: bytes, problem: str) -> None:
    with pytest.raises(MalformedLifecycleBatchError, match=problem):
        decode_lifecycle_batch(raw, Limits(max_events_per_batch=2))
