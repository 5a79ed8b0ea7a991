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

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

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
    # The spans of the resources that move between subscriptions (MOVES_SCHEMA; empty when
    # none does): every span of a resource at least one of whose spans names a subscription
    # other than its own. Samples of other resources resolve by resource_id alone.
    moves: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=MOVES_SCHEMA))
    # Derived: the same lookups with order-preserving integer codes (the code of a name is
    # its rank among the sorted names), so the engine groups and sorts on integers.
    resource_codes: pl.DataFrame = field(init=False)  # resource_id, subscription_code
    meter_codes: pl.DataFrame = field(init=False)  # meter, kind, meter_code
    subscription_names: pl.Series = field(init=False)  # by code
    meter_names: pl.Series = field(init=False)  # by code
    move_codes: pl.DataFrame = field(init=False)  # moves, subscription_id as move_code

    def __post_init__(self) -> None:
        subscriptions = (
            pl.concat(
                [
                    self.resources.get_column("subscription_id"),
                    self.moves.get_column("subscription_id"),
                ]
            )
            .unique()
            .sort()
        )
        meters = self.meters.sort("meter")
        codes = {
            "move_codes": self.moves.select(
                "resource_id",
                "span_start_us",
                "span_end_us",
                move_code=subscriptions.search_sorted(
                    self.moves.get_column("subscription_id")
                ).cast(pl.Int64),
            ).sort("resource_id", "span_start_us"),
            "resource_codes": self.resources.select(
                "resource_id",
                subscription_code=subscriptions.search_sorted(
                    self.resources.get_column("subscription_id")
                ).cast(pl.Int64),
            ),
            "meter_codes": meters.with_columns(meter_code=pl.int_range(pl.len(), dtype=pl.Int64)),
            "subscription_names": subscriptions,
            "meter_names": meters.get_column("meter"),
        }
        for name, value in codes.items():
            object.__setattr__(self, name, value)

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
            moves=_moves(catalog),
        )


# A span of a moving resource: [span_start_us, span_end_us) in unix microseconds (an open
# span ends at MAX_END_UNIX_S), during which its samples belong to subscription_id.
MOVES_SCHEMA: dict[str, pl.DataType] = {
    "resource_id": pl.String(),
    "span_start_us": pl.Int64(),
    "span_end_us": pl.Int64(),
    "subscription_id": pl.String(),
}


def _moves(catalog: Catalog) -> pl.DataFrame:
    """The spans of the resources that belong to another subscription for a while (a loop
    per resource: the catalog, not the data path)."""
    rows: list[tuple[str, int, int, str]] = []
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for resource in catalog.resources.values():
        if all(resource.span_subscription(s) == resource.subscription_id for s in resource.spans):
            continue
        for span in resource.spans:
            end = MAX_END_UNIX_S * 1_000_000 if span.end is None else (span.end - epoch) // _US
            start = (span.start - epoch) // _US
            rows.append((resource.id, start, end, resource.span_subscription(span)))
    return pl.DataFrame(rows, schema=MOVES_SCHEMA, orient="row")


_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Rated:
    partials: pl.DataFrame  # PARTIALS_SCHEMA
    unresolved: pl.DataFrame  # UNRESOLVED_SCHEMA: the samples, plus why


def rate(
    samples: pl.DataFrame, frames: CatalogFrames, max_duration_s: int = MAX_DURATION_S
) -> Rated:
    """Resolve and aggregate a frame of samples (SAMPLES_SCHEMA).

    Arithmetic runs on Int128 (|value| < 2**63 times at most 3600 s per piece, summed over
    fewer than 2**50 pieces, stays far inside it) and becomes ``Decimal(38, 0)`` once, on
    the aggregated rows. Only the samples whose interval spans several hours are exploded
    into one row per hour; the reasons of unresolved samples are formatted for those alone.
    Rows are grouped and sorted on order-preserving integer codes (``_aggregate``), where the
    batch code numbers the distinct (agent_id, seq) of this call in that order; names come
    back at the end, sorted by (agent_id, seq, subscription_id, meter, hour_start).
    """
    start, duration, value = pl.col("start_unix_s"), pl.col("duration_s"), pl.col("value")
    unknown_resource = pl.col("subscription_code").is_null()
    unknown_meter = pl.col("kind").is_null()
    negative = value < 0
    bad_duration = (duration < 0) | (duration > max_duration_s)
    # Where the duration is out of range this may wrap; bad_duration flags the row anyway.
    bad_start = (start < 0) | (start >= MAX_END_UNIX_S) | (start > MAX_END_UNIX_S - duration)
    resolved = (
        samples.join(frames.resource_codes, on="resource_id", how="left", maintain_order="left")
        .join(frames.meter_codes, on="meter", how="left", maintain_order="left")
        .with_columns(_bad=unknown_resource | unknown_meter | negative | bad_duration | bad_start)
    )
    unresolved = (
        resolved.filter(pl.col("_bad"))
        .with_columns(
            reason=pl.when(unknown_resource)
            .then(pl.format("unknown resource '{}'", pl.col("resource_id")))
            .when(unknown_meter)
            .then(pl.format("unknown meter '{}'", pl.col("meter")))
            .when(negative)
            .then(pl.format("negative value {}", value))
            .when(bad_duration)
            .then(pl.format("duration_s {} is outside [0, {}]", duration, pl.lit(max_duration_s)))
            .otherwise(pl.format("start_unix_s {} is out of range", start))
        )
        .select(list(UNRESOLVED_SCHEMA))
    )
    good = resolved.filter(~pl.col("_bad"))
    # A batch's samples lie in one run of rows (decode_records appends whole batches):
    # code the runs, then the distinct batches of the runs (a frame as small as the number
    # of runs) in (agent_id, seq) order. Correct for any row order, fastest for this one.
    run_start = (
        (pl.col("agent_id") != pl.col("agent_id").shift(1))
        | (pl.col("seq") != pl.col("seq").shift(1))
    ).fill_null(value=True)
    starts = good.select(run_start).to_series()
    runs = good.select("agent_id", "seq").filter(starts)
    batches = runs.unique().sort("agent_id", "seq")
    run_codes = runs.join(
        batches.with_row_index("batch_code"), on=["agent_id", "seq"], maintain_order="left"
    ).get_column("batch_code")

    first_hour = start // HOUR_S
    # The last hour the interval [start, start + duration) touches; a counter (and any
    # zero-length sample) stays in its first hour.
    last_hour = (
        pl.when((pl.col("kind") == "counter") | (duration == 0))
        .then(first_hour)
        .otherwise((start + duration - 1) // HOUR_S)
    )
    good = good.with_columns(
        batch_code=run_codes.cast(pl.Int64).gather(starts.cast(pl.Int64).cum_sum() - 1),
        hour=first_hour,
        _last=last_hour,
    )
    single = good.filter(pl.col("hour") == pl.col("_last"))
    multi = (
        good.filter(pl.col("hour") != pl.col("_last"))
        .with_columns(hour=pl.int_ranges(pl.col("hour"), pl.col("_last") + 1, dtype=pl.Int64))
        .explode("hour")
    )
    hour = pl.col("hour")
    overlap_s = pl.min_horizontal(start + duration, (hour + 1) * HOUR_S) - pl.max_horizontal(
        start, hour * HOUR_S
    )
    level = value.cast(pl.Int128)
    quantity = (
        pl.when(pl.col("kind") == "counter")
        .then(level)
        .when(pl.col("kind") == "gauge")
        .then(level * overlap_s.cast(pl.Int128))
        .otherwise(pl.lit(0, dtype=pl.Int128))
    )
    pieces = _resolve_moves(pl.concat([single, multi], how="vertical"), frames).select(
        "batch_code",
        "subscription_code",
        "meter_code",
        "hour",
        quantity=quantity,
        quantity_max=level,
        sample_count=(hour == first_hour).cast(pl.Int64),
    )
    codes = _aggregate(pieces, batches.height, frames)
    batch = codes.get_column("batch_code")
    partials = pl.DataFrame(
        {
            "agent_id": batches.get_column("agent_id").gather(batch),
            "seq": batches.get_column("seq").gather(batch),
            "subscription_id": frames.subscription_names.gather(
                codes.get_column("subscription_code")
            ),
            "meter": frames.meter_names.gather(codes.get_column("meter_code")),
            "hour_start": (codes.get_column("hour") * (HOUR_S * 1_000_000)).cast(INSTANT),
            "quantity": codes.get_column("quantity").cast(QUANTITY),
            "quantity_max": codes.get_column("quantity_max").cast(QUANTITY),
            "sample_count": codes.get_column("sample_count"),
        },
        schema=PARTIALS_SCHEMA,
    )
    return Rated(partials=partials, unresolved=unresolved)


# Bits of the packed grouping key (int64, non-negative); a test lowers it to take the
# unpacked path.
KEY_BITS = 63
_CODES = ("batch_code", "subscription_code", "meter_code", "hour")
_SUMS = (
    pl.col("quantity").sum(),
    pl.col("quantity_max").max(),
    pl.col("sample_count").sum().cast(pl.Int64),
)


def _aggregate(pieces: pl.DataFrame, batches: int, frames: CatalogFrames) -> pl.DataFrame:
    """``pieces`` summed per (batch, subscription, meter, hour) code, in that order.

    The four codes are packed into one int64 key, most significant first, each in as many
    bits as its range in this call needs (hours relative to the earliest), so the order of
    the keys is the order of the codes: sorting on the key and reducing its runs with
    running sums is ~3.5x faster than hashing two key columns. Ranges too wide for 63 bits
    (not met in practice: 500 batches, 10^6 subscriptions, 256 meters and 10 years of hours
    need 54) group on the four columns instead."""
    if pieces.is_empty():
        return pieces.select(*_CODES, "quantity", "quantity_max", "sample_count")
    hour_low = int(pieces.get_column("hour").min())  # type: ignore[arg-type]
    hour_high = int(pieces.get_column("hour").max())  # type: ignore[arg-type]
    widths = [
        _bits(batches),
        _bits(frames.subscription_names.len()),
        _bits(frames.meter_names.len()),
        _bits(hour_high - hour_low + 1),
    ]
    if sum(widths) > KEY_BITS:
        return pieces.group_by(_CODES).agg(*_SUMS).sort(_CODES)
    key = pl.lit(0, dtype=pl.Int64)
    for name, width in zip(_CODES, widths, strict=True):
        code = pl.col(name) - hour_low if name == "hour" else pl.col(name)
        key = key * (1 << width) + code
    # Sorted, each key is a run of rows: its sums are differences of running sums at the
    # runs' last rows, and its max a running max of (run number x 2**64 + level), levels
    # being in [0, 2**63) (negative values are unresolved). Running sums stay far inside
    # Int128: fewer than 2**31 pieces of |quantity| < 2**75.
    last = (pl.col("_key") != pl.col("_key").shift(-1)).fill_null(value=True)
    run = pl.col("_key").rle_id().cast(pl.Int128) * (1 << 64)
    ends = (
        pieces.select(key.alias("_key"), "quantity", "quantity_max", "sample_count")
        .sort("_key")
        .select(
            "_key",
            quantity=pl.col("quantity").cum_sum(),
            quantity_max=(run + pl.col("quantity_max")).cum_max() - run,
            sample_count=pl.col("sample_count").cum_sum(),
        )
        .filter(last)
    )
    grouped = ends.with_columns(
        pl.col(name).diff().fill_null(pl.col(name)) for name in ("quantity", "sample_count")
    )
    unpacked: dict[str, pl.Expr] = {}
    shift = 0
    for name, width in reversed(list(zip(_CODES, widths, strict=True))):
        code = (pl.col("_key") // (1 << shift)) % (1 << width)
        unpacked[name] = code + hour_low if name == "hour" else code
        shift += width
    return grouped.select(**{name: unpacked[name] for name in _CODES}).hstack(
        grouped.select("quantity", "quantity_max", "sample_count")
    )


def _bits(count: int) -> int:
    """Bits for the codes 0 .. count - 1 (at least one)."""
    return max(1, (count - 1).bit_length())


def _resolve_moves(pieces: pl.DataFrame, frames: CatalogFrames) -> pl.DataFrame:
    """Effective-dated resolution for resources that move between subscriptions: each piece
    (the part of a sample in one hour; a counter's whole delta) belongs to the subscription
    of the span containing the piece's start, found with an as-of join on the span starts;
    outside every span, to the resource's own subscription. Other rows are left alone."""
    if frames.move_codes.height == 0:
        return pieces
    moving = pl.col("resource_id").is_in(
        frames.move_codes.get_column("resource_id").unique().implode()
    )
    at_us = pl.max_horizontal(pl.col("start_unix_s"), pl.col("hour") * HOUR_S) * 1_000_000
    movers = (
        pieces.filter(moving)
        .with_columns(_at=at_us)
        .sort("resource_id", "_at")
        .join_asof(
            frames.move_codes,
            left_on="_at",
            right_on="span_start_us",
            by="resource_id",
            strategy="backward",
            check_sortedness=False,  # both sides are sorted by (resource_id, instant)
        )
        .with_columns(
            subscription_code=pl.when(pl.col("_at") < pl.col("span_end_us"))
            .then(pl.col("move_code"))
            .otherwise(pl.col("subscription_code"))
        )
        .select(pieces.columns)
    )
    return pl.concat([pieces.filter(~moving), movers], how="vertical")
