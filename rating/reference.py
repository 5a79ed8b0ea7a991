"""The reference rater: slow, plain Python, obviously correct. Tests only.

It states the rules of ``rating.engine`` one sample and one hour at a time, with Python
integers (no overflow, no rounding), so that a property test can hold the fast engine to
it. Keep it dumb: no cleverness that the engine could share a bug with.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from rating.catalog import Catalog, MeterKind, Resource
from rating.engine import HOUR_S, MAX_DURATION_S, MAX_END_UNIX_S

# A sample as a plain tuple: agent_id, seq, resource_id, meter, start_unix_s, duration_s, value.
Sample = tuple[str, int, str, str, int, int, int]
Key = tuple[str, str, datetime]  # subscription, meter, hour_start
Totals = tuple[int, int, int]  # quantity, quantity_max, sample_count


def reference_reason(
    sample: Sample, catalog: Catalog, max_duration_s: int = MAX_DURATION_S
) -> str | None:
    """Why the sample cannot be rated, or None when it can."""
    _, _, resource_id, meter, start, duration, value = sample
    if resource_id not in catalog.resources:
        return f"unknown resource {resource_id!r}"
    if meter not in catalog.meters:
        return f"unknown meter {meter!r}"
    if value < 0:
        return f"negative value {value}"
    if not 0 <= duration <= max_duration_s:
        return f"duration_s {duration} is outside [0, {max_duration_s}]"
    if start < 0 or start >= MAX_END_UNIX_S or start + duration > MAX_END_UNIX_S:
        return f"start_unix_s {start} is out of range"
    return None


def _owner(resource: Resource, unix_s: int) -> str:
    """The subscription of the span containing the instant, else the resource's own."""
    instant = datetime.fromtimestamp(unix_s, tz=UTC)
    for span in resource.spans:
        if span.start <= instant and (span.end is None or instant < span.end):
            return resource.span_subscription(span)
    return resource.subscription_id


def _hour(hour_index: int) -> datetime:
    return datetime.fromtimestamp(hour_index * HOUR_S, tz=UTC)


def reference_rate(
    samples: Iterable[Sample], catalog: Catalog, max_duration_s: int = MAX_DURATION_S
) -> dict[Key, Totals]:
    """(subscription, meter, hour_start) -> (quantity, quantity_max, sample_count)."""
    totals: dict[Key, Totals] = {}

    def add(key: Key, quantity: int, level: int, count: int) -> None:
        q, m, c = totals.get(key, (0, level, 0))
        totals[key] = (q + quantity, max(m, level), c + count)

    for sample in samples:
        if reference_reason(sample, catalog, max_duration_s) is not None:
            continue
        _, _, resource_id, meter_name, start, duration, value = sample
        resource = catalog.resources[resource_id]
        kind = catalog.meters[meter_name].kind
        first = start // HOUR_S
        if kind is MeterKind.COUNTER:
            add((_owner(resource, start), meter_name, _hour(first)), value, value, 1)
            continue
        end = start + duration
        hour = first
        while True:
            hour_start, hour_end = hour * HOUR_S, (hour + 1) * HOUR_S
            overlap = min(end, hour_end) - max(start, hour_start)
            quantity = value * overlap if kind is MeterKind.GAUGE else 0
            subscription = _owner(resource, max(start, hour_start))
            add((subscription, meter_name, _hour(hour)), quantity, value, int(hour == first))
            hour += 1
            if hour * HOUR_S >= end:
                break
    return totals
