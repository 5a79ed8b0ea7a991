"""What the collector must know to validate samples, and the limits it enforces.

The collector never reads the catalog itself (it may import only the wire contracts): the
composition root builds a :class:`Directory` from the catalog and hands it in. Every limit
is a setting with its unit last in the name and a documented maximum (``LIMIT_MAXIMA``);
:class:`Limits` refuses values outside ``[1, maximum]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

DEFAULT_MAX_LATENESS_S = 35 * 24 * 3600  # BILLING-SEMANTICS.md §10: default maximum lateness
MAX_LATENESS_S_MAXIMUM = 400 * 24 * 3600


@dataclass(frozen=True, slots=True)
class MeterRule:
    """Per meter: a sample whose interval starts earlier than ``now - max_lateness_s`` is
    rejected (TIMESTAMP_OUT_OF_RANGE)."""

    max_lateness_s: int = DEFAULT_MAX_LATENESS_S

    def __post_init__(self) -> None:
        if not 0 <= self.max_lateness_s <= MAX_LATENESS_S_MAXIMUM:
            raise ValueError(
                f"max_lateness_s must be in [0, {MAX_LATENESS_S_MAXIMUM}], "
                f"got {self.max_lateness_s}"
            )


@dataclass(frozen=True, slots=True)
class Directory:
    """The known meters (by name) and resources (by id); anything else is rejected per sample."""

    meters: Mapping[str, MeterRule]
    resource_ids: frozenset[str]
    # Lifecycle events only: the plans and subscriptions an event may name.
    plan_ids: frozenset[str] = frozenset()
    subscription_ids: frozenset[str] = frozenset()


# Documented maximum of every limit; each limit must lie in [1, maximum].
LIMIT_MAXIMA: Mapping[str, int] = {
    # Samples in one batch. Bounds the work and the memory of one request.
    "max_samples_per_batch": 100_000,
    # Largest value of one sample, in the meter's base unit (about 1.1e15: a petabyte, or
    # 31 years of milli-CPU-seconds). A gauge level x 3,600 s stays inside int64.
    "max_value": 2**50,
    # Interval length, seconds. Rating splits intervals at hour boundaries; one hour at most.
    "max_duration_s": 3600,
    "min_duration_s": 3600,
    # How far an interval's end may lie beyond the collector's clock, seconds.
    "max_clock_skew_s": 3600,
    # One serialized SampleBatch, bytes (also the gRPC receive limit).
    "max_message_bytes": 64 * 1024 * 1024,
    # One resource id, UTF-8 bytes (longer ones are MALFORMED_RESOURCE_ID).
    "max_resource_id_bytes": 1024,
    # Lifecycle events in one LifecycleBatch.
    "max_events_per_batch": 100_000,
    # How far in the past a lifecycle event may have occurred, seconds (400 days).
    "max_event_lateness_s": 400 * 24 * 3600,
    # Labels of one sample (more are LABELS_OUT_OF_RANGE).
    "max_labels_per_sample": 64,
    # One label key / one label value, UTF-8 bytes (longer ones are LABELS_OUT_OF_RANGE).
    "max_label_key_bytes": 256,
    "max_label_value_bytes": 1024,
    # Distinct label sets (label_sets entries) in one batch; more make the batch malformed.
    # Bounds the per-set validation work and the label cardinality of one request.
    "max_label_sets_per_batch": 100_000,
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Validation limits of the edge. Defaults are the production defaults."""

    max_samples_per_batch: int = 10_000
    max_value: int = 2**50
    max_duration_s: int = 3600
    min_duration_s: int = 1
    max_clock_skew_s: int = 300
    max_message_bytes: int = 4 * 1024 * 1024
    max_resource_id_bytes: int = 256
    max_events_per_batch: int = 1000
    max_event_lateness_s: int = DEFAULT_MAX_LATENESS_S
    max_labels_per_sample: int = 16
    max_label_key_bytes: int = 64
    max_label_value_bytes: int = 256
    max_label_sets_per_batch: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            maximum = LIMIT_MAXIMA[f.name]
            if not isinstance(value, int) or not 1 <= value <= maximum:
                raise ValueError(f"Limits.{f.name} must be an int in [1, {maximum}], got {value!r}")
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(
                f"Limits.min_duration_s ({self.min_duration_s}) exceeds "
                f"max_duration_s ({self.max_duration_s})"
            )
