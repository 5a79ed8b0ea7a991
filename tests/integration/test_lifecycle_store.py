"""write_lifecycle_events on each real store: replays change nothing, arrival order does not
matter, the offsets are stored with the spans, and a failing deriver writes nothing."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import polars as pl
import pytest

from aggregation.ports import EVENTS_SCHEMA, SPANS_SCHEMA, ConsumedOffset, Store
from rating.lifecycle import derive_spans

pytestmark = pytest.mark.integration

T0 = datetime(2026, 10, 1, tzinfo=UTC)
GROUP, TOPIC = "spans", "resource.events.v1"
SUBSCRIPTIONS = {"srv-1": "sub-1", "srv-2": "sub-1"}


def at(hour: int) -> datetime:
    return datetime(2026, 10, 1 + hour // 24, hour % 24, tzinfo=UTC)


def events(*rows: tuple[str, str, str, str, str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        [(r, e, k, p, s, at(h), "agent-1", T0) for r, e, k, p, s, h in rows],
        schema=EVENTS_SCHEMA,
        orient="row",
    )


HISTORY = [
    ("srv-1", "c", "created", "small", "", 10),
    ("srv-1", "r", "resized", "large", "", 34),
    ("srv-1", "m", "moved", "large", "sub-2", 40),
    ("srv-1", "d", "deleted", "", "", 50),
    ("srv-2", "c2", "created", "small", "", 5),
]
EXPECTED = [
    ("srv-1", "sub-1", "small", at(10), at(34)),
    ("srv-1", "sub-1", "large", at(34), at(40)),
    ("srv-1", "sub-2", "large", at(40), at(50)),
    ("srv-2", "sub-1", "small", at(5), None),
]


def derive(frame: pl.DataFrame) -> pl.DataFrame:
    return derive_spans(frame, SUBSCRIPTIONS).spans


@pytest.fixture(
    params=[
        "duckdb_store",
        "pg_store",
        pytest.param("timescale_store", marks=pytest.mark.timescaledb),
    ]
)
def any_store(request: pytest.FixtureRequest) -> Store:
    store: Store = request.getfixturevalue(request.param)
    return store


def spans(store: Store) -> list[tuple[object, ...]]:
    frame = store.resource_spans(T0, datetime(2027, 1, 1, tzinfo=UTC))
    assert frame.schema == SPANS_SCHEMA
    return frame.rows()


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (3, 1, 4, 0, 2), (4, 3, 2, 1, 0)])
def test_any_arrival_order_gives_the_same_spans_and_replays_change_nothing(
    any_store: Store, order: tuple[int, ...]
) -> None:
    for offset, index in enumerate(order, start=1):  # one poll per event, in this order
        any_store.write_lifecycle_events(
            events(HISTORY[index]), [ConsumedOffset(GROUP, TOPIC, 0, offset)], derive, T0
        )
    assert spans(any_store) == EXPECTED
    assert any_store.committed_offsets(GROUP, TOPIC) == {0: 5}

    # All of it again in one poll, twice over: nothing is new, nothing changes.
    replay = events(*HISTORY, *HISTORY)
    outcome = any_store.write_lifecycle_events(
        replay, [ConsumedOffset(GROUP, TOPIC, 0, 3)], derive, T0
    )
    assert (outcome.new_events, outcome.duplicate_events, outcome.resources) == (0, 10, 0)
    assert spans(any_store) == EXPECTED
    assert any_store.committed_offsets(GROUP, TOPIC) == {0: 5}  # never backwards


def test_a_late_event_reshapes_the_spans_of_its_resource_only(any_store: Store) -> None:
    any_store.write_lifecycle_events(events(*HISTORY[:1], HISTORY[4]), [], derive, T0)
    assert spans(any_store) == [
        ("srv-1", "sub-1", "small", at(10), None),
        ("srv-2", "sub-1", "small", at(5), None),
    ]
    # An earlier resize arrives late: the created span is cut at it and a span opens.
    outcome = any_store.write_lifecycle_events(
        events(("srv-1", "early", "resized", "large", "", 8)), [], derive, T0
    )
    assert (outcome.new_events, outcome.resources, outcome.spans) == (1, 1, 2)
    assert spans(any_store) == [
        ("srv-1", "sub-1", "large", at(8), at(10)),
        ("srv-1", "sub-1", "small", at(10), None),
        ("srv-2", "sub-1", "small", at(5), None),
    ]


def test_a_failing_deriver_writes_nothing(any_store: Store) -> None:
    def broken(_frame: pl.DataFrame) -> pl.DataFrame:
        raise RuntimeError("deriver failed")

    with pytest.raises(RuntimeError, match="deriver failed"):
        any_store.write_lifecycle_events(
            events(*HISTORY), [ConsumedOffset(GROUP, TOPIC, 0, 9)], broken, T0
        )
    assert spans(any_store) == []
    assert any_store.lifecycle_events().is_empty()
    assert any_store.committed_offsets(GROUP, TOPIC) == {}


def test_same_instant_events_are_ordered_by_kind_then_event_id() -> None:
    # created and deleted at one instant: the delete wins (rank), whatever the ids say.
    for rows in itertools.permutations(
        [("srv-1", "z", "created", "small", "", 1), ("srv-1", "a", "deleted", "", "", 1)]
    ):
        assert derive(events(*rows)).is_empty()
    # two resizes at one instant: the larger event_id is last and decides.
    derived = derive(
        events(
            ("srv-1", "b", "resized", "large", "", 1),
            ("srv-1", "a", "resized", "small", "", 1),
        )
    )
    assert derived.rows() == [("srv-1", "sub-1", "large", at(1), None)]


def test_a_resource_without_any_subscription_is_reported_not_guessed() -> None:
    derivation = derive_spans(events(("srv-9", "c", "created", "small", "", 1)), SUBSCRIPTIONS)
    assert derivation.spans.is_empty()
    assert derivation.unresolved["resource_id"].to_list() == ["srv-9"]
