"""Lifecycle events at the edge: decode a ``LifecycleBatch``, judge every event.

Pure (no I/O). Lifecycle events are control-plane traffic (a handful per resource over its
life), so each event is judged by plain Python; the batch size is bounded by
``Limits.max_events_per_batch``.

A batch that is not a well-formed batch raises :class:`MalformedLifecycleBatchError` (the
gRPC adapter answers ``INVALID_ARGUMENT``): bytes that are not a ``LifecycleBatch``, more
than ``max_message_bytes``, an empty ``agent_id``, no event, more than
``max_events_per_batch`` events. Otherwise each event is accepted or gets exactly one
rejection, the first rule it fails, in this order::

    MALFORMED_EVENT        event_id            empty, over 128 UTF-8 bytes, control character
    MALFORMED_EVENT        kind                unspecified or unknown
    MALFORMED_RESOURCE_ID  resource_id         as for samples
    FORBIDDEN_RESOURCE     resource_id         outside the token's scope
    UNKNOWN_RESOURCE       resource_id         not in the directory (the catalog)
    MALFORMED_EVENT        plan_id             given on DELETED
    UNKNOWN_PLAN           plan_id             missing or unknown on CREATED/RESIZED/MOVED
    MALFORMED_EVENT        subscription_id     given on DELETED
    UNKNOWN_SUBSCRIPTION   subscription_id     missing on MOVED, or given and unknown
    TIMESTAMP_OUT_OF_RANGE occurred_at_unix_s  > now + max_clock_skew_s, or
                                               < now - max_event_lateness_s

Boundaries are inclusive on the accepted side, as for samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from google.protobuf.message import DecodeError

from collectors.auth import Scope
from collectors.directory import Directory, Limits
from collectors.validation import CONTROL_CHARACTERS, resource_id_problem
from meterline_proto.agent.v1 import agent_pb2
from meterline_proto.usage.v1 import lifecycle_pb2

RejectCode: TypeAlias = agent_pb2.RejectCode.ValueType

MAX_EVENT_ID_BYTES = 128
# Codes only lifecycle events get (samples never do: not in validation.RULE_ORDER).
LIFECYCLE_ONLY_CODES: frozenset[RejectCode] = frozenset(
    {agent_pb2.UNKNOWN_PLAN, agent_pb2.UNKNOWN_SUBSCRIPTION, agent_pb2.MALFORMED_EVENT}
)
KINDS = frozenset(
    {lifecycle_pb2.CREATED, lifecycle_pb2.RESIZED, lifecycle_pb2.DELETED, lifecycle_pb2.MOVED}
)
DETAIL_ID_CHARS = 80


class MalformedLifecycleBatchError(ValueError):
    """The bytes are not a well-formed LifecycleBatch (gRPC ``INVALID_ARGUMENT``)."""


@dataclass(frozen=True, slots=True)
class LifecycleVerdict:
    accepted: tuple[lifecycle_pb2.LifecycleEvent, ...]  # in batch order
    rejections: tuple[agent_pb2.LifecycleRejection, ...]  # by event_index


def decode_lifecycle_batch(raw: bytes, limits: Limits) -> agent_pb2.LifecycleBatch:
    if len(raw) > limits.max_message_bytes:
        raise MalformedLifecycleBatchError(
            f"message of {len(raw)} bytes exceeds the limit of {limits.max_message_bytes} bytes"
        )
    batch = agent_pb2.LifecycleBatch()
    try:
        batch.ParseFromString(raw)
    except DecodeError as exc:
        raise MalformedLifecycleBatchError(f"not a LifecycleBatch: {exc}") from None
    if not batch.agent_id:
        raise MalformedLifecycleBatchError("agent_id is empty")
    if not batch.events:
        raise MalformedLifecycleBatchError("the batch holds no event")
    if len(batch.events) > limits.max_events_per_batch:
        raise MalformedLifecycleBatchError(
            f"{len(batch.events)} events exceed the limit of {limits.max_events_per_batch} "
            "per batch"
        )
    return batch


def _cut(text: str) -> str:
    return text if len(text) <= DETAIL_ID_CHARS else text[:DETAIL_ID_CHARS] + "..."


def event_problem(
    event: lifecycle_pb2.LifecycleEvent,
    directory: Directory,
    limits: Limits,
    now_unix_s: int,
    scope: Scope | None,
) -> tuple[RejectCode, str, str] | None:
    """The first rule ``event`` fails as (code, field, detail), or None when it is valid."""
    event_id = event.event_id
    if not event_id:
        return agent_pb2.MALFORMED_EVENT, "event_id", "event_id is empty"
    if len(event_id.encode()) > MAX_EVENT_ID_BYTES:
        return (
            agent_pb2.MALFORMED_EVENT,
            "event_id",
            f"event_id exceeds {MAX_EVENT_ID_BYTES} bytes",
        )
    if CONTROL_CHARACTERS.search(event_id):
        return agent_pb2.MALFORMED_EVENT, "event_id", "event_id contains a control character"
    if event.kind not in KINDS:
        return agent_pb2.MALFORMED_EVENT, "kind", f"kind {event.kind} is unspecified or unknown"
    resource_id = event.resource_id
    problem = resource_id_problem(resource_id, limits)
    if problem is not None:
        return agent_pb2.MALFORMED_RESOURCE_ID, "resource_id", problem
    if scope is not None and not scope.allows(resource_id):
        return (
            agent_pb2.FORBIDDEN_RESOURCE,
            "resource_id",
            f"resource {_cut(resource_id)!r} is outside this agent's scope",
        )
    if resource_id not in directory.resource_ids:
        return (
            agent_pb2.UNKNOWN_RESOURCE,
            "resource_id",
            f"unknown resource {_cut(resource_id)!r}",
        )
    deleted = event.kind == lifecycle_pb2.DELETED
    if deleted and event.plan_id:
        return agent_pb2.MALFORMED_EVENT, "plan_id", "a DELETED event names no plan"
    if not deleted and event.plan_id not in directory.plan_ids:
        detail = (
            f"unknown plan {_cut(event.plan_id)!r}"
            if event.plan_id
            else f"a {lifecycle_pb2.LifecycleKind.Name(event.kind)} event names its plan"
        )
        return agent_pb2.UNKNOWN_PLAN, "plan_id", detail
    subscription_id = event.subscription_id
    if deleted and subscription_id:
        return (
            agent_pb2.MALFORMED_EVENT,
            "subscription_id",
            "a DELETED event names no subscription",
        )
    if event.kind == lifecycle_pb2.MOVED and not subscription_id:
        return (
            agent_pb2.UNKNOWN_SUBSCRIPTION,
            "subscription_id",
            "a MOVED event names the subscription it moves to",
        )
    if subscription_id and subscription_id not in directory.subscription_ids:
        return (
            agent_pb2.UNKNOWN_SUBSCRIPTION,
            "subscription_id",
            f"unknown subscription {_cut(subscription_id)!r}",
        )
    at = event.occurred_at_unix_s
    if at > now_unix_s + limits.max_clock_skew_s:
        return (
            agent_pb2.TIMESTAMP_OUT_OF_RANGE,
            "occurred_at_unix_s",
            (
                f"occurred at {at}, more than {limits.max_clock_skew_s} s after the collector's "
                f"clock ({now_unix_s})"
            ),
        )
    if at < now_unix_s - limits.max_event_lateness_s:
        return (
            agent_pb2.TIMESTAMP_OUT_OF_RANGE,
            "occurred_at_unix_s",
            (
                f"occurred at {at}, more than {limits.max_event_lateness_s} s before the "
                f"collector's clock ({now_unix_s})"
            ),
        )
    return None


def validate_lifecycle(
    batch: agent_pb2.LifecycleBatch,
    directory: Directory,
    limits: Limits,
    now_unix_s: int,
    scope: Scope | None = None,
) -> LifecycleVerdict:
    """Judge every event of a well-formed batch; one bad event never sinks the others."""
    accepted: list[lifecycle_pb2.LifecycleEvent] = []
    rejections: list[agent_pb2.LifecycleRejection] = []
    for index, event in enumerate(batch.events):
        problem = event_problem(event, directory, limits, now_unix_s, scope)
        if problem is None:
            accepted.append(event)
        else:
            code, field, detail = problem
            rejections.append(
                agent_pb2.LifecycleRejection(
                    event_index=index, code=code, field=field, detail=detail
                )
            )
    return LifecycleVerdict(tuple(accepted), tuple(rejections))
