"""Invoice documents: canonical JSON (what the store keeps), a text summary (what people read),
and the mapper to the store's ``StoredInvoice``.

Canonical JSON: keys sorted, two-space indent, UTF-8 text, no trailing newline; money and
quantities as decimal strings (never floats), minor units as integers, instants as ISO 8601
UTC with ``Z``. Nothing in it depends on when it was rendered, so closing the same inputs
twice yields the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import TypeAlias

from aggregation.ports import StoredInvoice
from invoicer.exact import decimal_text, money_text
from invoicer.invoice import Invoice, InvoiceLine, LineKind
from invoicer.periods import format_instant
from rating.money import format_minor

SCHEMA = "meterline.invoice/v1"

JsonValue: TypeAlias = "str | int | bool | list[JsonValue] | dict[str, JsonValue] | None"


def _optional_quantity(value: Decimal | None) -> str | None:
    return None if value is None else decimal_text(value)


def line_to_dict(line: InvoiceLine) -> dict[str, JsonValue]:
    return {
        "key": line.key,
        "kind": line.kind.value,
        "description": line.description,
        "service_period": {
            "start": format_instant(line.service_start),
            "end": format_instant(line.service_end),
        },
        "quantity": decimal_text(line.quantity),
        "unit": line.unit,
        "unit_price": money_text(line.unit_price, line.currency),
        "amount_precise": money_text(line.amount_precise, line.currency),
        "amount_minor": line.amount_minor,
        "amount": format_minor(line.amount_minor, line.currency),
        "currency": line.currency,
        "usage_quantity": _optional_quantity(line.usage_quantity),
        "included_quantity": _optional_quantity(line.included_quantity),
        "excluded_quantity": _optional_quantity(line.excluded_quantity),
        "cap": None if line.cap is None else money_text(line.cap, line.currency),
        "tier": line.tier,
        "applies_to": line.applies_to,
        "tax_rate": _optional_quantity(line.tax_rate),
        "jurisdiction": line.jurisdiction,
        "refs": {
            "account_id": line.account_id,
            "subscription_id": line.subscription_id,
            "plan_id": line.plan_id,
            "meter": line.meter,
            "resource_id": line.resource_id,
        },
    }


def invoice_to_dict(invoice: Invoice) -> dict[str, JsonValue]:
    period = invoice.period
    document: dict[str, JsonValue] = {
        "schema": SCHEMA,
        "key": invoice.key,
        "status": invoice.status,
        "account": {"id": invoice.account_id, "name": invoice.account_name},
        "currency": invoice.currency,
        "period": {
            "start": format_instant(period.start),
            "end": format_instant(period.end),
            "timezone": period.timezone,
            "local_start": period.local_start_date.isoformat(),
            "local_end": period.local_end_date.isoformat(),
            "seconds": period.seconds,
        },
        "lines": [line_to_dict(line) for line in invoice.lines],
        "subtotal_minor": invoice.subtotal_minor,
        "subtotal": format_minor(invoice.subtotal_minor, invoice.currency),
        "tax_minor": invoice.tax_minor,
        "tax": format_minor(invoice.tax_minor, invoice.currency),
        "notes": list(invoice.notes),
        "total_minor": invoice.total_minor,
        "total": format_minor(invoice.total_minor, invoice.currency),
    }
    if invoice.issuer is not None:  # a reseller's invoice to its customer (§9)
        document["issuer"] = invoice.issuer
    if invoice.document_type != "invoice":  # absent on invoices: their bytes stay as they were
        document["document_type"] = invoice.document_type
        document["adjusts"] = invoice.adjusts
    return document


def invoice_to_json(invoice: Invoice) -> str:
    """The invoice as canonical JSON text (byte-identical for identical invoices)."""
    return canonical_json(invoice_to_dict(invoice))


def canonical_json(document: JsonValue) -> str:
    """Keys sorted, two-space indent, UTF-8 text, no trailing newline.

    Byte for byte ``json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False)``
    (a property test proves it), written out here because the standard library falls back
    to its pure-Python encoder whenever ``indent`` is given, which made JSON the largest
    cost of a period close. Strings go through the standard library's C string encoder.
    """
    return _encode(document, "\n")


_encode_string = json.encoder.encode_basestring  # the C implementation when available


# Encoded object keys (``"key": ``): documents repeat the same few dozen keys on every line.
_key_texts: dict[str, str] = {}
_MAX_KEY_TEXTS = 4096


def _encode(value: object, newline: str) -> str:
    """One value, its nested lines indented from ``newline``. Scalars inside a container
    are encoded inline (one call per container, not per value: this is the hot path)."""
    kind = type(value)
    if kind is dict:
        assert isinstance(value, dict)
        if not value:
            return "{}"
        inner = newline + "  "
        parts = []
        for key in sorted(value):
            if type(key) is not str:
                raise TypeError(f"canonical JSON keys are strings, not {key!r}")
            key_text = _key_texts.get(key)
            if key_text is None:
                key_text = _encode_string(key) + ": "
                if len(_key_texts) < _MAX_KEY_TEXTS:
                    _key_texts[key] = key_text
            item = value[key]
            item_kind = type(item)
            if item_kind is str:
                text = _encode_string(item)
            elif item is None:
                text = "null"
            elif item_kind is int:
                text = int.__repr__(item)
            else:
                text = _encode(item, inner)
            parts.append(key_text + text)
        return "{" + inner + ("," + inner).join(parts) + newline + "}"
    if kind is list:
        assert isinstance(value, list)
        if not value:
            return "[]"
        inner = newline + "  "
        return "[" + inner + ("," + inner).join([_encode(v, inner) for v in value]) + newline + "]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _encode_string(value)
    if isinstance(value, int):
        return int.__repr__(value)
    raise TypeError(f"not a canonical JSON value: {value!r}")


def to_stored_invoice(invoice: Invoice) -> StoredInvoice:
    """The store's row for an invoice: key, period as UTC instants, status, total, document."""
    return StoredInvoice(
        key=invoice.key,
        account_id=invoice.account_id,
        period_start=invoice.period.start,
        period_end=invoice.period.end,
        currency=invoice.currency,
        status=invoice.status,
        total_minor=invoice.total_minor,
        document=invoice_to_json(invoice),
    )


def invoices_to_text(invoices: Sequence[Invoice]) -> str:
    """A human summary of invoices, one block each, amounts right-aligned."""
    blocks = [_invoice_text(invoice) for invoice in invoices]
    if not blocks:
        return "No invoices."
    return "\n\n".join(blocks)


_LABEL_WIDTH = 80
_AMOUNT_WIDTH = 14


def _row(label: str, amount: str = "") -> str:
    if len(label) > _LABEL_WIDTH:
        label = label[: _LABEL_WIDTH - 1] + "…"
    return f"  {label:<{_LABEL_WIDTH}}{amount:>{_AMOUNT_WIDTH}}".rstrip()


def _line_detail(line: InvoiceLine, currency: str) -> str:
    """The second row of a line: quantity x unit price, and what else the line carries."""
    if line.kind is LineKind.TAX:
        rate = "0" if line.tax_rate is None else decimal_text(line.tax_rate)
        where = f" {line.jurisdiction}" if line.jurisdiction else ""
        detail = f"{rate} %{where} on {money_text(line.quantity, currency)} {currency}"
    else:
        detail = (
            f"{decimal_text(line.quantity)} {line.unit} x {money_text(line.unit_price, currency)}"
        )
    extras = []
    if line.tier is not None:
        extras.append(f"tier {line.tier}")
    if line.excluded_quantity:
        extras.append(f"{decimal_text(line.excluded_quantity)} {line.unit} excluded")
    if line.applies_to is not None:
        extras.append(f"on {line.applies_to}")
    return detail + "".join(f"; {x}" for x in extras)


def _invoice_text(invoice: Invoice) -> str:
    period = invoice.period
    currency = invoice.currency
    local = f"{period.local_start_date} to {period.local_end_date} ({period.timezone})"
    span = f"[{format_instant(period.start)}, {format_instant(period.end)})"
    out = [
        f"Invoice {invoice.key} ({invoice.status}"
        + (f", issued by {invoice.issuer}" if invoice.issuer else "")
        + f") - {invoice.account_name}, {currency}",
        f"  period {local} = {span}",
    ]
    charges = [line for line in invoice.lines if line.kind is not LineKind.TAX]
    taxes = [line for line in invoice.lines if line.kind is LineKind.TAX]
    if not invoice.lines:
        out.append("  (no charges)")
    grouped = any(line.account_id is not None for line in charges)
    payee: str | None = None
    for line in charges:
        account = line.account_id or invoice.account_id
        if grouped and account != payee:  # bill-to / reseller: lines grouped per account
            payee = account
            out.append(f"  for account {account}:")
        amount = format_minor(line.amount_minor, currency)
        out.append(_row(f"{line.kind.value:<10}{line.description}", amount))
        out.append(_row(f"{'':<10}{_line_detail(line, currency)}"))
    out.append(_row("Subtotal", format_minor(invoice.subtotal_minor, currency)))
    for line in taxes:
        out.append(
            _row(
                f"{line.kind.value:<10}{line.description}",
                format_minor(line.amount_minor, currency),
            )
        )
        out.append(_row(f"{'':<10}{_line_detail(line, currency)}"))
    if taxes:
        out.append(_row("Tax", format_minor(invoice.tax_minor, currency)))
    out.append(_row(f"Total {currency}", format_minor(invoice.total_minor, currency)))
    out.extend(f"  Note: {note}" for note in invoice.notes)
    return "\n".join(out)
