"""Late usage after issue: adjustment invoices and credit notes (BILLING-SEMANTICS §10).

An issued invoice never changes. When a later close re-rates its period and finds that a
line's amount differs from what was invoiced for that line key (the issued invoice plus the
adjustments already issued for it), it drafts an *adjustment* invoice (a *credit note* when
its total is negative) keyed ``{invoice key}/adj-{n}``, whose lines carry the original
line keys and service periods and the difference per line key:

    adjustment = re-rating of the whole original period - what was already invoiced

so tiers, allowances and caps are applied to the whole period, never to the late part
alone. Amounts are differences of already-rounded minor units, so invoiced + adjustments =
the re-rated invoice, cent for cent. ``reconcile`` is deterministic: closing again yields
the same draft, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from aggregation.ports import StoredInvoice
from invoicer.invoice import Invoice, InvoiceLine, LineKind
from invoicer.periods import Period

ADJUSTMENT_MARK = "/adj-"

# rerate(account_id, [period, ...]) -> the fresh invoice of each period (None: no business)
Rerate = Callable[[Sequence[tuple[str, Period]]], Sequence[Invoice | None]]


@dataclass(frozen=True, slots=True)
class InvoicedLine:
    """What was invoiced so far under one line key (summed over issued documents); the
    descriptive fields come from the first document that had the key."""

    key: str
    amount_minor: int
    amount_precise: Decimal
    quantity: Decimal
    description: str
    service_start: datetime
    service_end: datetime
    unit: str
    unit_price: Decimal
    currency: str
    subscription_id: str
    plan_id: str
    meter: str | None
    resource_id: str | None


def is_adjustment_key(key: str) -> bool:
    return ADJUSTMENT_MARK in key


def base_key(key: str) -> str:
    """The invoice an adjustment key corrects (the key itself for an invoice)."""
    return key.split(ADJUSTMENT_MARK, 1)[0]


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _parse(stored: StoredInvoice) -> dict[str, object]:
    document = json.loads(stored.document)
    if not isinstance(document, dict):
        raise ValueError(f"invoice {stored.key!r}: stored document is not a JSON object")
    return document


def invoiced_lines(documents: Iterable[Mapping[str, object]]) -> dict[str, InvoicedLine]:
    """Per line key, the sums of amount and quantity over ``documents`` (issued ones)."""
    result: dict[str, InvoicedLine] = {}
    for document in documents:
        lines = document.get("lines")
        assert isinstance(lines, list)
        for line in lines:
            key = line["key"]
            minor = int(line["amount_minor"])
            precise = Decimal(line["amount_precise"])
            quantity = Decimal(line["quantity"])
            previous = result.get(key)
            if previous is not None:
                result[key] = InvoicedLine(
                    **{
                        **{f: getattr(previous, f) for f in InvoicedLine.__dataclass_fields__},
                        "amount_minor": previous.amount_minor + minor,
                        "amount_precise": previous.amount_precise + precise,
                        "quantity": previous.quantity + quantity,
                    }
                )
                continue
            refs = line["refs"]
            result[key] = InvoicedLine(
                key=key,
                amount_minor=minor,
                amount_precise=precise,
                quantity=quantity,
                description=line["description"],
                service_start=_instant(line["service_period"]["start"]),
                service_end=_instant(line["service_period"]["end"]),
                unit=line["unit"],
                unit_price=Decimal(line["unit_price"]),
                currency=line["currency"],
                subscription_id=refs["subscription_id"],
                plan_id=refs["plan_id"],
                meter=refs.get("meter"),
                resource_id=refs.get("resource_id"),
            )
    return result


def _strip(description: str) -> str:
    return description.removeprefix("Adjustment: ")


def adjustment_lines(
    fresh: Sequence[InvoiceLine], invoiced: Mapping[str, InvoicedLine], currency: str
) -> list[InvoiceLine]:
    """One line per line key whose rounded amount changed, sorted by key."""
    fresh_by_key = {line.key: line for line in fresh}
    lines: list[InvoiceLine] = []
    for key in sorted(fresh_by_key.keys() | invoiced.keys()):
        now = fresh_by_key.get(key)
        before = invoiced.get(key)
        delta_minor = (now.amount_minor if now else 0) - (before.amount_minor if before else 0)
        if delta_minor == 0:
            continue  # nothing to bill or credit; a later re-rating diffs the totals again
        delta_precise = (now.amount_precise if now else Decimal(0)) - (
            before.amount_precise if before else Decimal(0)
        )
        delta_quantity = (now.quantity if now else Decimal(0)) - (
            before.quantity if before else Decimal(0)
        )
        # The line as it stands now, or as it was invoiced when it is no longer due.
        ref = now if now is not None else before
        assert ref is not None
        suffix = "" if now is not None else " (no longer due)"
        lines.append(
            InvoiceLine(
                key=key,
                kind=LineKind.ADJUSTMENT,
                description=f"Adjustment: {_strip(ref.description)}{suffix}",
                service_start=ref.service_start,
                service_end=ref.service_end,
                quantity=delta_quantity,
                unit=ref.unit,
                unit_price=ref.unit_price,
                amount_precise=delta_precise,
                amount_minor=delta_minor,
                currency=currency,
                subscription_id=ref.subscription_id,
                plan_id=ref.plan_id,
                meter=ref.meter,
                resource_id=ref.resource_id,
                usage_quantity=now.usage_quantity if now is not None else None,
                included_quantity=now.included_quantity if now is not None else None,
            )
        )
    return lines


def adjustment_invoice(
    base: StoredInvoice,
    issued_adjustments: Sequence[StoredInvoice],
    fresh: Invoice | None,
) -> Invoice | None:
    """The draft correcting the issued ``base`` (with its ``issued_adjustments``) to
    ``fresh`` (the re-rating of its period; None when the account no longer has business
    in it), or None when nothing changes."""
    documents = [_parse(base), *(_parse(a) for a in issued_adjustments)]
    invoiced = invoiced_lines(documents)
    lines = adjustment_lines(fresh.lines if fresh else (), invoiced, base.currency)
    if not lines:
        return None
    base_document = documents[0]
    account = base_document["account"]
    period = base_document["period"]
    assert isinstance(account, dict)
    assert isinstance(period, dict)
    total = sum(line.amount_minor for line in lines)
    return Invoice(
        key=f"{base.key}{ADJUSTMENT_MARK}{len(issued_adjustments) + 1}",
        account_id=base.account_id,
        account_name=str(account["name"]),
        currency=base.currency,
        period=Period(base.period_start, base.period_end, str(period["timezone"])),
        lines=tuple(lines),
        subtotal_minor=total,
        total_minor=total,
        document_type="credit_note" if total < 0 else "adjustment",
        adjusts=base.key,
        issuer=_issuer(base_document),
    )


def _issuer(document: Mapping[str, object]) -> str | None:
    """A reseller's invoice is corrected by the same reseller (§9)."""
    issuer = document.get("issuer")
    return issuer if isinstance(issuer, str) else None


def timezone_of(stored: StoredInvoice) -> str:
    period = _parse(stored)["period"]
    assert isinstance(period, dict)
    return str(period["timezone"])


def reconcile(
    fresh: Sequence[Invoice], existing: Iterable[StoredInvoice], rerate: Rerate
) -> tuple[list[Invoice], list[str], list[str]]:
    """What a close saves, given the ``fresh`` drafts it rated and the ``existing`` stored
    invoices of the same and of recent periods.

    A fresh draft whose invoice is not issued is saved as is. For every issued invoice
    (among ``existing``), its period is re-rated (the fresh draft when this close rated it,
    else through ``rerate``) and the difference becomes the draft ``{key}/adj-{n}``, n =
    1 + the adjustments of it already issued. Returns (drafts to save sorted by key, keys of
    the issued invoices left untouched, keys of draft adjustments no longer due: delete them).
    """
    by_key = {s.key: s for s in existing}
    fresh_by_key = {i.key: i for i in fresh}
    issued_bases = sorted(
        k for k, s in by_key.items() if s.status == "issued" and not is_adjustment_key(k)
    )
    issued_adjustments: dict[str, list[StoredInvoice]] = {k: [] for k in issued_bases}
    for key, stored in sorted(by_key.items()):
        if stored.status == "issued" and is_adjustment_key(key):
            issued_adjustments.setdefault(base_key(key), []).append(stored)

    to_rerate = [
        (
            by_key[k].account_id,
            Period(by_key[k].period_start, by_key[k].period_end, timezone_of(by_key[k])),
        )
        for k in issued_bases
        if k not in fresh_by_key
    ]
    rerated = dict(
        zip(
            [k for k in issued_bases if k not in fresh_by_key],
            rerate(to_rerate) if to_rerate else [],
            strict=True,
        )
    )

    out = [i for i in fresh if i.key not in by_key or by_key[i.key].status == "draft"]
    obsolete: list[str] = []
    for key in issued_bases:
        current = fresh_by_key[key] if key in fresh_by_key else rerated[key]
        adjustments = sorted(issued_adjustments.get(key, []), key=lambda s: _adj_no(s.key))
        draft = adjustment_invoice(by_key[key], adjustments, current)
        if draft is not None:
            out.append(draft)
        else:  # a draft adjustment saved by an earlier close is no longer due
            obsolete.append(f"{key}{ADJUSTMENT_MARK}{len(adjustments) + 1}")
    out.sort(key=lambda i: i.key)
    return out, issued_bases, obsolete


def _adj_no(key: str) -> int:
    return int(key.rsplit(ADJUSTMENT_MARK, 1)[1])
