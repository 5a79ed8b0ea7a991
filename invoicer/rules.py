"""Billing rules: non-billable usage (BILLING-SEMANTICS §8).

A rule names a range ``[from, to)`` and match criteria (account, subscription, meter). The
usage hours of a matching (subscription, meter) whose start lies in the range are
non-billable: the invoice shows them as excluded (``excluded_quantity``) and charges only
the rest; the allowance and the tiers apply to the billable rest.

The store keeps usage per (subscription, meter, UTC hour), so this module works on hour
buckets, with the same rule as periods: a bucket belongs to a rule's range when its
``hour_start`` is in ``[from, to)``. A boundary inside an hour therefore takes effect at the
next whole UTC hour (``from: 10:30`` leaves the 10:00 bucket billable and excludes the 11:00
one; ``to: 12:30`` still excludes the 12:00 bucket). Overlapping rules exclude an hour once.

Counter and gauge meters: billable = the window's total minus the excluded hours' sums.
Peak meters: the billable peak is the highest level of the hours *not* excluded (the
excluded quantity shown is the difference between the whole peak and that peak).

``usage_with_rules`` asks a ``fetch`` function (``Store.usage_totals``) for the totals of
the rule ranges (counter, gauge) or of the ranges between them (peak), one call per
distinct range, and returns the billable totals and the exclusions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from fractions import Fraction

from aggregation.ports import UsageTotal
from invoicer.exact import decimal_text, truncate
from invoicer.invoice import InvoiceLine
from rating.catalog import BillingRule, Catalog, MeterKind

# fetch(start, end, subscription_ids) -> totals per (subscription, meter) over the hours
# with start <= hour_start < end (Store.usage_totals).
Fetch = Callable[[datetime, datetime, Sequence[str]], Sequence[UsageTotal]]
Window = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True)
class Exclusion:
    """What billing rules took out of one (subscription, meter)'s usage in a window."""

    subscription_id: str
    meter: str
    full: UsageTotal  # the usage before the rules
    billable: UsageTotal  # what is left to price
    rule_ids: tuple[str, ...]
    reasons: tuple[str, ...]  # of the rules, in rule-id order, without repeats


@dataclass(frozen=True, slots=True)
class RuledUsage:
    totals: list[UsageTotal]  # billable totals, same order as given
    exclusions: dict[tuple[str, str], Exclusion]  # by (subscription, meter)


def merge_windows(windows: Iterable[Window]) -> list[Window]:
    """The union of half-open windows, as sorted disjoint windows."""
    merged: list[Window] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def matching_rules(
    rules: Iterable[BillingRule],
    account_id: str,
    subscription_id: str,
    meter: str,
    *,
    start: datetime,
    end: datetime,
) -> list[BillingRule]:
    """The rules matching (account, subscription, meter) whose range overlaps [start, end),
    sorted by id."""
    return sorted(
        (
            r
            for r in rules
            if r.matches(account_id, subscription_id, meter)
            and r.start < end
            and (r.end is None or r.end > start)
        ),
        key=lambda r: r.id,
    )


def rule_windows(rules: Iterable[BillingRule], start: datetime, end: datetime) -> list[Window]:
    """The rules' ranges clipped to [start, end), merged."""
    clipped = []
    for rule in rules:
        lo = max(rule.start, start)
        hi = end if rule.end is None else min(rule.end, end)
        if lo < hi:
            clipped.append((lo, hi))
    return merge_windows(clipped)


def complement(windows: Sequence[Window], start: datetime, end: datetime) -> list[Window]:
    """[start, end) minus the sorted disjoint ``windows``."""
    out: list[Window] = []
    cursor = start
    for lo, hi in windows:
        if cursor < lo:
            out.append((cursor, lo))
        cursor = max(cursor, hi)
    if cursor < end:
        out.append((cursor, end))
    return out


def usage_with_rules(
    catalog: Catalog,
    start: datetime,
    end: datetime,
    totals: Sequence[UsageTotal],
    fetch: Fetch,
) -> RuledUsage:
    """The billable part of ``totals`` (the usage of [start, end)) under the catalog's
    billing rules, and what was excluded. Without matching rules, ``totals`` as they are
    and no fetch at all."""
    plans: dict[tuple[str, str], tuple[MeterKind, list[Window], list[BillingRule]]] = {}
    for total in totals:
        subscription = catalog.subscriptions.get(total.subscription_id)
        meter = catalog.meters.get(total.meter)
        if subscription is None or meter is None or not catalog.billing_rules:
            continue
        rules = matching_rules(
            catalog.billing_rules.values(),
            subscription.account_id,
            subscription.id,
            total.meter,
            start=start,
            end=end,
        )
        windows = rule_windows(rules, start, end)
        if not windows:
            continue
        # counters and gauges: subtract the rule windows; peaks: the peak between them
        asked = windows if meter.kind is not MeterKind.PEAK else complement(windows, start, end)
        plans[(total.subscription_id, total.meter)] = (meter.kind, asked, rules)
    if not plans:
        return RuledUsage(list(totals), {})

    wanted: dict[Window, set[str]] = defaultdict(set)
    for (subscription_id, _), (_, asked, _) in plans.items():
        for window in asked:
            wanted[window].add(subscription_id)
    answers: dict[tuple[Window, str, str], UsageTotal] = {}
    for window in sorted(wanted):
        for answer in fetch(window[0], window[1], sorted(wanted[window])):
            answers[(window, answer.subscription_id, answer.meter)] = answer

    out: list[UsageTotal] = []
    exclusions: dict[tuple[str, str], Exclusion] = {}
    for total in totals:
        pair = (total.subscription_id, total.meter)
        if pair not in plans:
            out.append(total)
            continue
        kind, asked, rules = plans[pair]
        parts = [answers[(w, *pair)] for w in asked if (w, *pair) in answers]
        quantity = sum(p.quantity for p in parts)
        samples = sum(p.sample_count for p in parts)
        if kind is MeterKind.PEAK:
            billable = UsageTotal(
                *pair, quantity, max((p.quantity_max for p in parts), default=0), samples
            )
        else:
            billable = UsageTotal(
                *pair,
                total.quantity - quantity,
                total.quantity_max,
                total.sample_count - samples,
            )
        out.append(billable)
        exclusions[pair] = Exclusion(
            *pair,
            full=total,
            billable=billable,
            rule_ids=tuple(r.id for r in rules),
            reasons=tuple(dict.fromkeys(r.reason for r in rules)),
        )
    return RuledUsage(out, exclusions)


def mark_excluded(
    lines: Sequence[InvoiceLine], used: Fraction, billable_used: Fraction, exclusion: Exclusion
) -> list[InvoiceLine]:
    """Usage lines priced from the billable usage, showing the whole usage and the excluded
    part (display units: ``used`` before the rules, ``billable_used`` after)."""
    excluded = used - billable_used
    out = []
    for line in lines:
        shown = f"{decimal_text(truncate(billable_used, 6))} {line_unit(line)} used"
        text = (
            f"{decimal_text(truncate(used, 6))} {line_unit(line)} used, "
            f"{decimal_text(truncate(excluded, 6))} {line_unit(line)} not billable "
            f"({'; '.join(exclusion.reasons)})"
        )
        description = (
            line.description.replace(shown, text, 1)
            if shown in line.description
            else f"{line.description}; {text}"
        )
        out.append(
            replace(
                line,
                description=description,
                usage_quantity=truncate(used),
                excluded_quantity=truncate(excluded),
            )
        )
    return out


def line_unit(line: InvoiceLine) -> str:
    """The display unit of a usage line (a package line's unit is 'block of N unit')."""
    return line.unit.rsplit(" ", 1)[-1] if line.unit.startswith("block of ") else line.unit
