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
from invoicer.invoice import Invoice, InvoiceLine
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
        "cap": None if line.cap is None else money_text(line.cap, line.currency),
        "refs": {
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
        "total_minor": invoice.total_minor,
        "total": format_minor(invoice.total_minor, invoice.currency),
    }
    if invoice.document_type != "invoice":  # absent on invoices: their bytes stay as they were
        document["document_type"] = invoice.document_type
        document["adjusts"] = invoice.adjusts
    return document


def invoice_to_json(invoice: Invoice) -> str:
    """The invoice as canonical JSON text (byte-identical for identical invoices)."""
    return canonical_json(invoice_to_dict(invoice))


def canonical_json(document: JsonValue) -> str:
    """Keys sorted, two-space indent, UTF-8 text, no trailing newline."""
    return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False)


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


def _invoice_text(invoice: Invoice) -> str:
    period = invoice.period
    currency = invoice.currency
    local = f"{period.local_start_date} to {period.local_end_date} ({period.timezone})"
    span = f"[{format_instant(period.start)}, {format_instant(period.end)})"
    out = [
        f"Invoice {invoice.key} ({invoice.status}) - {invoice.account_name}, {currency}",
        f"  period {local} = {span}",
    ]
    if not invoice.lines:
        out.append("  (no charges)")
    for line in invoice.lines:
        amount = format_minor(line.amount_minor, currency)
        out.append(_row(f"{line.kind.value:<10}{line.description}", amount))
        quantity = f"{decimal_text(line.quantity)} {line.unit}"
        out.append(_row(f"{'':<10}{quantity} x {money_text(line.unit_price, currency)}"))
    out.append(_row("Subtotal", format_minor(invoice.subtotal_minor, currency)))
    out.append(_row(f"Total {currency}", format_minor(invoice.total_minor, currency)))
    return "\n".join(out)
