"""Resource lifecycle events -> resource spans (pure: protobuf decoding and Polars).

Records of topic ``resource.events.v1`` (``LifecycleRecord``: the accepted events of one
agent batch) become an events frame (``aggregation.ports.EVENTS_SCHEMA``); the spans of a
resource are then derived from ALL its stored events at once, so the result depends only on
the set of events, never on the order in which they arrived:

1. A resource's events are sorted by ``(occurred_at, kind rank, event_id)``, kind rank
   created < resized < moved < deleted (ties at one instant are broken the same way
   everywhere).
2. Every event but ``deleted`` opens a span ``[occurred_at, next event's occurred_at)`` on
   its plan (open-ended when it is the last event): CREATED opens one, RESIZED and MOVED
   close the open span at their instant and open one on the new plan / subscription,
   DELETED only closes.
3. A span that would last zero time (another event at the same instant follows it) is
   dropped: of several events at one instant, the last in the order above decides.
4. Subscription of a span: the event's own ``subscription_id``; if it names none, the last
   one named by an earlier event of the resource; if none did, the resource's subscription
   in the catalog. A span whose subscription cannot be resolved this way (the resource left
   the catalog and no event named one) is left out and reported (``SpanDerivation``).

Consequences: a replayed or duplicated event (same ``(resource_id, event_id)``) is stored
once and changes nothing; an event arriving late (out of order) simply takes its place in
the sorted history and the spans are derived again. A RESIZED/MOVED without an earlier
CREATED opens a span like a CREATED (the resource existed; its creation was not reported);
an event after a DELETED opens a span again (the id was reused). Two adjacent spans on the
same plan and subscription are kept as they are (billing takes the union of a resource's
spans, so they count once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl
from google.protobuf.message import DecodeError

from aggregation.ports import EVENTS_SCHEMA, SPANS_SCHEMA
from meterline_proto.usage.v1 import lifecycle_pb2
from rating.record_codec import RawRecord

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KIND_NAMES: Mapping[int, str] = {
    lifecycle_pb2.CREATED: "created",
    lifecycle_pb2.RESIZED: "resized",
    lifecycle_pb2.MOVED: "moved",
    lifecycle_pb2.DELETED: "deleted",
}
KIND_RANK: Mapping[str, int] = {"created": 0, "resized": 1, "moved": 2, "deleted": 3}
# occurred_at must lie in [1970, 10000): what a Datetime("us") and the stores can hold.
_MAX_UNIX_S = 253_402_300_800


@dataclass(frozen=True, slots=True)
class UndecodableLifecycleRecord:
    record: RawRecord
    error: str


@dataclass(frozen=True, slots=True)
class DecodedLifecycle:
    events: pl.DataFrame  # EVENTS_SCHEMA, in record order
    undecodable: tuple[UndecodableLifecycleRecord, ...]


def _record_problem(message: lifecycle_pb2.LifecycleRecord) -> str | None:
    if not message.agent_id:
        return "agent_id is empty"
    for index, event in enumerate(message.events):
        where = f"event #{index}"
        if not event.event_id or not event.resource_id:
            return f"{where}: event_id and resource_id must not be empty"
        if event.kind not in KIND_NAMES:
            return f"{where}: unknown kind {event.kind}"
        if event.kind != lifecycle_pb2.DELETED and not event.plan_id:
            return f"{where}: a {KIND_NAMES[event.kind]} event names its plan"
        if not 0 <= event.occurred_at_unix_s < _MAX_UNIX_S:
            return f"{where}: occurred_at_unix_s {event.occurred_at_unix_s} is out of range"
    return None


def decode_lifecycle_records(records: Sequence[RawRecord]) -> DecodedLifecycle:
    """The events of ``records`` (a loop per record and per event: lifecycle events are a
    handful per resource, not a data path); records that are not a valid
    ``LifecycleRecord`` are returned apart, with the reason."""
    columns: dict[str, list[object]] = {name: [] for name in EVENTS_SCHEMA}
    undecodable: list[UndecodableLifecycleRecord] = []
    for record in records:
        message = lifecycle_pb2.LifecycleRecord()
        try:
            message.ParseFromString(record.value or b"")
        except DecodeError as exc:
            undecodable.append(UndecodableLifecycleRecord(record, f"not a LifecycleRecord: {exc}"))
            continue
        problem = _record_problem(message)
        if problem is not None:
            undecodable.append(UndecodableLifecycleRecord(record, problem))
            continue
        received_at = EPOCH + timedelta(milliseconds=message.received_at_unix_ms)
        for event in message.events:
            columns["resource_id"].append(event.resource_id)
            columns["event_id"].append(event.event_id)
            columns["kind"].append(KIND_NAMES[event.kind])
            columns["plan_id"].append(event.plan_id)
            columns["subscription_id"].append(event.subscription_id)
            columns["occurred_at"].append(EPOCH + timedelta(seconds=event.occurred_at_unix_s))
            columns["agent_id"].append(message.agent_id)
            columns["received_at"].append(received_at)
    events = pl.DataFrame(columns, schema=EVENTS_SCHEMA)
    return DecodedLifecycle(events, tuple(undecodable))


@dataclass(frozen=True, slots=True)
class SpanDerivation:
    spans: pl.DataFrame  # SPANS_SCHEMA, sorted by resource_id, span_start
    unresolved: pl.DataFrame  # the span rows left out: no subscription could be resolved


def derive_spans(events: pl.DataFrame, catalog_subscriptions: Mapping[str, str]) -> SpanDerivation:
    """The spans that a set of resources' events give (see the module docstring).

    ``events``: EVENTS_SCHEMA, ALL the events of every resource it names.
    ``catalog_subscriptions``: resource id -> its subscription in the catalog.
    """
    if events.is_empty():
        empty = pl.DataFrame(schema=SPANS_SCHEMA)
        return SpanDerivation(empty, empty)
    defaults = pl.DataFrame(
        {
            "resource_id": list(catalog_subscriptions),
            "_default_subscription": list(catalog_subscriptions.values()),
        },
        schema={"resource_id": pl.String(), "_default_subscription": pl.String()},
    )
    ordered = (
        events.unique(subset=["resource_id", "event_id"], keep="first", maintain_order=True)
        .with_columns(
            _rank=pl.col("kind").replace_strict(KIND_RANK, return_dtype=pl.Int8()),
            _named=pl.when(pl.col("subscription_id") != "").then(pl.col("subscription_id")),
        )
        .sort("resource_id", "occurred_at", "_rank", "event_id")
        .with_columns(
            _next_at=pl.col("occurred_at").shift(-1).over("resource_id"),
            _subscription=pl.col("_named").forward_fill().over("resource_id"),
        )
        .join(defaults, on="resource_id", how="left", maintain_order="left")
        .with_columns(pl.coalesce("_subscription", "_default_subscription").alias("_subscription"))
    )
    candidates = ordered.filter(
        (pl.col("kind") != "deleted")
        & (pl.col("_next_at").is_null() | (pl.col("_next_at") > pl.col("occurred_at")))
    ).select(
        "resource_id",
        pl.col("_subscription").alias("subscription_id"),
        "plan_id",
        pl.col("occurred_at").alias("span_start"),
        pl.col("_next_at").alias("span_end"),
    )
    spans = candidates.filter(pl.col("subscription_id").is_not_null())
    unresolved = candidates.filter(pl.col("subscription_id").is_null())
    return SpanDerivation(
        spans.sort("resource_id", "span_start").cast(pl.Schema(SPANS_SCHEMA)),
        unresolved.cast(pl.Schema(SPANS_SCHEMA)),
    )
