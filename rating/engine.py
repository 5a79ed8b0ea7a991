"""The vectorised rating engine: samples -> hourly partials per batch (pure Polars).

Rules (also in rating/README.md; ``rating.reference`` is the slow, obvious version and a
property test keeps the two equal):

- A sample resolves through the catalog: its resource gives the subscription, its meter
  the kind. A sample whose resource or meter is unknown, whose value is negative, whose
  interval lies outside [1970, 10000) or is longer than ``max_duration_s`` is *unresolved*:
  returned with a ``reason``, never dropped.
- Hours are UTC hours [h, h + 3600 s). Every sample counts once in ``sample_count``, in the
  hour that contains its start.
- counter: the whole delta goes to the hour containing the interval start.
  quantity = delta, quantity_max = the largest delta.
- gauge: the level is held over [start, start + duration); each hour it overlaps gets
  level x (seconds of overlap), exactly (integers). quantity_max = the largest level in that
  hour. A zero-length gauge sample lands in its start hour with quantity 0.
- peak: the level counts as ``quantity_max`` in every hour its interval overlaps (a
  zero-length sample: its start hour). ``quantity`` is 0: a peak meter has no sum, and
  storing 0 keeps anyone from summing levels by mistake.

Partials are aggregated per (agent_id, seq, subscription_id, meter, hour_start) so that
the store can add exactly the parts of batches it has not counted before.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from aggregation.ports import INSTANT, PARTIALS_SCHEMA, QUANTITY
from rating.catalog import Catalog
from rating.record_codec import SAMPLES_SCHEMA

HOUR_S = 3600
# Longest accepted sample interval: a gauge sample explodes into one row per hour it
# overlaps, so this bounds the work per sample (31 days -> at most 745 rows).
MAX_DURATION_S = 31 * 24 * HOUR_S
# Instants must be representable: [1970-01-01, 10000-01-01).
MAX_END_UNIX_S = 253_402_300_800

UNRESOLVED_SCHEMA: dict[str, pl.DataType] = {**SAMPLES_SCHEMA, "reason": pl.String()}


@dataclass(frozen=True, slots=True)
class CatalogFrames:
    """The catalog as lookup frames: resource -> subscription, meter -> kind."""

    resources: pl.DataFrame  # resource_id, subscription_id
    meters: pl.DataFrame  # meter, kind

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> CatalogFrames:
        return cls(
            resources=pl.DataFrame(
                {
                    "resource_id": [r.id for r in catalog.resources.values()],
                    "subscription_id": [r.subscription_id for r in catalog.resources.values()],
                },
                schema={"resource_id": pl.String(), "subscription_id": pl.String()},
            ),
            meters=pl.DataFrame(
                {
                    "meter": [m.name for m in catalog.meters.values()],
                    "kind": [m.kind.value for m in catalog.meters.values()],
                },
                schema={"meter": pl.String(), "kind": pl.String()},
            ),
        )


@dataclass(frozen=True, slots=True)
class Rated:
    partials: pl.DataFrame  # PARTIALS_SCHEMA
    unresolved: pl.DataFrame  # UNRESOLVED_SCHEMA: the samples, plus why


def rate(
    samples: pl.DataFrame, frames: CatalogFrames, max_duration_s: int = MAX_DURATION_S
) -> Rated:
    """Resolve and aggregate a frame of samples (SAMPLES_SCHEMA)."""
    start, duration, value = pl.col("start_unix_s"), pl.col("duration_s"), pl.col("value")
    resolved = (
        samples.join(frames.resources, on="resource_id", how="left", maintain_order="left")
        .join(frames.meters, on="meter", how="left", maintain_order="left")
        .with_columns(
            reason=pl.when(pl.col("subscription_id").is_null())
            .then(pl.format("unknown resource '{}'", pl.col("resource_id")))
            .when(pl.col("kind").is_null())
            .then(pl.format("unknown meter '{}'", pl.col("meter")))
            .when(value < 0)
            .then(pl.format("negative value {}", value))
            .when((duration < 0) | (duration > max_duration_s))
            .then(pl.format("duration_s {} is outside [0, {}]", duration, pl.lit(max_duration_s)))
            .when((start < 0) | (start >= MAX_END_UNIX_S) | (start > MAX_END_UNIX_S - duration))
            .then(pl.format("start_unix_s {} is out of range", start))
            .otherwise(None)
        )
    )
    unresolved = resolved.filter(pl.col("reason").is_not_null()).select(list(UNRESOLVED_SCHEMA))
    good = resolved.filter(pl.col("reason").is_null())

    first_hour = start // HOUR_S
    # The last hour the interval [start, start + duration) touches; a counter (and any
    # zero-length sample) stays in its first hour.
    last_hour = (
        pl.when((pl.col("kind") == "counter") | (duration == 0))
        .then(first_hour)
        .otherwise((start + duration - 1) // HOUR_S)
    )
    hour = pl.col("hour")
    overlap_s = pl.min_horizontal(start + duration, (hour + 1) * HOUR_S) - pl.max_horizontal(
        start, hour * HOUR_S
    )
    level = value.cast(QUANTITY)
    quantity = (
        pl.when(pl.col("kind") == "counter")
        .then(level)
        .when(pl.col("kind") == "gauge")
        .then(level * overlap_s.cast(QUANTITY))
        .otherwise(pl.lit(0).cast(QUANTITY))
    )
    pieces = (
        good.with_columns(hour=pl.int_ranges(first_hour, last_hour + 1, dtype=pl.Int64))
        .explode("hour")
        .select(
            "agent_id",
            "seq",
            "subscription_id",
            "meter",
            hour_start=(hour * (HOUR_S * 1_000_000)).cast(INSTANT),
            quantity=quantity,
            quantity_max=level,
            sample_count=(hour == first_hour).cast(pl.Int64),
        )
    )
    keys = ["agent_id", "seq", "subscription_id", "meter", "hour_start"]
    partials = (
        pieces.group_by(keys)
        .agg(
            pl.col("quantity").sum().cast(QUANTITY),
            pl.col("quantity_max").max().cast(QUANTITY),
            pl.col("sample_count").sum().cast(pl.Int64),
        )
        .sort(keys)
        .select(list(PARTIALS_SCHEMA))
    )
    return Rated(partials=partials, unresolved=unresolved)
