"""The vectorised engine equals the reference rater on generated sample streams."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rating import engine
from rating.catalog import Catalog
from rating.catalog_file import parse_catalog
from rating.engine import HOUR_S, MAX_DURATION_S, CatalogFrames, rate
from rating.record_codec import SAMPLES_SCHEMA
from rating.reference import Sample, reference_rate, reference_reason

BASE = 1_790_000_000 // HOUR_S * HOUR_S  # an hour boundary in 2026


def _iso(unix_s: int) -> str:
    return datetime.fromtimestamp(unix_s, tz=UTC).isoformat()


# r1 moves: on s0 (its own, by default) until half past BASE, then on s1, then nowhere
# (back to its own), then on s2 from a second that is no hour boundary, open-ended.
R1_SPANS = [
    {"start": _iso(BASE - 2 * HOUR_S), "end": _iso(BASE + HOUR_S // 2)},
    {"start": _iso(BASE + HOUR_S // 2), "end": _iso(BASE + 2 * HOUR_S), "subscription": "s1"},
    {"start": _iso(BASE + 3 * HOUR_S + 17), "end": "null", "subscription": "s2"},
]

CATALOG: Catalog = parse_catalog(
    {
        "meters": [
            {"name": n, "kind": k, "base_unit": "u", "display_unit": "u", "base_per_display": "1"}
            for n, k in (("c", "counter"), ("g", "gauge"), ("p", "peak"))
        ],
        "plans": [{"id": "plan", "name": "Plan"}],
        "accounts": [{"id": "acc", "name": "Acc", "currency": "EUR", "timezone": "UTC"}],
        "subscriptions": [
            {"id": s, "account": "acc", "plan": "plan", "start": "2026-01-01T00:00:00Z"}
            for s in ("s0", "s1", "s2")
        ],
        "resources": [
            {"id": "r0", "subscription": "s0", "kind": "server"},
            {"id": "r1", "subscription": "s0", "kind": "volume", "spans": R1_SPANS},
            {"id": "r2", "subscription": "s1", "kind": "server"},
        ],
    },
    "test",
)
FRAMES = CatalogFrames.from_catalog(CATALOG)

starts = st.one_of(
    st.integers(BASE - 3 * HOUR_S, BASE + 5 * HOUR_S),
    st.sampled_from([BASE - 1, BASE, BASE + 1, BASE + HOUR_S - 1, BASE + HOUR_S]),
    # r1's span boundaries
    st.sampled_from([BASE + HOUR_S // 2 + d for d in (-1, 0, 1)]),
    st.sampled_from([BASE + 2 * HOUR_S + d for d in (-1, 0, 1)]),
    st.sampled_from([BASE + 3 * HOUR_S + 17 + d for d in (-1, 0, 1)]),
    st.sampled_from([0, -1, 253_402_300_800 - 1]),  # the edges of the representable range
)
durations = st.one_of(
    st.sampled_from([0, 1, 60, HOUR_S - 1, HOUR_S, HOUR_S + 1, 2 * HOUR_S]),
    st.integers(0, 5 * HOUR_S),
    st.sampled_from([MAX_DURATION_S, MAX_DURATION_S + 1, 2**32 - 1]),
)
values = st.one_of(
    st.integers(0, 1000), st.integers(-2, 2**63 - 1), st.sampled_from([2**63 - 1, -1])
)
samples_st = st.tuples(
    st.sampled_from(["agent-b", "agent-a", "Agent-c"]),  # bytewise, "Agent-c" sorts first
    st.integers(0, 3),
    st.sampled_from(["r0", "r1", "r2", "unknown-resource"]),
    st.sampled_from(["c", "g", "p", "unknown.meter"]),
    starts,
    durations,
    values,
)


PARTIAL_KEYS = ["agent_id", "seq", "subscription_id", "meter", "hour_start"]


def _frame(samples: list[Sample]) -> pl.DataFrame:
    index: dict[tuple[str, int], int] = defaultdict(int)
    rows = []
    for agent, seq, resource, meter, start, duration, value in samples:
        rows.append((agent, seq, index[agent, seq], resource, meter, start, duration, value))
        index[agent, seq] += 1
    return pl.DataFrame(rows, schema=SAMPLES_SCHEMA, orient="row")


def _engine_totals(partials: pl.DataFrame) -> dict[tuple[str, str, datetime], tuple[int, int, int]]:
    """Sum the per-batch partials the way usage_hourly does (sum, max, sum)."""
    totals: dict[tuple[str, str, datetime], tuple[int, int, int]] = {}
    for row in partials.iter_rows(named=True):
        key = (row["subscription_id"], row["meter"], row["hour_start"])
        q, m, c = totals.get(key, (0, int(row["quantity_max"]), 0))
        totals[key] = (
            q + int(row["quantity"]),
            max(m, int(row["quantity_max"])),
            c + row["sample_count"],
        )
    return totals


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(samples_st, max_size=40))
def test_engine_equals_reference(samples: list[Sample]) -> None:
    rated = rate(_frame(samples), FRAMES)

    assert _engine_totals(rated.partials) == reference_rate(samples, CATALOG)

    expected_reasons = sorted(r for s in samples if (r := reference_reason(s, CATALOG)) is not None)
    assert sorted(rated.unresolved["reason"].to_list()) == expected_reasons
    # Nothing is lost: every sample is either counted once or unresolved.
    assert rated.partials["sample_count"].sum() + rated.unresolved.height == len(samples)
    # The stated row order (rate's docstring), whatever order the batches came in.
    assert rated.partials.equals(rated.partials.sort(PARTIAL_KEYS))


@settings(max_examples=100, deadline=None)
@given(st.lists(samples_st, min_size=1, max_size=30))
def test_partials_are_per_batch_and_sum_to_the_whole(samples: list[Sample]) -> None:
    """Rating batch by batch and adding up equals rating everything at once."""
    whole = _engine_totals(rate(_frame(samples), FRAMES).partials)
    by_batch: dict[tuple[str, int], list[Sample]] = defaultdict(list)
    for s in samples:
        by_batch[s[0], s[1]].append(s)
    pieces = pl.concat([rate(_frame(b), FRAMES).partials for b in by_batch.values()])
    assert _engine_totals(pieces) == whole
    partials = rate(_frame(samples), FRAMES).partials
    assert partials.select(PARTIAL_KEYS).is_duplicated().sum() == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(samples_st, min_size=1, max_size=30))
def test_the_packed_key_groups_as_the_four_codes_do(samples: list[Sample]) -> None:
    """Aggregating on one packed int64 key (the usual path) and on the four code columns
    (the path for code ranges too wide for 63 bits) give identical partials."""
    packed = rate(_frame(samples), FRAMES).partials
    key_bits, engine.KEY_BITS = engine.KEY_BITS, 0
    try:
        unpacked = rate(_frame(samples), FRAMES).partials
    finally:
        engine.KEY_BITS = key_bits
    assert packed.equals(unpacked)


def test_a_moving_resource_resolves_by_the_span_at_each_piece() -> None:
    """r1 is on s0 until BASE+30min, on s1 until BASE+2h, its own s0 again, then on s2 from
    BASE+3h+17s: a gauge from BASE+10min to BASE+4h splits by the start of each hour piece."""
    sample: Sample = ("agent-a", 0, "r1", "g", BASE + 600, 4 * HOUR_S - 600, 2)
    counter: Sample = ("agent-a", 0, "r1", "c", BASE + 3 * HOUR_S + 17, 0, 5)
    totals = _engine_totals(rate(_frame([sample, counter]), FRAMES).partials)
    hour = [datetime.fromtimestamp(BASE + h * HOUR_S, tz=UTC) for h in range(4)]
    assert totals == {
        ("s0", "g", hour[0]): (2 * (HOUR_S - 600), 2, 1),  # the piece starts at BASE+10min
        ("s1", "g", hour[1]): (2 * HOUR_S, 2, 0),
        ("s0", "g", hour[2]): (2 * HOUR_S, 2, 0),  # between spans: its own subscription
        ("s0", "g", hour[3]): (2 * HOUR_S, 2, 0),  # starts at BASE+3h, before the s2 span
        ("s2", "c", hour[3]): (5, 5, 1),
    }
    assert totals == reference_rate([sample, counter], CATALOG)
