"""The catalog file: YAML onto ``rating.catalog`` types, validated, every problem reported.

The file is read with PyYAML's ``BaseLoader`` so that every scalar stays a string: a price
is never a float, an id like ``0123`` keeps its zeros, ``no`` is not ``False``. This module
converts strings to ``Decimal``, ``int``, ``timedelta`` and UTC ``datetime`` itself and
collects every problem it finds (it never stops at the first one); :class:`CatalogError`
lists them as ``file: path.inside[0].the.file: what is wrong``.

The format (every key not listed is an error; money is quoted)::

    meters:
      - {name: net.egress.bytes, kind: counter, base_unit: byte, display_unit: GB,
         base_per_display: "1000000000", max_lateness: 35d, grace: 2h}
    plans:
      - id: vps-s
        name: VPS S
        recurring: {fee: {EUR: "12.00"}}
        hourly: {rate: {EUR: "0.0070"}, cap: {EUR: "4.15"}}
        usage:
          - {meter: net.egress.bytes, included: "1000", unit_price: {EUR: "0.0100"}}
          - meter: ipv4.count           # model: per_unit (default) | graduated | volume | package
            model: volume
            tiers:                      # strictly increasing, last unbounded, same currencies
              - {up_to: "4", unit_price: {EUR: "1.50"}}
              - {up_to: null, unit_price: {EUR: "1.20"}}
          - {meter: storage.block.bytes, model: package,
             package: {size: "100", price: {EUR: "5.00"}}}
    accounts:
      - {id: acme, name: ACME GmbH, currency: EUR, timezone: Europe/Berlin}
      - id: initech
        name: Initech
        currency: EUR
        timezone: Europe/Berlin
        billing_period: {policy: month_end_day, day: "25"}   # calendar_month (default),
                        # days_before_month_end (days), anniversary (optional anchor: date)
        timezone_changes: [{from_period: "2027-01", timezone: America/New_York}]
        tax: {kind: rate, rate: "19", jurisdiction: DE}      # or reverse_charge, exempt;
                                                             # line_level_rounding: "true"
        commitment: {EUR: "50.00"}                           # minimum per period
        price_overrides:                                     # contract prices for a plan
          - {plan: vps-s, hourly: {rate: {EUR: "0.0050"}, cap: {EUR: "3.00"}}}
    subscriptions:
      - {id: acme-vps-1, account: acme, plan: vps-s, start: "2026-10-11T00:00:00+02:00"}
      - id: acme-app
        account: acme
        plan: vps-s                  # in effect from start until the first change
        start: "2026-09-01T00:00:00Z"
        plan_changes:                # effective-dated: each plan from `at` to the next change
          - {at: "2026-10-15T12:00:00Z", plan: vps-m}   # increasing, inside (start, end)
    resources:
      - id: srv-1
        subscription: acme-vps-1
        kind: server
        spans:                       # disjoint; may lie outside the subscription (not billed)
          - {start: "2026-10-03T10:20:00Z", end: "2026-10-05T08:10:00Z"}
          - {start: "2026-10-05T08:10:00Z", end: null,     # a resize: a new span, new plan
             plan: vps-m, subscription: acme-vps-1}        # defaults: the resource's
                                     # subscription and its plan in effect at the span start
    campaigns:
      - {id: launch, name: Launch, kind: percentage, percent: "20",   # or fixed + amount
         from: "2026-01-01T00:00:00Z", to: null, first_periods: "3",
         scope: {plan: vps-s, charge: usage, meter: net.egress.bytes}, accounts: [acme]}
    billing_rules:                      # non-billable usage (BILLING-SEMANTICS §8)
      - {id: outage-42, from: "2026-10-12T10:00:00Z", to: "2026-10-12T14:00:00Z",
         match: {account: acme, subscription: acme-vps-1, meter: net.egress.bytes},
         reason: "Incident 42: egress during the outage is not billed"}
    price_books:                        # a reseller's prices (BILLING-SEMANTICS §9)
      - id: hoster-book
        reseller: hoster                # an account
        plans:                          # same shape as plans; each id is a platform plan id
          - {id: vps-s, name: VPS S (Hoster), hourly: {rate: {EUR: "0.0090"}}}
        campaigns: []                   # the reseller's own discounts, shaped like campaigns

Accounts may also carry ``bill_to: <account>`` (its lines go on that account's invoice;
same currency, no cycles) or ``reseller: <account>`` (a customer of a reseller with a price
book: billed by the reseller at the book's prices, while the reseller is billed at platform
prices for the customer's usage); not both. A billing rule's ``match`` takes ``account``,
``subscription`` and ``meter`` (all optional: ``{}`` matches all usage); ``resource`` and
``labels`` are refused (the store keeps usage per subscription, meter and hour, not per
resource or label). ``to`` is optional (open-ended).

Durations are ``<n>d``, ``<n>h``, ``<n>m``, ``<n>s`` or a combination in that order
(``1h30m``). Instants are ISO 8601 with an explicit offset or ``Z`` (a naive instant is an
error) and are converted to UTC. An absent, empty or ``null`` ``end`` means open-ended.

The stored form of a catalog is :func:`catalog_document`: canonical JSON of the validated
raw mapping (all strings), which :func:`catalog_from_document` parses back.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from rating.catalog import (
    DEFAULT_GRACE,
    DEFAULT_MAX_LATENESS,
    Account,
    BillingPeriod,
    BillingRule,
    Campaign,
    Catalog,
    ChargeKind,
    DiscountKind,
    HourlyCharge,
    Meter,
    MeterKind,
    Package,
    PeriodPolicy,
    Plan,
    PlanChange,
    PriceBook,
    PriceOverride,
    PricingModel,
    RecurringCharge,
    Resource,
    Span,
    Subscription,
    TaxKind,
    TaxProfile,
    Tier,
    TimezoneChange,
    UsageCharge,
)
from rating.money import UnknownCurrencyError, exponent

# The most decimal places a price, fee, cap or allowance may have: precise amounts persist
# as NUMERIC(38, 12).
MAX_DECIMAL_PLACES = 12

_ROOT = "(top level)"
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_DECIMAL = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_ID = re.compile(r"[^\s\x00-\x1f\x7f]+")
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
_PRICE_KEY = {
    PricingModel.PER_UNIT: "unit_price",
    PricingModel.GRADUATED: "tiers",
    PricingModel.VOLUME: "tiers",
    PricingModel.PACKAGE: "package.price",
}

_SECTIONS = (
    "meters",
    "plans",
    "accounts",
    "subscriptions",
    "resources",
    "campaigns",
    "billing_rules",
    "price_books",
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CatalogProblem:
    source: str  # the file (or stored version) the catalog came from
    path: str  # where inside it, e.g. "plans[0].hourly.rate.EUR"
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}"


class CatalogError(Exception):
    """The catalog is invalid; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Iterable[CatalogProblem]) -> None:
        self.problems: list[CatalogProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class CatalogFile:
    """A validated catalog file, ready to be stored: the catalog, its canonical document
    and the sha256 of that document."""

    catalog: Catalog
    document: str
    digest: str
    source: str


# -- public API ------------------------------------------------------------------------------


def load_catalog_file(path: Path) -> Catalog:
    """Read, parse and validate a catalog file; raise CatalogError listing every problem."""
    return read_catalog_file(path).catalog


def read_catalog_file(path: Path) -> CatalogFile:
    """Like load_catalog_file, also returning the canonical document and its digest."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError([CatalogProblem(source, "(file)", f"cannot read: {exc}")]) from exc
    data = parse_catalog_yaml(text, source)
    catalog = parse_catalog(data, source)
    document = _dump(data)
    return CatalogFile(catalog, document, catalog_digest(document), source)


def parse_catalog_yaml(text: str, source: str) -> object:
    """YAML text -> the raw mapping (every scalar a string). Syntax errors and duplicate
    keys become a CatalogError naming the line and column."""
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise CatalogError([_yaml_problem(source, exc)]) from exc
    except yaml.YAMLError as exc:
        raise CatalogError([CatalogProblem(source, "(file)", f"YAML: {exc}")]) from exc
    finally:
        loader.dispose()
    if loader.duplicates:
        raise CatalogError(
            CatalogProblem(
                source, f"line {m.line + 1}, column {m.column + 1}", f"duplicate key {k!r}"
            )
            for k, m in loader.duplicates
        )
    return data


def parse_catalog(data: object, source: str) -> Catalog:
    """Validate the raw mapping (as read from YAML or JSON) and build the Catalog."""
    return _Parser(source).catalog(data)


def catalog_document(data: object) -> str:
    """Canonical JSON of the raw mapping, after validating it (raises CatalogError)."""
    parse_catalog(data, "(document)")
    return _dump(data)


def catalog_from_document(doc: str, source: str) -> Catalog:
    """Parse a stored catalog document (catalog_document's output) back into a Catalog."""
    try:
        data = json.loads(doc)
    except json.JSONDecodeError as exc:
        raise CatalogError([CatalogProblem(source, "(document)", f"not JSON: {exc}")]) from exc
    return parse_catalog(data, source)


def catalog_digest(document: str) -> str:
    """sha256 (hex) of a catalog document."""
    return hashlib.sha256(document.encode("utf-8")).hexdigest()


# -- YAML ------------------------------------------------------------------------------------


class _StrictLoader(yaml.BaseLoader):
    """BaseLoader (all scalars are strings) that also records duplicate mapping keys,
    which plain PyYAML silently resolves to the last value."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, yaml.Mark]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                if key in seen:
                    self.duplicates.append((key, key_node.start_mark))
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(source: str, exc: yaml.MarkedYAMLError) -> CatalogProblem:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
    parts = [p for p in (exc.context, exc.problem) if p]
    return CatalogProblem(source, where, "YAML syntax: " + "; ".join(parts))


def _dump(data: object) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# -- validation ------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return key if path == _ROOT else f"{path}.{key}"


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in _NULLS)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[CatalogProblem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(CatalogProblem(self.source, path, message))

    # -- shapes ------------------------------------------------------------------------------

    def mapping(
        self, value: object, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> Mapping[str, object] | None:
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping, got {_describe(value)}")
            return None
        allowed = (*required, *optional)
        for key in value:
            if not isinstance(key, str):
                self.problem(path, f"keys must be strings, got {_describe(key)}")
            elif key not in allowed:
                self.problem(
                    _join(path, key),
                    f"unknown key (expected one of: {', '.join(allowed)})" + _suggest(key, allowed),
                )
        for key in required:
            if key not in value:
                self.problem(path, f"missing required key {key!r}")
        return value

    def items(self, value: object, path: str) -> list[object]:
        if _is_null(value):
            return []
        if not isinstance(value, list):
            self.problem(path, f"expected a list, got {_describe(value)}")
            return []
        return value

    def string(self, value: object, path: str) -> str | None:
        if not isinstance(value, str):
            self.problem(path, f"expected a string, got {_describe(value)}")
            return None
        if not value.strip():
            self.problem(path, "must not be empty")
            return None
        if value != value.strip():
            self.problem(path, f"leading or trailing whitespace in {value!r}")
            return None
        return value

    def ident(self, value: object, path: str) -> str | None:
        text = self.string(value, path)
        if text is not None and not _ID.fullmatch(text):
            self.problem(path, f"an id may not contain spaces or control characters: {text!r}")
            return None
        return text

    def decimal(self, value: object, path: str, what: str = "price") -> Decimal | None:
        text = self.string(value, path)
        if text is None:
            return None
        if not _DECIMAL.fullmatch(text):
            self.problem(path, f"not a decimal number: {text!r}")
            return None
        number = Decimal(text)
        if number < 0:
            self.problem(path, f"negative {what}: {text!r}")
            return None
        places = -number.as_tuple().exponent  # type: ignore[operator]
        if places > MAX_DECIMAL_PLACES:
            self.problem(path, f"more than {MAX_DECIMAL_PLACES} decimal places: {text!r}")
            return None
        return number

    def positive_int(self, value: object, path: str) -> int | None:
        text = self.string(value, path)
        if text is None:
            return None
        if not _INTEGER.fullmatch(text) or int(text) <= 0:
            self.problem(path, f"not a positive integer: {text!r}")
            return None
        return int(text)

    def duration(self, value: object, path: str, default: timedelta) -> timedelta:
        if _is_null(value):
            return default
        text = self.string(value, path)
        if text is None:
            return default
        match = _DURATION.fullmatch(text)
        if not match or not any(match.groups()):
            self.problem(path, f"not a duration (like 35d, 2h, 90m, 30s or 1h30m): {text!r}")
            return default
        d, h, m, s = (int(g) if g else 0 for g in match.groups())
        return timedelta(days=d, hours=h, minutes=m, seconds=s)

    def instant(self, value: object, path: str) -> datetime | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            self.problem(path, f"not an ISO 8601 instant (like 2026-10-11T00:00:00Z): {text!r}")
            return None
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            self.problem(path, f"no UTC offset in {text!r} (add Z or an offset like +02:00)")
            return None
        return parsed.astimezone(UTC)

    def optional_instant(self, value: object, path: str) -> datetime | None:
        return None if _is_null(value) else self.instant(value, path)

    def currency(self, value: object, path: str) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            exponent(text)
        except UnknownCurrencyError as exc:
            self.problem(path, str(exc))
            return None
        return text

    def money(self, value: object, path: str, what: str) -> dict[str, Decimal] | None:
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping of currency to {what}, got {_describe(value)}")
            return None
        if not value:
            self.problem(path, f'no {what} given (add at least one currency, e.g. EUR: "1.00")')
            return None
        prices: dict[str, Decimal] = {}
        ok = True
        for key, amount in value.items():
            sub = _join(path, str(key))
            currency = self.currency(key, sub)
            number = self.decimal(amount, sub, what)
            if currency is None or number is None:
                ok = False
            else:
                prices[currency] = number
        return prices if ok else None

    def exact_money(self, value: object, path: str, what: str) -> dict[str, Decimal] | None:
        """Like ``money``, but at most the currency's own decimals (an amount, not a price)."""
        amounts = self.money(value, path, what)
        if amounts is None:
            return None
        ok = True
        for currency, amount in amounts.items():
            places = -amount.as_tuple().exponent  # type: ignore[operator]
            if places > exponent(currency):
                self.problem(
                    _join(path, currency),
                    f"{amount} has more decimals than {currency} has ({exponent(currency)})",
                )
                ok = False
        return amounts if ok else None

    def unique(self, ids: list[tuple[str, str]], what: str) -> None:
        first: dict[str, str] = {}
        for path, ident in ids:
            if ident in first:
                self.problem(path, f"duplicate {what} {ident!r} (first at {first[ident]})")
            else:
                first[ident] = path

    def reference(
        self, value: str | None, path: str, known: Mapping[str, object], what: str
    ) -> bool:
        if value is None:
            return False
        if value not in known:
            self.problem(path, f"unknown {what} {value!r}" + _suggest(value, known))
            return False
        return True

    # -- sections ----------------------------------------------------------------------------

    def catalog(self, data: object) -> Catalog:
        root = self.mapping(data, _ROOT, (), _SECTIONS)
        sections: dict[str, list[object]] = {
            name: self.items(root.get(name) if root else None, name) for name in _SECTIONS
        }
        meters = self.section(sections["meters"], "meters", "name", self.meter)
        plans = self.section(sections["plans"], "plans", "id", lambda v, p: self.plan(v, p, meters))
        accounts = self.section(
            sections["accounts"],
            "accounts",
            "id",
            lambda v, p: self.account(v, p, plans, meters),
        )
        subscriptions = self.section(
            sections["subscriptions"],
            "subscriptions",
            "id",
            lambda v, p: self.subscription(v, p, plans, accounts),
        )
        resources = self.section(
            sections["resources"],
            "resources",
            "id",
            lambda v, p: self.resource(v, p, subscriptions, plans, accounts),
        )
        campaigns = self.section(
            sections["campaigns"],
            "campaigns",
            "id",
            lambda v, p: self.campaign(v, p, plans, meters, accounts),
        )
        rules = self.section(
            sections["billing_rules"],
            "billing_rules",
            "id",
            lambda v, p: self.billing_rule(v, p, accounts, subscriptions, meters),
        )
        books = self.section(
            sections["price_books"],
            "price_books",
            "id",
            lambda v, p: self.price_book(v, p, accounts, plans, meters),
        )
        self.billing_relations(sections["accounts"], accounts, subscriptions, plans, books)
        if self.problems:
            raise CatalogError(self.problems)
        live_subscriptions = {k: v for k, v in subscriptions.items() if v is not None}
        return Catalog(
            meters={k: v for k, v in meters.items() if v is not None},
            plans={k: v for k, v in plans.items() if v is not None},
            accounts={
                k: _resolve_anchor(v, live_subscriptions.values())
                for k, v in accounts.items()
                if v is not None
            },
            subscriptions=live_subscriptions,
            resources={k: v for k, v in resources.items() if v is not None},
            campaigns={k: v for k, v in campaigns.items() if v is not None},
            billing_rules={k: v for k, v in rules.items() if v is not None},
            price_books={k: v for k, v in books.items() if v is not None},
        )

    def section(
        self,
        entries: list[object],
        name: str,
        key: str,
        build: Callable[[object, str], _T | None],
    ) -> dict[str, _T | None]:
        """Build each entry; the result maps each id to its object, or to None when the
        entry is invalid (so that references to it are not reported as dangling too)."""
        built: dict[str, _T | None] = {}
        ids: list[tuple[str, str]] = []
        for i, entry in enumerate(entries):
            path = f"{name}[{i}]"
            ident = entry.get(key) if isinstance(entry, dict) else None
            obj = build(entry, path)
            if isinstance(ident, str) and ident:
                ids.append((path, ident))
                if ident not in built or built[ident] is None:
                    built[ident] = obj
        self.unique(ids, f"{name[:-1]} {key}")
        return built

    def meter(self, value: object, path: str) -> Meter | None:
        m = self.mapping(
            value,
            path,
            ("name", "kind", "base_unit", "display_unit", "base_per_display"),
            ("max_lateness", "grace"),
        )
        if m is None:
            return None
        name = self.ident(m.get("name"), _join(path, "name")) if "name" in m else None
        kind: MeterKind | None = None
        if "kind" in m:
            text = self.string(m["kind"], _join(path, "kind"))
            if text is not None:
                try:
                    kind = MeterKind(text)
                except ValueError:
                    choices = [k.value for k in MeterKind]
                    self.problem(
                        _join(path, "kind"),
                        f"unknown meter kind {text!r} (expected one of: {', '.join(choices)})",
                    )
        base_unit = (
            self.string(m["base_unit"], _join(path, "base_unit")) if "base_unit" in m else None
        )
        display_unit = (
            self.string(m["display_unit"], _join(path, "display_unit"))
            if "display_unit" in m
            else None
        )
        factor = (
            self.positive_int(m["base_per_display"], _join(path, "base_per_display"))
            if "base_per_display" in m
            else None
        )
        lateness = self.duration(
            m.get("max_lateness"), _join(path, "max_lateness"), DEFAULT_MAX_LATENESS
        )
        grace = self.duration(m.get("grace"), _join(path, "grace"), DEFAULT_GRACE)
        if (
            name is None
            or kind is None
            or base_unit is None
            or display_unit is None
            or factor is None
        ):
            return None
        return Meter(name, kind, base_unit, display_unit, factor, lateness, grace)

    def plan(self, value: object, path: str, meters: Mapping[str, Meter | None]) -> Plan | None:
        p = self.mapping(value, path, ("id", "name"), ("recurring", "hourly", "usage"))
        if p is None:
            return None
        ident = self.ident(p["id"], _join(path, "id")) if "id" in p else None
        name = self.string(p["name"], _join(path, "name")) if "name" in p else None
        charges = self.charges(p, path, meters)
        if charges is None or ident is None or name is None:
            return None
        recurring, hourly, usage = charges
        return Plan(ident, name, recurring, hourly, usage)

    def charges(
        self,
        p: Mapping[str, object],
        path: str,
        meters: Mapping[str, Meter | None],
        allowed_meters: Mapping[str, object] | None = None,
    ) -> tuple[RecurringCharge | None, HourlyCharge | None, tuple[UsageCharge, ...]] | None:
        """The ``recurring``, ``hourly`` and ``usage`` keys of a plan (or a price override,
        whose usage may name only ``allowed_meters``); None when any is invalid."""
        ok = True
        recurring: RecurringCharge | None = None
        if not _is_null(p.get("recurring")):
            rpath = _join(path, "recurring")
            r = self.mapping(p["recurring"], rpath, ("fee",))
            fees = self.money(r["fee"], _join(rpath, "fee"), "fee") if r and "fee" in r else None
            ok = ok and fees is not None
            recurring = RecurringCharge(fees) if fees is not None else None

        hourly: HourlyCharge | None = None
        if not _is_null(p.get("hourly")):
            hpath = _join(path, "hourly")
            h = self.mapping(p["hourly"], hpath, ("rate",), ("cap",))
            rates = (
                self.money(h["rate"], _join(hpath, "rate"), "rate") if h and "rate" in h else None
            )
            caps: dict[str, Decimal] | None = {}
            if h is not None and not _is_null(h.get("cap")):
                caps = self.money(h["cap"], _join(hpath, "cap"), "cap")
                if caps is not None and rates is not None:
                    for currency in sorted(set(caps) - set(rates)):
                        self.problem(
                            _join(_join(hpath, "cap"), currency),
                            f"a cap in {currency} but no rate in {currency}",
                        )
                    for currency in sorted(set(rates) - set(caps)):
                        self.problem(
                            _join(hpath, "cap"),
                            f"no cap in {currency} although the rate has one "
                            "(give the cap in every currency of the rate, or no cap)",
                        )
            ok = ok and rates is not None and caps is not None
            hourly = HourlyCharge(rates, caps) if rates is not None and caps is not None else None

        usage: list[UsageCharge] = []
        first_of_meter: dict[str, str] = {}
        for i, entry in enumerate(self.items(p.get("usage"), _join(path, "usage"))):
            upath = f"{_join(path, 'usage')}[{i}]"
            charge = self.usage_charge(entry, upath, meters, first_of_meter, allowed_meters)
            if charge is None:
                ok = False
            else:
                usage.append(charge)
        return (recurring, hourly, tuple(usage)) if ok else None

    def usage_charge(
        self,
        entry: object,
        upath: str,
        meters: Mapping[str, Meter | None],
        first_of_meter: dict[str, str],
        allowed_meters: Mapping[str, object] | None,
    ) -> UsageCharge | None:
        u = self.mapping(
            entry, upath, ("meter",), ("unit_price", "included", "model", "tiers", "package")
        )
        if u is None:
            return None
        meter = self.ident(u["meter"], _join(upath, "meter")) if "meter" in u else None
        if meter is not None:
            if meter in first_of_meter:
                self.problem(
                    _join(upath, "meter"),
                    f"meter {meter!r} is charged twice in this plan "
                    f"(first at {first_of_meter[meter]})",
                )
                meter = None
            else:
                first_of_meter[meter] = upath
                if not self.reference(meter, _join(upath, "meter"), meters, "meter"):
                    meter = None
                elif allowed_meters is not None and meter not in allowed_meters:
                    self.problem(
                        _join(upath, "meter"),
                        f"the plan does not charge meter {meter!r} (an override can only "
                        "change the price of a charge the plan has)",
                    )
                    meter = None
        model = PricingModel.PER_UNIT
        if not _is_null(u.get("model")):
            text = self.string(u["model"], _join(upath, "model"))
            try:
                model = PricingModel(text or "")
            except ValueError:
                choices = [k.value for k in PricingModel]
                self.problem(
                    _join(upath, "model"),
                    f"unknown pricing model {text!r} (expected one of: {', '.join(choices)})",
                )
                return None
        ok = True
        uses = {
            PricingModel.PER_UNIT: "unit_price",
            PricingModel.GRADUATED: "tiers",
            PricingModel.VOLUME: "tiers",
            PricingModel.PACKAGE: "package",
        }
        needed = uses[model]
        for key in ("unit_price", "tiers", "package"):
            present = not _is_null(u.get(key))
            if key == needed and not present:
                self.problem(upath, f"model {model.value} needs {key!r}")
                ok = False
            elif key != needed and present:
                self.problem(
                    _join(upath, key), f"not used by model {model.value} (it uses {needed!r})"
                )
                ok = False
        prices: dict[str, Decimal] | None = {}
        tiers: tuple[Tier, ...] = ()
        package: Package | None = None
        if ok and needed == "unit_price":
            prices = self.money(u["unit_price"], _join(upath, "unit_price"), "unit price")
        elif ok and needed == "tiers":
            parsed = self.tiers(u["tiers"], _join(upath, "tiers"))
            ok = parsed is not None
            tiers = parsed or ()
        elif ok:
            package = self.package(u["package"], _join(upath, "package"))
            ok = package is not None
        included: Decimal | None = Decimal(0)
        if not _is_null(u.get("included")):
            included = self.decimal(u["included"], _join(upath, "included"), "allowance")
        if not ok or meter is None or prices is None or included is None:
            return None
        return UsageCharge(meter, prices, included, model, tiers, package)

    def tiers(self, value: object, path: str) -> tuple[Tier, ...] | None:
        entries = self.items(value, path)
        if not entries:
            self.problem(path, "no tiers given")
            return None
        tiers: list[Tier] = []
        ok = True
        previous: Decimal | None = None
        currencies: frozenset[str] | None = None
        for i, entry in enumerate(entries):
            tpath = f"{path}[{i}]"
            t = self.mapping(entry, tpath, ("up_to", "unit_price"))
            if t is None:
                ok = False
                continue
            last = i == len(entries) - 1
            up_to: Decimal | None = None
            if "up_to" in t and not _is_null(t["up_to"]):
                up_to = self.decimal(t["up_to"], _join(tpath, "up_to"), "tier bound")
                if up_to is None:
                    ok = False
                elif last:
                    self.problem(
                        _join(tpath, "up_to"),
                        f"the last tier must be unbounded (up_to: null), not {up_to}",
                    )
                    ok = False
                elif previous is not None and up_to <= previous:
                    self.problem(
                        _join(tpath, "up_to"), f"tiers out of order: {up_to} after {previous}"
                    )
                    ok = False
                elif up_to == 0:
                    self.problem(_join(tpath, "up_to"), "a tier bound must be above 0")
                    ok = False
                else:
                    previous = up_to
            elif not last:
                self.problem(
                    _join(tpath, "up_to"), "only the last tier may be unbounded (up_to: null)"
                )
                ok = False
            prices = (
                self.money(t["unit_price"], _join(tpath, "unit_price"), "unit price")
                if "unit_price" in t
                else None
            )
            if prices is None:
                ok = False
                continue
            if currencies is None:
                currencies = frozenset(prices)
            elif frozenset(prices) != currencies:
                self.problem(
                    _join(tpath, "unit_price"),
                    f"priced in {', '.join(sorted(prices))} but the first tier in "
                    f"{', '.join(sorted(currencies))} (every tier needs every currency)",
                )
                ok = False
            tiers.append(Tier(up_to, prices))
        return tuple(tiers) if ok else None

    def package(self, value: object, path: str) -> Package | None:
        m = self.mapping(value, path, ("size", "price"))
        if m is None:
            return None
        size = self.decimal(m["size"], _join(path, "size"), "package size") if "size" in m else None
        if size is not None and size == 0:
            self.problem(_join(path, "size"), "a package size must be above 0")
            size = None
        prices = self.money(m["price"], _join(path, "price"), "price") if "price" in m else None
        if size is None or prices is None:
            return None
        return Package(size, prices)

    def account(
        self,
        value: object,
        path: str,
        plans: Mapping[str, Plan | None] | None = None,
        meters: Mapping[str, Meter | None] | None = None,
    ) -> Account | None:
        a = self.mapping(
            value,
            path,
            ("id", "name", "currency", "timezone"),
            (
                "billing_period",
                "timezone_changes",
                "tax",
                "price_overrides",
                "commitment",
                "bill_to",
                "reseller",
            ),
        )
        if a is None:
            return None
        ident = self.ident(a["id"], _join(path, "id")) if "id" in a else None
        name = self.string(a["name"], _join(path, "name")) if "name" in a else None
        currency = (
            self.currency(a["currency"], _join(path, "currency")) if "currency" in a else None
        )
        timezone = (
            self.timezone(a["timezone"], _join(path, "timezone")) if "timezone" in a else None
        )
        ok = True
        billing_period: BillingPeriod | None = BillingPeriod()
        if not _is_null(a.get("billing_period")):
            billing_period = self.billing_period(a["billing_period"], _join(path, "billing_period"))
        changes: list[TimezoneChange] = []
        for i, entry in enumerate(
            self.items(a.get("timezone_changes"), _join(path, "timezone_changes"))
        ):
            change = self.timezone_change(entry, f"{_join(path, 'timezone_changes')}[{i}]")
            if change is None:
                ok = False
            elif changes and (change.year, change.month) <= (changes[-1].year, changes[-1].month):
                self.problem(
                    f"{_join(path, 'timezone_changes')}[{i}].from_period",
                    "timezone changes must be in increasing order of from_period",
                )
                ok = False
            else:
                changes.append(change)
        tax: TaxProfile | None = None
        if not _is_null(a.get("tax")):
            tax = self.tax_profile(a["tax"], _join(path, "tax"))
            ok = ok and tax is not None
        commitment: dict[str, Decimal] | None = {}
        if not _is_null(a.get("commitment")):
            cpath = _join(path, "commitment")
            commitment = self.exact_money(a["commitment"], cpath, "commitment")
            if commitment is not None and currency is not None and currency not in commitment:
                self.problem(cpath, f"no {currency} amount (the account is billed in {currency})")
                commitment = None
        overrides: dict[str, PriceOverride] = {}
        opath = _join(path, "price_overrides")
        for i, entry in enumerate(self.items(a.get("price_overrides"), opath)):
            override = self.price_override(
                entry, f"{opath}[{i}]", plans or {}, meters or {}, currency
            )
            if override is None:
                ok = False
            elif override.plan_id in overrides:
                self.problem(f"{opath}[{i}].plan", f"plan {override.plan_id!r} is overridden twice")
                ok = False
            else:
                overrides[override.plan_id] = override
        if (
            not ok
            or ident is None
            or name is None
            or currency is None
            or timezone is None
            or billing_period is None
            or commitment is None
        ):
            return None
        relations = {
            key: self.ident(a[key], _join(path, key)) if not _is_null(a.get(key)) else None
            for key in ("bill_to", "reseller")
        }
        if relations["bill_to"] is not None and relations["reseller"] is not None:
            self.problem(
                _join(path, "reseller"),
                "an account has either bill_to or reseller, not both (a reseller's customer "
                "is billed by the reseller)",
            )
            return None
        return Account(
            ident,
            name,
            currency,
            timezone,
            billing_period,
            tuple(changes),
            tax,
            overrides,
            commitment,
            relations["bill_to"],
            relations["reseller"],
        )

    def timezone(self, value: object, path: str) -> str | None:
        timezone = self.string(value, path)
        if timezone is not None and not _valid_timezone(timezone):
            self.problem(path, f"unknown IANA timezone {timezone!r} (like Europe/Berlin or UTC)")
            return None
        return timezone

    def small_int(self, value: object, path: str, lo: int, hi: int) -> int | None:
        text = self.string(value, path)
        if text is None:
            return None
        if not _INTEGER.fullmatch(text) or not lo <= int(text) <= hi:
            self.problem(path, f"expected a whole number from {lo} to {hi}, got {text!r}")
            return None
        return int(text)

    def billing_period(self, value: object, path: str) -> BillingPeriod | None:
        m = self.mapping(value, path, ("policy",), ("day", "days", "anchor"))
        if m is None or "policy" not in m:
            return None
        text = self.string(m["policy"], _join(path, "policy"))
        try:
            policy = PeriodPolicy(text or "")
        except ValueError:
            choices = [k.value for k in PeriodPolicy]
            self.problem(
                _join(path, "policy"),
                f"unknown billing-period policy {text!r} (expected one of: {', '.join(choices)})",
            )
            return None
        needs = {
            PeriodPolicy.CALENDAR_MONTH: (),
            PeriodPolicy.MONTH_END_DAY: ("day",),
            PeriodPolicy.DAYS_BEFORE_MONTH_END: ("days",),
            PeriodPolicy.ANNIVERSARY: (),
        }[policy]
        optional = ("anchor",) if policy is PeriodPolicy.ANNIVERSARY else ()
        ok = True
        for key in ("day", "days", "anchor"):
            if key in m and key not in needs and key not in optional:
                self.problem(_join(path, key), f"not used by policy {policy.value}")
                ok = False
            elif key in needs and key not in m:
                self.problem(path, f"policy {policy.value} needs {key!r}")
                ok = False
        if not ok:
            return None
        day = days = None
        anchor: date | None = None
        if "day" in m:
            day = self.small_int(m["day"], _join(path, "day"), 1, 31)
            if day is None:
                return None
        if "days" in m:
            days = self.small_int(m["days"], _join(path, "days"), 0, 27)
            if days is None:
                return None
        if "anchor" in m and not _is_null(m["anchor"]):
            text = self.string(m["anchor"], _join(path, "anchor"))
            try:
                anchor = date.fromisoformat(text or "")
            except ValueError:
                self.problem(_join(path, "anchor"), f"not a date (YYYY-MM-DD): {text!r}")
                return None
        return BillingPeriod(policy, day, days, anchor)

    def timezone_change(self, value: object, path: str) -> TimezoneChange | None:
        m = self.mapping(value, path, ("from_period", "timezone"))
        if m is None or "from_period" not in m or "timezone" not in m:
            return None
        text = self.string(m["from_period"], _join(path, "from_period"))
        match = _MONTH.fullmatch(text or "")
        if match is None or not 1 <= int(match[2]) <= 12:
            self.problem(_join(path, "from_period"), f"not a period label YYYY-MM: {text!r}")
            return None
        timezone = self.timezone(m["timezone"], _join(path, "timezone"))
        if timezone is None:
            return None
        return TimezoneChange(int(match[1]), int(match[2]), timezone)

    def tax_profile(self, value: object, path: str) -> TaxProfile | None:
        m = self.mapping(value, path, ("kind",), ("rate", "jurisdiction", "line_level_rounding"))
        if m is None or "kind" not in m:
            return None
        text = self.string(m["kind"], _join(path, "kind"))
        try:
            kind = TaxKind(text or "")
        except ValueError:
            choices = [k.value for k in TaxKind]
            self.problem(
                _join(path, "kind"),
                f"unknown tax kind {text!r} (expected one of: {', '.join(choices)})",
            )
            return None
        rate = Decimal(0)
        if kind is TaxKind.RATE:
            if "rate" not in m:
                self.problem(path, "tax kind rate needs 'rate' (percent, e.g. \"19\")")
                return None
            parsed = self.decimal(m["rate"], _join(path, "rate"), "tax rate")
            if parsed is None:
                return None
            if parsed > 100:
                self.problem(_join(path, "rate"), f"a tax rate is a percentage, not {parsed}")
                return None
            rate = parsed
        elif "rate" in m:
            self.problem(_join(path, "rate"), f"no rate for tax kind {kind.value} (it is 0 %)")
            return None
        jurisdiction = (
            self.string(m["jurisdiction"], _join(path, "jurisdiction"))
            if not _is_null(m.get("jurisdiction"))
            else None
        )
        line_level = False
        if not _is_null(m.get("line_level_rounding")):
            flag = self.string(m["line_level_rounding"], _join(path, "line_level_rounding"))
            if flag not in ("true", "false"):
                self.problem(
                    _join(path, "line_level_rounding"), f"expected true or false, got {flag!r}"
                )
                return None
            line_level = flag == "true"
        return TaxProfile(kind, rate, jurisdiction, line_level)

    def price_override(
        self,
        value: object,
        path: str,
        plans: Mapping[str, Plan | None],
        meters: Mapping[str, Meter | None],
        currency: str | None,
    ) -> PriceOverride | None:
        m = self.mapping(value, path, ("plan",), ("recurring", "hourly", "usage"))
        if m is None:
            return None
        plan_id = self.ident(m["plan"], _join(path, "plan")) if "plan" in m else None
        if not self.reference(plan_id, _join(path, "plan"), plans, "plan") or plan_id is None:
            return None
        plan = plans[plan_id]
        if plan is None:
            return None
        ok = True
        if not _is_null(m.get("recurring")) and plan.recurring is None:
            self.problem(_join(path, "recurring"), f"plan {plan_id!r} has no recurring fee")
            ok = False
        if not _is_null(m.get("hourly")) and plan.hourly is None:
            self.problem(_join(path, "hourly"), f"plan {plan_id!r} has no hourly rate")
            ok = False
        charges = self.charges(m, path, meters, {u.meter: u for u in plan.usage})
        if charges is None or not ok:
            return None
        recurring, hourly, usage = charges
        # A usage override without ``included`` keeps the plan's allowance.
        raw_usage = m.get("usage")
        raw = raw_usage if isinstance(raw_usage, list) else []
        plan_included = {u.meter: u.included for u in plan.usage}
        usage = tuple(
            u
            if isinstance(entry, dict) and not _is_null(entry.get("included"))
            else replace(u, included=plan_included[u.meter])
            for u, entry in zip(usage, raw, strict=True)
        )
        override = PriceOverride(plan_id, recurring, hourly, usage)
        if currency is not None:
            for charge in _unpriced_charges(override.apply(plan), currency):
                self.problem(
                    path,
                    f"the override of plan {plan_id!r} has no {currency} price for {charge}",
                )
                ok = False
        return override if ok else None

    def campaign(
        self,
        value: object,
        path: str,
        plans: Mapping[str, Plan | None],
        meters: Mapping[str, Meter | None],
        accounts: Mapping[str, Account | None],
    ) -> Campaign | None:
        m = self.mapping(
            value,
            path,
            ("id", "name", "kind"),
            ("percent", "amount", "from", "to", "scope", "accounts", "first_periods"),
        )
        if m is None:
            return None
        ident = self.ident(m["id"], _join(path, "id")) if "id" in m else None
        name = self.string(m["name"], _join(path, "name")) if "name" in m else None
        ok = ident is not None and name is not None
        kind: DiscountKind | None = None
        if "kind" in m:
            text = self.string(m["kind"], _join(path, "kind"))
            try:
                kind = DiscountKind(text or "")
            except ValueError:
                choices = [k.value for k in DiscountKind]
                self.problem(
                    _join(path, "kind"),
                    f"unknown discount kind {text!r} (expected one of: {', '.join(choices)})",
                )
        percent = Decimal(0)
        amounts: dict[str, Decimal] = {}
        if kind is DiscountKind.PERCENTAGE:
            if "amount" in m:
                self.problem(_join(path, "amount"), "a percentage campaign takes 'percent'")
                ok = False
            parsed = (
                self.decimal(m["percent"], _join(path, "percent"), "percentage")
                if "percent" in m
                else None
            )
            if "percent" not in m:
                self.problem(path, "a percentage campaign needs 'percent'")
            if parsed is not None and not 0 < parsed <= 100:
                self.problem(_join(path, "percent"), f"expected 0 < percent <= 100, got {parsed}")
                parsed = None
            ok = ok and parsed is not None
            percent = parsed or Decimal(0)
        elif kind is DiscountKind.FIXED:
            if "percent" in m:
                self.problem(_join(path, "percent"), "a fixed campaign takes 'amount'")
                ok = False
            money = (
                self.exact_money(m["amount"], _join(path, "amount"), "amount")
                if "amount" in m
                else None
            )
            if "amount" not in m:
                self.problem(path, "a fixed campaign needs 'amount'")
            ok = ok and money is not None
            amounts = money or {}
        else:
            ok = False
        start = self.optional_instant(m.get("from"), _join(path, "from"))
        end = self.optional_instant(m.get("to"), _join(path, "to"))
        if start is not None and end is not None and start >= end:
            self.problem(_join(path, "to"), "must be after 'from'")
            ok = False
        plan_id = meter = None
        charge: ChargeKind | None = None
        if not _is_null(m.get("scope")):
            spath = _join(path, "scope")
            scope = self.mapping(m["scope"], spath, (), ("plan", "charge", "meter"))
            if scope is None:
                ok = False
            else:
                if "plan" in scope:
                    plan_id = self.ident(scope["plan"], _join(spath, "plan"))
                    ok = self.reference(plan_id, _join(spath, "plan"), plans, "plan") and ok
                if "meter" in scope:
                    meter = self.ident(scope["meter"], _join(spath, "meter"))
                    ok = self.reference(meter, _join(spath, "meter"), meters, "meter") and ok
                if "charge" in scope:
                    text = self.string(scope["charge"], _join(spath, "charge"))
                    try:
                        charge = ChargeKind(text or "")
                    except ValueError:
                        choices = [k.value for k in ChargeKind]
                        self.problem(
                            _join(spath, "charge"),
                            f"unknown charge kind {text!r} (expected one of: {', '.join(choices)})",
                        )
                        ok = False
                if meter is not None and charge not in (None, ChargeKind.USAGE):
                    self.problem(spath, "a meter scope applies to usage charges only")
                    ok = False
        account_ids: list[str] = []
        for i, entry in enumerate(self.items(m.get("accounts"), _join(path, "accounts"))):
            apath = f"{_join(path, 'accounts')}[{i}]"
            account_id = self.ident(entry, apath)
            if self.reference(account_id, apath, accounts, "account") and account_id is not None:
                account_ids.append(account_id)
                acct = accounts[account_id]
                if kind is DiscountKind.FIXED and acct is not None and acct.currency not in amounts:
                    self.problem(
                        _join(path, "amount"),
                        f"no {acct.currency} amount for account {account_id!r}",
                    )
                    ok = False
            else:
                ok = False
        if kind is DiscountKind.FIXED and not account_ids and amounts:
            needed = {a.currency for a in accounts.values() if a is not None}
            for currency in sorted(needed - set(amounts)):
                self.problem(
                    _join(path, "amount"),
                    f"no {currency} amount (the campaign applies to every account, and some "
                    f"are billed in {currency}; give the amount or list 'accounts')",
                )
                ok = False
        first_periods = None
        if not _is_null(m.get("first_periods")):
            first_periods = self.positive_int(m["first_periods"], _join(path, "first_periods"))
            ok = ok and first_periods is not None
        if not ok or ident is None or name is None or kind is None:
            return None
        return Campaign(
            ident,
            name,
            kind,
            percent,
            amounts,
            start,
            end,
            plan_id,
            charge,
            meter,
            tuple(account_ids),
            first_periods,
        )

    def billing_rule(
        self,
        value: object,
        path: str,
        accounts: Mapping[str, Account | None],
        subscriptions: Mapping[str, Subscription | None],
        meters: Mapping[str, Meter | None],
    ) -> BillingRule | None:
        m = self.mapping(value, path, ("id", "from", "match", "reason"), ("to",))
        if m is None:
            return None
        ident = self.ident(m["id"], _join(path, "id")) if "id" in m else None
        reason = self.string(m["reason"], _join(path, "reason")) if "reason" in m else None
        start = self.instant(m["from"], _join(path, "from")) if "from" in m else None
        end = self.optional_instant(m.get("to"), _join(path, "to"))
        ok = ident is not None and reason is not None and start is not None
        ok = ok and (end is not None or _is_null(m.get("to")))
        if start is not None and end is not None and start >= end:
            self.problem(_join(path, "to"), f"{end.isoformat()} is not after 'from'")
            ok = False
        criteria: dict[str, str | None] = {"account": None, "subscription": None, "meter": None}
        if "match" in m:
            mpath = _join(path, "match")
            unsupported = ("resource", "labels")
            match: Mapping[str, object] | None = {}
            if not _is_null(m["match"]):
                match = self.mapping(m["match"], mpath, (), (*criteria, *unsupported))
                ok = ok and match is not None
            for key in unsupported:
                if match is not None and key in match:
                    self.problem(
                        _join(mpath, key),
                        f"matching by {key} is not supported: the store keeps usage per "
                        "(subscription, meter, hour), not per resource or label; match by "
                        "account, subscription or meter",
                    )
                    ok = False
            known: dict[str, tuple[Mapping[str, object], str]] = {
                "account": (accounts, "account"),
                "subscription": (subscriptions, "subscription"),
                "meter": (meters, "meter"),
            }
            for key, (table, what) in known.items():
                if match is None or _is_null(match.get(key)):
                    continue
                ident_value = self.ident(match[key], _join(mpath, key))
                if self.reference(ident_value, _join(mpath, key), table, what):
                    criteria[key] = ident_value
                else:
                    ok = False
            sub = criteria["subscription"]
            acct = criteria["account"]
            sub_obj = subscriptions.get(sub) if sub is not None else None
            if sub_obj is not None and acct is not None and sub_obj.account_id != acct:
                self.problem(
                    _join(mpath, "subscription"),
                    f"subscription {sub!r} belongs to account {sub_obj.account_id!r}, "
                    f"not {acct!r} (the rule could never match)",
                )
                ok = False
        if not ok or ident is None or reason is None or start is None:
            return None
        return BillingRule(
            ident,
            reason,
            start,
            end,
            criteria["account"],
            criteria["subscription"],
            criteria["meter"],
        )

    def price_book(
        self,
        value: object,
        path: str,
        accounts: Mapping[str, Account | None],
        plans: Mapping[str, Plan | None],
        meters: Mapping[str, Meter | None],
    ) -> PriceBook | None:
        m = self.mapping(value, path, ("id", "reseller", "plans"), ("campaigns",))
        if m is None:
            return None
        ident = self.ident(m["id"], _join(path, "id")) if "id" in m else None
        reseller = self.ident(m["reseller"], _join(path, "reseller")) if "reseller" in m else None
        ok = self.reference(reseller, _join(path, "reseller"), accounts, "account")
        book: dict[str, Plan] = {}
        ppath = _join(path, "plans")
        entries = self.items(m.get("plans"), ppath)
        if not entries and "plans" in m:
            self.problem(ppath, "a price book prices at least one plan")
            ok = False
        for i, entry in enumerate(entries):
            epath = f"{ppath}[{i}]"
            plan = self.plan(entry, epath, meters)
            if plan is None:
                ok = False
                continue
            if not self.reference(plan.id, _join(epath, "id"), plans, "platform plan"):
                ok = False
            elif plan.id in book:
                self.problem(_join(epath, "id"), f"plan {plan.id!r} is priced twice in the book")
                ok = False
            else:
                book[plan.id] = plan
        campaigns = self.section(
            self.items(m.get("campaigns"), _join(path, "campaigns")),
            _join(path, "campaigns"),
            "id",
            lambda v, p: self.campaign(v, p, plans, meters, accounts),
        )
        if any(c is None for c in campaigns.values()):
            ok = False
        if not ok or ident is None or reseller is None:
            return None
        live = {k: c for k, c in campaigns.items() if c is not None}
        return PriceBook(ident, reseller, book, live)

    def billing_relations(
        self,
        entries: list[object],
        accounts: Mapping[str, Account | None],
        subscriptions: Mapping[str, Subscription | None],
        plans: Mapping[str, Plan | None],
        books: Mapping[str, PriceBook | None],
    ) -> None:
        """bill_to and reseller across accounts (BILLING-SEMANTICS §9): known accounts, the
        same currency as the payer, no cycles; a reseller's customer is priced in its book."""
        paths = {
            entry["id"]: f"accounts[{i}]"
            for i, entry in enumerate(entries)
            if isinstance(entry, dict) and isinstance(entry.get("id"), str)
        }
        book_of: dict[str, PriceBook] = {}
        for book in books.values():
            if book is None:
                continue
            if book.reseller_id in book_of:
                self.problem(
                    "price_books",
                    f"account {book.reseller_id!r} has two price books "
                    f"({book_of[book.reseller_id].id!r}, {book.id!r}); one per reseller",
                )
            book_of[book.reseller_id] = book
        live = {k: v for k, v in accounts.items() if v is not None}
        for account_id, account in sorted(live.items()):
            path = paths.get(account_id, "accounts")
            if account.bill_to is not None:
                self.bill_to_problems(account, path, live)
            if account.reseller is not None:
                self.reseller_problems(
                    account,
                    path=path,
                    live=live,
                    subscriptions=subscriptions,
                    plans=plans,
                    book_of=book_of,
                )

    def bill_to_problems(self, account: Account, path: str, live: Mapping[str, Account]) -> None:
        bpath = _join(path, "bill_to")
        payer = live.get(account.bill_to or "")
        if payer is None:
            self.reference(account.bill_to, bpath, live, "account")
            return
        if payer.currency != account.currency:
            self.problem(
                bpath,
                f"account {account.id!r} is billed in {account.currency} but its payer "
                f"{payer.id!r} in {payer.currency} (bill_to needs the same currency)",
            )
        if payer.reseller is not None:
            self.problem(
                bpath, f"payer {payer.id!r} is a reseller's customer; it cannot pay for others"
            )
        chain = [account.id]
        current: Account | None = payer
        while current is not None:
            if current.id in chain:
                cycle = " -> ".join([*chain[chain.index(current.id) :], current.id])
                self.problem(bpath, f"account {account.id!r}: bill_to forms a cycle ({cycle})")
                return
            chain.append(current.id)
            current = live.get(current.bill_to) if current.bill_to is not None else None

    def reseller_problems(
        self,
        account: Account,
        *,
        path: str,
        live: Mapping[str, Account],
        subscriptions: Mapping[str, Subscription | None],
        plans: Mapping[str, Plan | None],
        book_of: Mapping[str, PriceBook],
    ) -> None:
        rpath = _join(path, "reseller")
        reseller = live.get(account.reseller or "")
        if reseller is None:
            self.reference(account.reseller, rpath, live, "account")
            return
        if reseller.reseller is not None or reseller.bill_to is not None:
            self.problem(
                rpath,
                f"reseller {reseller.id!r} is itself a reseller's customer or billed to "
                "another account (one level of reselling)",
            )
            return
        book = book_of.get(reseller.id)
        if book is None:
            self.problem(rpath, f"reseller {reseller.id!r} has no price book (price_books)")
            return
        for sub_id, subscription in sorted(subscriptions.items()):
            if subscription is None or subscription.account_id != account.id:
                continue
            for plan_id in subscription.plan_ids():
                own = book.plans.get(plan_id)
                if own is None:
                    self.problem(
                        rpath,
                        f"subscription {sub_id!r} is on plan {plan_id!r}, which price book "
                        f"{book.id!r} of reseller {reseller.id!r} does not price",
                    )
                    continue
                for charge in _unpriced_charges(own, account.currency):
                    self.problem(
                        rpath,
                        f"price book {book.id!r}: plan {plan_id!r} has no {account.currency} "
                        f"price for {charge} (subscription {sub_id!r})",
                    )
                platform = plans.get(plan_id)
                if platform is None:
                    continue
                for charge in _unpriced_charges(platform, reseller.currency):
                    self.problem(
                        rpath,
                        f"plan {plan_id!r} has no {reseller.currency} price for {charge} "
                        f"(reseller {reseller.id!r} is billed for subscription {sub_id!r} "
                        f"in {reseller.currency})",
                    )

    def subscription(
        self,
        value: object,
        path: str,
        plans: Mapping[str, Plan | None],
        accounts: Mapping[str, Account | None],
    ) -> Subscription | None:
        s = self.mapping(value, path, ("id", "account", "plan", "start"), ("end", "plan_changes"))
        if s is None:
            return None
        ident = self.ident(s["id"], _join(path, "id")) if "id" in s else None
        account_id = self.ident(s["account"], _join(path, "account")) if "account" in s else None
        plan_id = self.ident(s["plan"], _join(path, "plan")) if "plan" in s else None
        account_ok = self.reference(account_id, _join(path, "account"), accounts, "account")
        plan_ok = self.reference(plan_id, _join(path, "plan"), plans, "plan")
        start = self.instant(s["start"], _join(path, "start")) if "start" in s else None
        end = self.optional_instant(s.get("end"), _join(path, "end"))
        ok = start is not None and (end is not None or _is_null(s.get("end")))
        if start is not None and end is not None and start >= end:
            self.problem(
                _join(path, "end"),
                f"end {end.isoformat()} is not after start {start.isoformat()}",
            )
            ok = False
        if account_ok and plan_ok and account_id is not None and plan_id is not None:
            account, plan = accounts[account_id], plans[plan_id]
            if account is not None and plan is not None:
                for charge in _unpriced_charges(plan, account.currency):
                    self.problem(
                        _join(path, "plan"),
                        f"plan {plan.id!r} has no {account.currency} price for {charge} "
                        f"(account {account.id!r} is billed in {account.currency})",
                    )
        account = accounts[account_id] if account_ok and account_id is not None else None
        changes = self.plan_changes(
            s.get("plan_changes"), path, plan_id=plan_id, start=start, end=end, plans=plans
        )
        changes_ok = changes is not None and (
            account is None or self.changes_priced(changes, path, plans, account)
        )
        if not (ok and account_ok and plan_ok and changes_ok) or ident is None or start is None:
            return None
        assert account_id is not None
        assert plan_id is not None
        assert changes is not None
        return Subscription(ident, account_id, plan_id, start, end, changes)

    def plan_changes(
        self,
        value: object,
        path: str,
        *,
        plan_id: str | None,
        start: datetime | None,
        end: datetime | None,
        plans: Mapping[str, Plan | None],
    ) -> tuple[PlanChange, ...] | None:
        """``plan_changes: [{at, plan}]``: strictly after the start, before the end, in
        increasing order, each to a known plan other than the one it replaces (so the plan
        segments tile the subscription without overlaps or empty segments)."""
        changes: list[PlanChange] = []
        ok = True
        previous_at, previous_plan = start, plan_id
        for i, entry in enumerate(self.items(value, _join(path, "plan_changes"))):
            cpath = f"{_join(path, 'plan_changes')}[{i}]"
            c = self.mapping(entry, cpath, ("at", "plan"))
            if c is None:
                ok = False
                continue
            at = self.instant(c["at"], _join(cpath, "at")) if "at" in c else None
            target = self.ident(c["plan"], _join(cpath, "plan")) if "plan" in c else None
            if not self.reference(target, _join(cpath, "plan"), plans, "plan"):
                ok = False
            if at is None or target is None:
                ok = False
                continue
            if previous_at is not None and at <= previous_at:
                what = "the subscription start" if i == 0 else f"plan_changes[{i - 1}].at"
                self.problem(
                    _join(cpath, "at"),
                    f"{at.isoformat()} is not after {what} ({previous_at.isoformat()}): plan "
                    "changes are in increasing order inside the subscription (plan segments "
                    "must not overlap)",
                )
                ok = False
            if end is not None and at >= end:
                self.problem(
                    _join(cpath, "at"),
                    f"{at.isoformat()} is not before the subscription end {end.isoformat()}",
                )
                ok = False
            if target == previous_plan:
                self.problem(
                    _join(cpath, "plan"),
                    f"plan {target!r} is already in effect (a change must change the plan)",
                )
                ok = False
            changes.append(PlanChange(at, target))
            previous_at, previous_plan = max(at, previous_at or at), target
        return tuple(changes) if ok else None

    def changes_priced(
        self,
        changes: tuple[PlanChange, ...],
        path: str,
        plans: Mapping[str, Plan | None],
        account: Account,
    ) -> bool:
        ok = True
        for i, change in enumerate(changes):
            plan = plans.get(change.plan_id)
            if plan is None:
                continue
            for charge in _unpriced_charges(plan, account.currency):
                self.problem(
                    f"{_join(path, 'plan_changes')}[{i}].plan",
                    f"plan {plan.id!r} has no {account.currency} price for {charge} "
                    f"(account {account.id!r} is billed in {account.currency})",
                )
                ok = False
        return ok

    def resource(
        self,
        value: object,
        path: str,
        subscriptions: Mapping[str, Subscription | None],
        plans: Mapping[str, Plan | None] | None = None,
        accounts: Mapping[str, Account | None] | None = None,
    ) -> Resource | None:
        r = self.mapping(value, path, ("id", "subscription", "kind"), ("spans",))
        if r is None:
            return None
        ident = self.ident(r["id"], _join(path, "id")) if "id" in r else None
        sub_id = (
            self.ident(r["subscription"], _join(path, "subscription"))
            if "subscription" in r
            else None
        )
        sub_ok = self.reference(sub_id, _join(path, "subscription"), subscriptions, "subscription")
        kind = self.string(r["kind"], _join(path, "kind")) if "kind" in r else None
        spans: list[tuple[str, Span]] = []
        ok = True
        for i, entry in enumerate(self.items(r.get("spans"), _join(path, "spans"))):
            spath = f"{_join(path, 'spans')}[{i}]"
            sp = self.mapping(entry, spath, ("start",), ("end", "subscription", "plan"))
            if sp is None:
                ok = False
                continue
            start = self.instant(sp["start"], _join(spath, "start")) if "start" in sp else None
            end = self.optional_instant(sp.get("end"), _join(spath, "end"))
            owner = self.span_owner(
                sp,
                spath,
                sub_id if sub_ok else None,
                subscriptions=subscriptions,
                plans=plans or {},
                accounts=accounts,
            )
            if start is None or (end is None and not _is_null(sp.get("end"))) or owner is None:
                ok = False
                continue
            if end is not None and start >= end:
                self.problem(
                    _join(spath, "end"),
                    f"end {end.isoformat()} is not after start {start.isoformat()}",
                )
                ok = False
                continue
            spans.append((spath, Span(start, end, *owner)))
        ordered = sorted(spans, key=lambda ps: ps[1].start)
        # The span reaching furthest so far: any later-starting span that begins before
        # its end overlaps it.
        reach: tuple[str, Span] | None = None
        for cur_path, cur in ordered:
            if reach is not None and (reach[1].end is None or cur.start < reach[1].end):
                self.problem(
                    cur_path, f"overlaps {reach[0]} (the spans of a resource are disjoint)"
                )
                ok = False
            if reach is None or (
                reach[1].end is not None and (cur.end is None or cur.end > reach[1].end)
            ):
                reach = (cur_path, cur)
        if not ok or ident is None or sub_id is None or not sub_ok or kind is None:
            return None
        return Resource(ident, sub_id, kind, tuple(s for _, s in ordered))

    def span_owner(
        self,
        sp: Mapping[str, object],
        spath: str,
        home: str | None,
        *,
        subscriptions: Mapping[str, Subscription | None],
        plans: Mapping[str, Plan | None],
        accounts: Mapping[str, Account | None] | None,
    ) -> tuple[str | None, str | None] | None:
        """A span's optional ``subscription`` and ``plan`` (as given; None = the default),
        or None when invalid. The subscription must exist; the plan (given, or the default:
        the subscription's plan at the span start) must be priced in its account's currency.
        A span need not lie inside its subscription's life (time outside is not billed)."""
        sub_id = (
            self.ident(sp["subscription"], _join(spath, "subscription"))
            if "subscription" in sp
            else None
        )
        if "subscription" in sp and not self.reference(
            sub_id, _join(spath, "subscription"), subscriptions, "subscription"
        ):
            return None
        plan_id = self.ident(sp["plan"], _join(spath, "plan")) if "plan" in sp else None
        if "plan" in sp and not self.reference(plan_id, _join(spath, "plan"), plans, "plan"):
            return None
        owner_id = sub_id if sub_id is not None else home
        subscription = subscriptions.get(owner_id) if owner_id is not None else None
        if plan_id is not None and subscription is not None and accounts is not None:
            account = accounts.get(subscription.account_id)
            plan = plans.get(plan_id)
            if account is not None and plan is not None:
                missing = _unpriced_charges(plan, account.currency)
                for charge in missing:
                    self.problem(
                        _join(spath, "plan"),
                        f"plan {plan.id!r} has no {account.currency} price for {charge} "
                        f"(the span is on subscription {subscription.id!r} of account "
                        f"{account.id!r}, billed in {account.currency})",
                    )
                if missing:
                    return None
        return sub_id, plan_id


def _resolve_anchor(account: Account, subscriptions: Iterable[Subscription]) -> Account:
    """An anniversary policy without an explicit anchor is anchored at the local date (in
    the account's timezone) of its earliest subscription start."""
    period = account.billing_period
    if period.policy is not PeriodPolicy.ANNIVERSARY or period.anchor is not None:
        return account
    starts = [s.start for s in subscriptions if s.account_id == account.id]
    if not starts:
        return account
    anchor = min(starts).astimezone(ZoneInfo(account.timezone)).date()
    return replace(account, billing_period=replace(period, anchor=anchor))


def _valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _unpriced_charges(plan: Plan, currency: str) -> list[str]:
    missing: list[str] = []
    if plan.recurring is not None and currency not in plan.recurring.fees:
        missing.append("recurring.fee")
    if plan.hourly is not None and currency not in plan.hourly.rates:
        missing.append("hourly.rate")
    missing.extend(
        f"usage of {u.meter!r} ({_PRICE_KEY[u.model]})"
        for u in plan.usage
        if currency not in u.currencies()
    )
    return missing
