"""Checks of the frames handed to ``Store.write_lifecycle_events``, shared by both adapters.

Pure: Polars only, whole frames at a time, so a bad frame is refused with a clear message
before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import polars as pl

from aggregation.frames import check_frame, require_aware
from aggregation.ports import EVENTS_SCHEMA, ConsumedOffset

EVENT_KEY = ("resource_id", "event_id")
EVENT_KINDS = ("created", "resized", "moved", "deleted")


def check_events(events: pl.DataFrame, stored_at: datetime) -> pl.DataFrame:
    """Refuse a frame that does not match EVENTS_SCHEMA or names an unknown kind; keep the
    first row of each (resource_id, event_id)."""
    require_aware(stored_at, "stored_at")
    check_frame(events, EVENTS_SCHEMA, "lifecycle events")
    unknown = events.filter(~pl.col("kind").is_in(EVENT_KINDS))
    if unknown.height:
        raise ValueError(
            f"lifecycle events frame has {unknown.height} event(s) of unknown kind, e.g. "
            f"{unknown.select(*EVENT_KEY, 'kind').head(3).rows()} (expected {EVENT_KINDS})"
        )
    return events.unique(subset=EVENT_KEY, keep="first", maintain_order=True)


def latest_offsets(offsets: Sequence[ConsumedOffset]) -> list[ConsumedOffset]:
    """Each (group_id, topic, partition) once, with its highest next_offset."""
    latest: dict[tuple[str, str, int], ConsumedOffset] = {}
    for offset in offsets:
        if offset.next_offset < 0:
            raise ValueError(f"negative next_offset in {offset}")
        key = (offset.group_id, offset.topic, offset.partition)
        if key not in latest or latest[key].next_offset < offset.next_offset:
            latest[key] = offset
    return sorted(latest.values(), key=lambda o: (o.group_id, o.topic, o.partition))


def require_spans_of(spans: pl.DataFrame, resource_ids: Sequence[str]) -> None:
    """A deriver may only return spans of the resources it was given."""
    outside = spans.filter(~pl.col("resource_id").is_in(list(resource_ids)))
    if outside.height:
        raise ValueError(
            f"derived spans name {outside['resource_id'].n_unique()} resource(s) whose events "
            f"were not given, e.g. {outside['resource_id'].head(3).to_list()}"
        )
