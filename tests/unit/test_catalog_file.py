"""The catalog file: what it accepts, and that every problem is named with file and path."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from rating.catalog import (
    BillingPeriod,
    MeterKind,
    Package,
    PeriodPolicy,
    PricingModel,
    RecurringCharge,
    Span,
    TaxKind,
    TaxProfile,
    TimezoneChange,
)
from rating.catalog_file import (
    CatalogError,
    CatalogProblem,
    catalog_digest,
    catalog_document,
    catalog_from_document,
    load_catalog_file,
    parse_catalog,
    parse_catalog_yaml,
    read_catalog_file,
)

GOOD = """\
meters:
  - {name: net.egress.bytes, kind: counter, base_unit: byte, display_unit: GB,
     base_per_display: "1000000000"}
  - name: storage.block.bytes
    kind: gauge
    base_unit: byte
    display_unit: GiB-month
    base_per_display: "1073741824"
    max_lateness: 35d
    grace: 2h
  - {name: ipv4.count, kind: peak, base_unit: address, display_unit: address,
     base_per_display: "1", grace: 1h30m}
plans:
  - id: vps-s
    name: VPS S
    recurring: {fee: {EUR: "12.00", USD: "13.00"}}
    hourly: {rate: {EUR: "0.0070", USD: "0.0080"}, cap: {EUR: "4.15", USD: "4.50"}}
    usage:
      - {meter: net.egress.bytes, included: "1000", unit_price: {EUR: "0.0100", USD: "0.0110"}}
      - {meter: storage.block.bytes, unit_price: {EUR: "0.05", USD: "0.06"}}
accounts:
  - {id: acme, name: ACME GmbH, currency: EUR, timezone: Europe/Berlin}
  - {id: "0042", name: Initech, currency: USD, timezone: America/New_York}
subscriptions:
  - {id: acme-vps-1, account: acme, plan: vps-s, start: "2026-10-11T00:00:00+02:00"}
  - {id: initech-1, account: "0042", plan: vps-s,
     start: "2026-10-01T00:00:00Z", end: "2026-12-01T05:00:00Z"}
resources:
  - id: srv-1
    subscription: acme-vps-1
    kind: server
    spans:
      - {start: "2026-10-03T10:20:00Z", end: "2026-10-05T08:10:00Z"}
      - {start: "2026-10-06T00:00:00Z", end: null}
  - {id: vol-1, subscription: initech-1, kind: volume}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _good_data() -> Any:
    return parse_catalog_yaml(GOOD, "catalog.yaml")


def _problems(data: object) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, "catalog.yaml")
    return [str(p) for p in info.value.problems]


def test_a_good_catalog_is_parsed_into_domain_types(tmp_path: Path) -> None:
    catalog = load_catalog_file(_write(tmp_path, GOOD))

    egress = catalog.meters["net.egress.bytes"]
    assert egress.kind is MeterKind.COUNTER
    assert egress.base_per_display == 10**9
    assert egress.max_lateness == timedelta(days=35)
    assert catalog.meters["ipv4.count"].grace == timedelta(hours=1, minutes=30)

    plan = catalog.plans["vps-s"]
    assert plan.hourly is not None
    assert plan.hourly.rates == {"EUR": Decimal("0.0070"), "USD": Decimal("0.0080")}
    assert plan.hourly.caps["EUR"] == Decimal("4.15")
    assert plan.recurring is not None
    assert plan.recurring.fees["EUR"] == Decimal("12.00")
    assert [u.meter for u in plan.usage] == ["net.egress.bytes", "storage.block.bytes"]
    assert plan.usage[0].included == Decimal(1000)
    assert plan.usage[1].included == Decimal(0)
    assert plan.currencies_priced() == {"EUR", "USD"}

    # Scalars stay strings: "0042" keeps its zeros.
    assert catalog.accounts["0042"].timezone == "America/New_York"
    sub = catalog.subscriptions["acme-vps-1"]
    assert sub.start == datetime(2026, 10, 10, 22, tzinfo=UTC)
    assert sub.start.tzinfo is UTC
    assert sub.end is None
    assert catalog.subscriptions["initech-1"].end == datetime(2026, 12, 1, 5, tzinfo=UTC)

    srv = catalog.resources["srv-1"]
    assert srv.spans == (
        Span(datetime(2026, 10, 3, 10, 20, tzinfo=UTC), datetime(2026, 10, 5, 8, 10, tzinfo=UTC)),
        Span(datetime(2026, 10, 6, tzinfo=UTC), None),
    )
    assert catalog.resources["vol-1"].spans == ()


def test_no_float_ever_appears_in_the_raw_data() -> None:
    def scalars(value: object) -> list[object]:
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in [k, *scalars(v)]]
        if isinstance(value, list):
            return [s for v in value for s in scalars(v)]
        return [value]

    assert all(isinstance(s, str) for s in scalars(_good_data()))


def test_the_document_round_trips_and_is_canonical(tmp_path: Path) -> None:
    loaded = read_catalog_file(_write(tmp_path, GOOD))
    assert loaded.document == catalog_document(_good_data())
    assert loaded.digest == catalog_digest(loaded.document)
    assert catalog_from_document(loaded.document, "catalog v1") == loaded.catalog

    # Reformatting the YAML (block style, reordered keys) keeps the same document.
    data = _good_data()
    data["meters"][0] = dict(reversed(list(data["meters"][0].items())))
    reformatted = json.loads(json.dumps(data))
    assert catalog_document(reformatted) == loaded.document


def test_every_problem_is_reported_with_file_and_path(tmp_path: Path) -> None:
    bad = (
        GOOD.replace('"0.0070"', '"0,007"')
        .replace("kind: gauge", "kind: gaug")
        .replace("Europe/Berlin", "Europe/Berln")
        .replace("included:", "includd:")
    )
    with pytest.raises(CatalogError) as info:
        load_catalog_file(_write(tmp_path, bad))
    source = str(tmp_path / "catalog.yaml")
    lines = str(info.value).splitlines()
    assert f"{source}: plans[0].hourly.rate.EUR: not a decimal number: '0,007'" in lines
    assert (
        f"{source}: meters[1].kind: unknown meter kind 'gaug' "
        "(expected one of: counter, gauge, peak)"
    ) in lines
    assert (
        f"{source}: accounts[0].timezone: unknown IANA timezone 'Europe/Berln' "
        "(like Europe/Berlin or UTC)"
    ) in lines
    assert any(
        line.startswith(f"{source}: plans[0].usage[0].includd: unknown key")
        and "did you mean 'included'?" in line
        for line in lines
    )
    assert len(info.value.problems) == len(lines) >= 4
    assert all(isinstance(p, CatalogProblem) and p.source == source for p in info.value.problems)


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        load_catalog_file(_write(tmp_path, "meters:\n  - {name: a\n  b: [\n"))
    [problem] = info.value.problems
    assert problem.path.startswith("line 3, column ")
    assert problem.message.startswith("YAML syntax: ")


def test_duplicate_yaml_keys_are_an_error() -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog_yaml("meters: []\nplans: []\nmeters: []\n", "c.yaml")
    assert [str(p) for p in info.value.problems] == [
        "c.yaml: line 3, column 1: duplicate key 'meters'"
    ]


def test_a_missing_file_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog_file(tmp_path / "nope.yaml")


def test_an_empty_catalog_is_valid_but_not_a_scalar() -> None:
    empty = parse_catalog({}, "c.yaml")
    assert empty.meters == {}
    assert _problems("hello") == [
        "catalog.yaml: (top level): expected a mapping, got the string 'hello'"
    ]
    assert _problems({"meters": {"a": "b"}}) == [
        "catalog.yaml: meters: expected a list, got a mapping"
    ]


def _mutated(mutate: Any) -> list[str]:
    data = copy.deepcopy(_good_data())
    mutate(data)
    return _problems(data)


def _set(path: str, value: object) -> Any:
    def mutate(data: Any) -> None:
        *parents, last = path.split("/")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if last.isdigit() and int(last) == len(node):
            node.append(value)
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Any:
    def mutate(data: Any) -> None:
        *parents, last = path.split("/")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return mutate


def _append(section: str, entry: object) -> Any:
    def mutate(data: Any) -> None:
        data[section].append(entry)

    return mutate


CASES: list[tuple[str, Any, str]] = [
    ("unknown top-level key", _set("meter", []), "meter: unknown key"),
    ("missing required key", _delete("meters/0/kind"), "meters[0]: missing required key 'kind'"),
    (
        "wrong type",
        _set("plans/0/usage", "x"),
        "plans[0].usage: expected a list, got the string 'x'",
    ),
    ("entry not a mapping", _set("accounts/0", "acme"), "accounts[0]: expected a mapping"),
    ("empty string", _set("accounts/0/name", ""), "accounts[0].name: must not be empty"),
    (
        "id with a space",
        _set("resources/1/id", "vol 1"),
        "resources[1].id: an id may not contain spaces or control characters: 'vol 1'",
    ),
    (
        "duplicate meter name",
        _append(
            "meters",
            {
                "name": "ipv4.count",
                "kind": "peak",
                "base_unit": "a",
                "display_unit": "a",
                "base_per_display": "1",
            },
        ),
        "meters[3]: duplicate meter name 'ipv4.count' (first at meters[2])",
    ),
    (
        "duplicate account id",
        _append("accounts", {"id": "acme", "name": "x", "currency": "EUR", "timezone": "UTC"}),
        "accounts[2]: duplicate account id 'acme' (first at accounts[0])",
    ),
    (
        "dangling account",
        _set("subscriptions/0/account", "acm"),
        "subscriptions[0].account: unknown account 'acm'; did you mean 'acme'?",
    ),
    (
        "dangling plan",
        _set("subscriptions/0/plan", "zzz"),
        "subscriptions[0].plan: unknown plan 'zzz'",
    ),
    (
        "dangling subscription",
        _set("resources/0/subscription", "nope"),
        "resources[0].subscription: unknown subscription 'nope'",
    ),
    (
        "dangling meter",
        _set("plans/0/usage/0/meter", "net.egres.bytes"),
        (
            "plans[0].usage[0].meter: unknown meter 'net.egres.bytes'; "
            "did you mean 'net.egress.bytes'?"
        ),
    ),
    (
        "unknown currency",
        _set("accounts/0/currency", "EURO"),
        "accounts[0].currency: unknown currency 'EURO' (expected an ISO 4217 code)",
    ),
    (
        "unknown currency in a price",
        _set("plans/0/recurring/fee", {"XXX": "1"}),
        "plans[0].recurring.fee.XXX: unknown currency 'XXX'",
    ),
    ("no prices", _set("plans/0/hourly/rate", {}), "plans[0].hourly.rate: no rate given"),
    ("meter kind", _set("meters/0/kind", "sum"), "meters[0].kind: unknown meter kind 'sum'"),
    (
        "factor zero",
        _set("meters/0/base_per_display", "0"),
        "meters[0].base_per_display: not a positive integer: '0'",
    ),
    (
        "factor fractional",
        _set("meters/0/base_per_display", "1.5"),
        "meters[0].base_per_display: not a positive integer: '1.5'",
    ),
    ("bad duration", _set("meters/1/grace", "2 hours"), "meters[1].grace: not a duration"),
    (
        "negative price",
        _set("plans/0/usage/0/unit_price/EUR", "-0.01"),
        "plans[0].usage[0].unit_price.EUR: negative unit price: '-0.01'",
    ),
    (
        "exponent notation",
        _set("plans/0/recurring/fee/EUR", "1E3"),
        "plans[0].recurring.fee.EUR: not a decimal number: '1E3'",
    ),
    (
        "too many places",
        _set("plans/0/recurring/fee/EUR", "0.0000000000001"),
        "plans[0].recurring.fee.EUR: more than 12 decimal places",
    ),
    (
        "negative allowance",
        _set("plans/0/usage/0/included", "-1"),
        "plans[0].usage[0].included: negative allowance: '-1'",
    ),
    (
        "naive instant",
        _set("subscriptions/0/start", "2026-10-11T00:00:00"),
        "subscriptions[0].start: no UTC offset in '2026-10-11T00:00:00'",
    ),
    (
        "not an instant",
        _set("subscriptions/0/start", "11.10.2026"),
        "subscriptions[0].start: not an ISO 8601 instant",
    ),
    (
        "start not before end",
        _set("subscriptions/1/end", "2026-10-01T00:00:00Z"),
        "subscriptions[1].end: end 2026-10-01T00:00:00+00:00 is not after start",
    ),
    (
        "span start after end",
        _set("resources/0/spans/0/end", "2026-10-03T10:20:00Z"),
        "resources[0].spans[0].end: end 2026-10-03T10:20:00+00:00 is not after start",
    ),
    (
        "overlapping spans",
        _set("resources/0/spans/1/start", "2026-10-05T08:09:59Z"),
        "resources[0].spans[1]: overlaps resources[0].spans[0]",
    ),
    (
        "span after an open span",
        _set("resources/0/spans/0/end", None),
        "resources[0].spans[1]: overlaps resources[0].spans[0]",
    ),
    (
        "plan lacks the account's currency",
        _set("accounts/1/currency", "GBP"),
        (
            "subscriptions[1].plan: plan 'vps-s' has no GBP price for recurring.fee "
            "(account '0042' is billed in GBP)"
        ),
    ),
    (
        "one charge lacks the account's currency",
        _set("plans/0/usage/1/unit_price", {"EUR": "0.05"}),
        (
            "subscriptions[1].plan: plan 'vps-s' has no USD price for usage of "
            "'storage.block.bytes' (unit_price)"
        ),
    ),
    (
        "cap without rate",
        _set("plans/0/hourly/cap", {"EUR": "4.15", "USD": "4.50", "GBP": "4"}),
        "plans[0].hourly.cap.GBP: a cap in GBP but no rate in GBP",
    ),
    (
        "rate without cap",
        _set("plans/0/hourly/cap", {"EUR": "4.15"}),
        "plans[0].hourly.cap: no cap in USD although the rate has one",
    ),
    (
        "usage charged twice",
        _set("plans/0/usage/2", {"meter": "net.egress.bytes", "unit_price": {"EUR": "1"}}),
        (
            "plans[0].usage[2].meter: meter 'net.egress.bytes' is charged twice in this plan "
            "(first at plans[0].usage[0])"
        ),
    ),
    (
        "unknown timezone",
        _set("accounts/0/timezone", "Mars/Olympus"),
        "accounts[0].timezone: unknown IANA timezone 'Mars/Olympus'",
    ),
    (
        "timezone path traversal",
        _set("accounts/0/timezone", "../../etc/passwd"),
        "accounts[0].timezone: unknown IANA timezone",
    ),
    (
        "non-string scalar",
        _set("meters/0/base_per_display", 1000000000),
        "meters[0].base_per_display: expected a string, got int 1000000000",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_problem_is_named(mutate: Any, expected: str) -> None:
    problems = _mutated(mutate)
    assert any(p.startswith(f"catalog.yaml: {expected}") for p in problems), problems


def test_all_problems_are_collected_not_just_the_first() -> None:
    def mutate(data: Any) -> None:
        data["meters"][0]["kind"] = "sum"
        data["accounts"][0]["currency"] = "EURO"
        data["resources"][0]["spans"][0]["start"] = "yesterday"
        data["plans"][0]["hourly"]["rate"]["EUR"] = "cheap"

    problems = _mutated(mutate)
    assert [p.split(": ")[1] for p in problems] == [
        "meters[0].kind",
        "plans[0].hourly.rate.EUR",
        "accounts[0].currency",
        "resources[0].spans[0].start",
    ]


def test_an_invalid_entry_does_not_cascade_into_dangling_references() -> None:
    # The plan is invalid; the subscriptions that use it must not also say "unknown plan".
    problems = _mutated(_set("plans/0/name", ""))
    assert problems == ["catalog.yaml: plans[0].name: must not be empty"]


# -- issue 4: pricing models, billing periods, taxes, overrides, campaigns ------------------

TIERS: list[dict[str, Any]] = [
    {"up_to": "1000", "unit_price": {"EUR": "0.02", "USD": "0.03"}},
    {"up_to": "9000", "unit_price": {"EUR": "0.01", "USD": "0.011"}},
    {"up_to": "500", "unit_price": {"EUR": "0.005", "USD": "0.006"}},
    {"up_to": None, "unit_price": {"EUR": "0.001", "USD": "0.002"}},
]


def _tiered(model: str, tiers: list[dict[str, Any]]) -> Any:
    return _set(
        "plans/0/usage/0",
        {"meter": "net.egress.bytes", "included": "10", "model": model, "tiers": tiers},
    )


def _account_key(key: str, value: object) -> Any:
    return _set(f"accounts/0/{key}", value)


ISSUE_4_CASES: list[tuple[str, Any, str]] = [
    (
        "tiers out of order",
        _tiered("graduated", TIERS),
        "plans[0].usage[0].tiers[2].up_to: tiers out of order: 500 after 9000",
    ),
    (
        "last tier bounded",
        _tiered("volume", TIERS[:2]),
        "plans[0].usage[0].tiers[1].up_to: the last tier must be unbounded",
    ),
    (
        "middle tier unbounded",
        _tiered("graduated", [TIERS[3], TIERS[3]]),
        "plans[0].usage[0].tiers[0].up_to: only the last tier may be unbounded",
    ),
    (
        "tier missing a currency",
        _tiered("graduated", [TIERS[0], {"up_to": None, "unit_price": {"EUR": "0.01"}}]),
        "plans[0].usage[0].tiers[1].unit_price: priced in EUR but the first tier in EUR, USD",
    ),
    (
        "tiers on a per-unit charge",
        _set("plans/0/usage/0/tiers", TIERS),
        "plans[0].usage[0].tiers: not used by model per_unit (it uses 'unit_price')",
    ),
    (
        "graduated without tiers",
        _set("plans/0/usage/0/model", "graduated"),
        "plans[0].usage[0]: model graduated needs 'tiers'",
    ),
    (
        "unknown model",
        _set("plans/0/usage/0/model", "tiered"),
        "plans[0].usage[0].model: unknown pricing model 'tiered'",
    ),
    (
        "package of size 0",
        _set(
            "plans/0/usage/0",
            {
                "meter": "net.egress.bytes",
                "model": "package",
                "package": {"size": "0", "price": {"EUR": "5", "USD": "6"}},
            },
        ),
        "plans[0].usage[0].package.size: a package size must be above 0",
    ),
    (
        "tiered price missing for the account's currency",
        _tiered("graduated", [{"up_to": None, "unit_price": {"EUR": "0.01"}}]),
        (
            "subscriptions[1].plan: plan 'vps-s' has no USD price for usage of 'net.egress.bytes' "
            "(tiers)"
        ),
    ),
    (
        "unknown period policy",
        _account_key("billing_period", {"policy": "weekly"}),
        "accounts[0].billing_period.policy: unknown billing-period policy 'weekly'",
    ),
    (
        "month-end day out of range",
        _account_key("billing_period", {"policy": "month_end_day", "day": "32"}),
        "accounts[0].billing_period.day: expected a whole number from 1 to 31, got '32'",
    ),
    (
        "month-end day missing",
        _account_key("billing_period", {"policy": "month_end_day"}),
        "accounts[0].billing_period: policy month_end_day needs 'day'",
    ),
    (
        "days before month end out of range",
        _account_key("billing_period", {"policy": "days_before_month_end", "days": "28"}),
        "accounts[0].billing_period.days: expected a whole number from 0 to 27, got '28'",
    ),
    (
        "timezone change with a bad label",
        _account_key("timezone_changes", [{"from_period": "2027-13", "timezone": "UTC"}]),
        "accounts[0].timezone_changes[0].from_period: not a period label YYYY-MM: '2027-13'",
    ),
    (
        "unknown tax kind",
        _account_key("tax", {"kind": "vat"}),
        "accounts[0].tax.kind: unknown tax kind 'vat'",
    ),
    (
        "tax rate above 100",
        _account_key("tax", {"kind": "rate", "rate": "190"}),
        "accounts[0].tax.rate: a tax rate is a percentage, not 190",
    ),
    (
        "rate on reverse charge",
        _account_key("tax", {"kind": "reverse_charge", "rate": "19"}),
        "accounts[0].tax.rate: no rate for tax kind reverse_charge",
    ),
    (
        "override of an unknown plan",
        _account_key("price_overrides", [{"plan": "vps-xl"}]),
        "accounts[0].price_overrides[0].plan: unknown plan 'vps-xl'",
    ),
    (
        "override of a meter the plan does not charge",
        _account_key(
            "price_overrides",
            [{"plan": "vps-s", "usage": [{"meter": "ipv4.count", "unit_price": {"EUR": "1"}}]}],
        ),
        (
            "accounts[0].price_overrides[0].usage[0].meter: the plan does not charge meter "
            "'ipv4.count'"
        ),
    ),
    (
        "override without the account's currency",
        _account_key("price_overrides", [{"plan": "vps-s", "recurring": {"fee": {"USD": "9"}}}]),
        (
            "accounts[0].price_overrides[0]: the override of plan 'vps-s' has no EUR price for "
            "recurring.fee"
        ),
    ),
    (
        "commitment without the account's currency",
        _account_key("commitment", {"USD": "100"}),
        "accounts[0].commitment: no EUR amount",
    ),
    (
        "fixed campaign without a currency of its accounts",
        _set(
            "campaigns",
            [{"id": "c1", "name": "C1", "kind": "fixed", "amount": {"EUR": "5"}}],
        ),
        "campaigns[0].amount: no USD amount",
    ),
    (
        "percentage above 100",
        _set("campaigns", [{"id": "c1", "name": "C1", "kind": "percentage", "percent": "150"}]),
        "campaigns[0].percent: expected 0 < percent <= 100, got 150",
    ),
    (
        "campaign scoped to an unknown plan",
        _set(
            "campaigns",
            [
                {
                    "id": "c1",
                    "name": "C1",
                    "kind": "percentage",
                    "percent": "10",
                    "scope": {"plan": "vps-xl"},
                }
            ],
        ),
        "campaigns[0].scope.plan: unknown plan 'vps-xl'",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [c[1:] for c in ISSUE_4_CASES], ids=[c[0] for c in ISSUE_4_CASES]
)
def test_each_issue_4_problem_is_named(mutate: Any, expected: str) -> None:
    problems = _mutated(mutate)
    assert any(p.startswith(f"catalog.yaml: {expected}") for p in problems), problems


def test_pricing_models_periods_taxes_and_overrides_are_parsed() -> None:
    data = copy.deepcopy(_good_data())
    _tiered("graduated", [TIERS[0], TIERS[1], TIERS[3]])(data)
    data["plans"][0]["usage"][1] = {
        "meter": "storage.block.bytes",
        "model": "package",
        "package": {"size": "100", "price": {"EUR": "5.00", "USD": "6.00"}},
    }
    data["accounts"][0]["billing_period"] = {"policy": "anniversary"}
    data["accounts"][0]["tax"] = {"kind": "rate", "rate": "19", "jurisdiction": "DE"}
    data["accounts"][0]["price_overrides"] = [{"plan": "vps-s", "recurring": {"fee": {"EUR": "9"}}}]
    data["accounts"][0]["commitment"] = {"EUR": "100.00"}
    data["accounts"][1]["billing_period"] = {"policy": "month_end_day", "day": "25"}
    data["accounts"][1]["timezone_changes"] = [{"from_period": "2027-01", "timezone": "UTC"}]
    data["campaigns"] = [
        {
            "id": "launch",
            "name": "Launch",
            "kind": "percentage",
            "percent": "10",
            "scope": {"charge": "usage", "meter": "net.egress.bytes"},
            "first_periods": "3",
            "from": "2026-01-01T00:00:00Z",
        }
    ]

    catalog = parse_catalog(data, "catalog.yaml")

    usage = catalog.plans["vps-s"].usage
    assert usage[0].model is PricingModel.GRADUATED
    assert [t.up_to for t in usage[0].tiers] == [Decimal(1000), Decimal(9000), None]
    assert usage[1].package == Package(
        Decimal(100), {"EUR": Decimal("5.00"), "USD": Decimal("6.00")}
    )
    acme = catalog.accounts["acme"]
    # anchored at the earliest subscription start, in the account's timezone
    assert acme.billing_period == BillingPeriod(PeriodPolicy.ANNIVERSARY, anchor=date(2026, 10, 11))
    assert acme.tax == TaxProfile(TaxKind.RATE, Decimal(19), "DE")
    assert acme.plan_for(catalog.plans["vps-s"]).recurring == RecurringCharge({"EUR": Decimal(9)})
    assert acme.commitment == {"EUR": Decimal("100.00")}
    initech = catalog.accounts["0042"]
    assert initech.billing_period == BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=25)
    assert initech.timezone_changes == (TimezoneChange(2027, 1, "UTC"),)
    campaign = catalog.campaigns["launch"]
    assert (campaign.percent, campaign.first_periods, campaign.meter) == (
        Decimal(10),
        3,
        "net.egress.bytes",
    )


def test_an_existing_catalog_gets_the_defaults() -> None:
    catalog = parse_catalog(_good_data(), "catalog.yaml")

    acme = catalog.accounts["acme"]
    assert acme.billing_period == BillingPeriod()
    assert (acme.tax, acme.price_overrides, acme.commitment, catalog.campaigns) == (
        None,
        {},
        {},
        {},
    )
    assert catalog.plans["vps-s"].usage[0].model is PricingModel.PER_UNIT


def test_issue_4_keys_survive_the_stored_document() -> None:
    data = copy.deepcopy(_good_data())
    _tiered("volume", [TIERS[0], TIERS[3]])(data)
    data["accounts"][0]["billing_period"] = {"policy": "anniversary", "anchor": "2026-01-31"}
    data["accounts"][0]["tax"] = {"kind": "reverse_charge"}
    data["campaigns"] = [
        {"id": "f", "name": "F", "kind": "fixed", "amount": {"EUR": "5.00", "USD": "6.00"}}
    ]

    document = catalog_document(data)

    assert catalog_from_document(document, "stored") == parse_catalog(data, "catalog.yaml")
    restored = catalog_from_document(document, "stored")
    # an explicit anchor wins over the earliest subscription start
    assert restored.accounts["acme"].billing_period.anchor == date(2026, 1, 31)


def test_a_fixed_amount_finer_than_the_currency_is_refused() -> None:
    problems = _mutated(_account_key("commitment", {"EUR": "10.001"}))

    assert (
        "catalog.yaml: accounts[0].commitment.EUR: 10.001 has more decimals than EUR has (2)"
        in (problems)
    )
