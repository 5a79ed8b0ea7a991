"""Plan segments end to end: the catalog's plan history and span owners, validated at apply;
segments, usage windows and hourly lines per resource and plan in the invoicer."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from aggregation.ports import UsageTotal
from invoicer.close import CatalogIndex, rate_account_period
from invoicer.lines import (
    ChargeConfigurationError,
    segment_stamp,
    segments_in,
    usage_windows,
)
from invoicer.periods import Period
from rating.catalog import Catalog, PlanChange, PlanSegment, Span, Subscription
from rating.catalog_file import CatalogError, parse_catalog


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


OCTOBER = Period(utc(2026, 10, 1), utc(2026, 11, 1), "UTC")

RAW: dict[str, Any] = {
    "meters": [
        {
            "name": "egress",
            "kind": "counter",
            "base_unit": "byte",
            "display_unit": "GB",
            "base_per_display": "1000000000",
        }
    ],
    "plans": [
        {
            "id": "s",
            "name": "S",
            "recurring": {"fee": {"EUR": "31.00"}},
            "hourly": {"rate": {"EUR": "0.01"}},
            "usage": [{"meter": "egress", "unit_price": {"EUR": "1.00"}}],
        },
        {
            "id": "m",
            "name": "M",
            "recurring": {"fee": {"EUR": "62.00"}},
            "hourly": {"rate": {"EUR": "0.02"}},
            "usage": [{"meter": "egress", "unit_price": {"EUR": "2.00"}}],
        },
        {"id": "usd-only", "name": "USD", "recurring": {"fee": {"USD": "1.00"}}},
    ],
    "accounts": [{"id": "acc", "name": "Acc", "currency": "EUR", "timezone": "UTC"}],
    "subscriptions": [
        {
            "id": "sub",
            "account": "acc",
            "plan": "s",
            "start": "2026-09-01T00:00:00Z",
            "plan_changes": [{"at": "2026-10-11T00:30:00Z", "plan": "m"}],
        },
        {"id": "other", "account": "acc", "plan": "s", "start": "2026-09-01T00:00:00Z"},
    ],
    "resources": [
        {
            "id": "srv",
            "subscription": "sub",
            "kind": "server",
            "spans": [
                {"start": "2026-08-01T00:00:00Z", "end": "2026-10-02T00:00:00Z"},
                {"start": "2026-10-02T00:00:00Z", "end": "2026-10-03T00:00:00Z", "plan": "m"},
                {
                    "start": "2026-10-03T00:00:00Z",
                    "end": "2026-10-04T00:00:00Z",
                    "subscription": "other",
                },
            ],
        }
    ],
}


def catalog(raw: dict[str, Any] | None = None) -> Catalog:
    return parse_catalog(raw if raw is not None else RAW, "test.yaml")


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(raw, "test.yaml")
    return [f"{p.path}: {p.message}" for p in info.value.problems]


# -- catalog ----------------------------------------------------------------------------------


def test_plan_history_and_span_owners_load() -> None:
    cat = catalog()
    sub = cat.subscriptions["sub"]
    assert sub.plan_changes == (PlanChange(utc(2026, 10, 11, 0, 30), "m"),)
    assert sub.segments() == (
        PlanSegment(utc(2026, 9, 1), utc(2026, 10, 11, 0, 30), "s"),
        PlanSegment(utc(2026, 10, 11, 0, 30), None, "m"),
    )
    assert sub.plan_at(utc(2026, 1, 1)) == "s"  # before the start: the base plan
    assert sub.plan_at(utc(2026, 10, 11, 0, 30)) == "m"
    srv = cat.resources["srv"]
    assert srv.spans[1] == Span(utc(2026, 10, 2), utc(2026, 10, 3), None, "m")
    assert [cat.span_owner(srv, s) for s in srv.spans] == [
        ("sub", "s"),  # defaults: the resource's subscription, its plan at the span start
        ("sub", "m"),
        ("other", "s"),
    ]


def test_existing_catalogs_without_history_still_load() -> None:
    raw = copy.deepcopy(RAW)
    del raw["subscriptions"][0]["plan_changes"]
    raw["resources"][0]["spans"] = [{"start": "2026-08-01T00:00:00Z"}]
    sub = catalog(raw).subscriptions["sub"]
    assert sub.segments() == (PlanSegment(utc(2026, 9, 1), None, "s"),)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            [{"at": "2026-08-01T00:00:00Z", "plan": "m"}],
            (
                "subscriptions[0].plan_changes[0].at: 2026-08-01T00:00:00+00:00 is not after "
                "the subscription start"
            ),
        ),
        (
            [
                {"at": "2026-10-11T00:00:00Z", "plan": "m"},
                {"at": "2026-10-05T00:00:00Z", "plan": "s"},
            ],
            (
                "subscriptions[0].plan_changes[1].at: 2026-10-05T00:00:00+00:00 is not after "
                "plan_changes[0].at"
            ),
        ),
        (
            [{"at": "2026-10-11T00:00:00Z", "plan": "s"}],
            "subscriptions[0].plan_changes[0].plan: plan 's' is already in effect",
        ),
        (
            [{"at": "2026-10-11T00:00:00Z", "plan": "usd-only"}],
            (
                "subscriptions[0].plan_changes[0].plan: plan 'usd-only' has no EUR price for "
                "recurring.fee"
            ),
        ),
        (
            [{"at": "2026-10-11T00:00:00Z", "plan": "xl"}],
            "subscriptions[0].plan_changes[0].plan: unknown plan 'xl'",
        ),
        (
            [{"at": "2026-10-11T00:00:00", "plan": "m"}],
            "subscriptions[0].plan_changes[0].at: no UTC offset",
        ),
        ([{"when": "2026-10-11T00:00:00Z", "plan": "m"}], "plan_changes[0].when: unknown key"),
    ],
)
def test_bad_plan_changes_are_refused_naming_the_field(
    changes: list[dict[str, str]], expected: str
) -> None:
    raw = copy.deepcopy(RAW)
    raw["subscriptions"][0]["plan_changes"] = changes
    assert any(expected in p for p in problems(raw)), problems(raw)


def test_a_plan_change_at_or_after_the_end_is_refused() -> None:
    raw = copy.deepcopy(RAW)
    raw["subscriptions"][0]["end"] = "2026-10-11T00:30:00Z"
    assert any(
        "plan_changes[0].at: 2026-10-11T00:30:00+00:00 is not before the subscription end" in p
        for p in problems(raw)
    )


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        ({"subscription": "nope"}, "resources[0].spans[3].subscription: unknown subscription"),
        ({"plan": "xl"}, "resources[0].spans[3].plan: unknown plan 'xl'"),
        ({"plan": "usd-only"}, "resources[0].spans[3].plan: plan 'usd-only' has no EUR price"),
        ({"start": "2026-10-03T12:00:00Z"}, "resources[0].spans[3]: overlaps"),
    ],
)
def test_bad_span_owners_are_refused(span: dict[str, str], expected: str) -> None:
    raw = copy.deepcopy(RAW)
    raw["resources"][0]["spans"].append(
        {"start": "2026-10-05T00:00:00Z", "end": "2026-10-06T00:00:00Z", **span}
    )
    assert any(expected in p for p in problems(raw)), problems(raw)


# -- invoicer ---------------------------------------------------------------------------------


def test_segments_in_a_period_and_their_usage_windows() -> None:
    sub = catalog().subscriptions["sub"]
    segments = segments_in(sub, OCTOBER)
    assert [s.plan_id for s in segments] == ["s", "m"]
    # Hour buckets belong to the segment their start is in; the windows tile the period.
    assert usage_windows(segments, OCTOBER) == [
        (utc(2026, 10, 1), utc(2026, 10, 11, 0, 30)),
        (utc(2026, 10, 11, 0, 30), utc(2026, 11, 1)),
    ]
    september = Period(utc(2026, 9, 1), utc(2026, 10, 1), "UTC")
    assert [s.plan_id for s in segments_in(sub, september)] == ["s"]
    # Not active in the period at all (late usage): the nearest segment.
    ended = Subscription("x", "acc", "s", utc(2026, 1, 1), utc(2026, 3, 1))
    assert [s.plan_id for s in segments_in(ended, OCTOBER)] == ["s"]


def test_segment_stamps_keep_seconds_only_when_needed() -> None:
    assert segment_stamp(utc(2026, 10, 15, 12)) == "20261015T1200Z"
    assert segment_stamp(utc(2026, 10, 15, 12, 0, 7)) == "20261015T120007Z"
    assert segment_stamp(datetime(2026, 10, 15, 12, 0, 0, 5, tzinfo=UTC)) == (
        "20261015T120000.000005Z"
    )


def _totals(start: datetime, end: datetime, ids: list[str] | Any) -> list[UsageTotal]:
    # 1 GB in the hour of 2026-10-11T00:00 (before the 00:30 change: plan s), 2 GB after.
    rows = [(utc(2026, 10, 11, 0), 10**9), (utc(2026, 10, 20), 2 * 10**9)]
    quantity = sum(q for h, q in rows if start <= h < end)
    return [UsageTotal("sub", "egress", quantity, quantity, 1)] if "sub" in ids else []


def test_an_account_with_a_plan_change_gets_lines_per_segment() -> None:
    cat = catalog()
    invoice = rate_account_period(
        cat, "acc", OCTOBER, _totals(OCTOBER.start, OCTOBER.end, ["sub"]), segment_usage=_totals
    )
    amounts = {line.key: (line.plan_id, line.amount_precise) for line in invoice.lines}
    assert amounts == {
        # recurring per segment, prorated: 31.00 x 240.5/744 and 62.00 x 503.5/744
        "acc/2026-10-01/sub@20261001T0000Z/recurring": ("s", Decimal("10.020833333333")),
        "acc/2026-10-01/sub@20261011T0030Z/recurring": ("m", Decimal("41.958333333333")),
        # usage split by the segment of each bucket's hour start
        "acc/2026-10-01/sub@20261001T0000Z/usage/egress": ("s", Decimal("1")),
        "acc/2026-10-01/sub@20261011T0030Z/usage/egress": ("m", Decimal("4")),
        # srv: plan s from the period start to 2 Oct (24 h), plan m 2-3 Oct (24 h); the
        # 3-4 Oct span belongs to the other subscription
        "acc/2026-10-01/sub/hourly/srv@m": ("m", Decimal("0.48")),
        "acc/2026-10-01/sub/hourly/srv@s": ("s", Decimal("0.24")),
        "acc/2026-10-01/other/recurring": ("s", Decimal("31")),
        "acc/2026-10-01/other/hourly/srv": ("s", Decimal("0.24")),
    }


def test_several_segments_without_segment_usage_is_an_error_not_a_guess() -> None:
    with pytest.raises(ChargeConfigurationError, match=r"'sub' has 2 plan segments"):
        rate_account_period(catalog(), "acc", OCTOBER, [])


def test_the_index_lists_a_moved_resource_under_both_subscriptions() -> None:
    index = CatalogIndex.of(catalog())
    assert [r.id for r in index.resources("sub")] == ["srv"]
    assert [r.id for r in index.resources("other")] == ["srv"]
