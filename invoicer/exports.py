"""Invoice exports (BILLING-SEMANTICS §11): CSV (one row per line) and a printable HTML page.

Both read the stored canonical JSON document (what was issued is what is exported), never
re-rate anything, and are deterministic: the same document yields the same bytes.

- CSV: RFC 4180 (CRLF, minimal quoting), a header row, the columns of ``CSV_COLUMNS`` in that
  order; money and quantities as decimal strings, exactly as in the document. Text cells that
  a spreadsheet would read as a formula (starting with ``= + - @`` or a tab/CR) are prefixed
  with ``'``; numeric columns are never altered.
- HTML: one self-contained page (inline CSS, no scripts, no external assets), every value
  escaped with ``html.escape``; lines grouped by subscription, each with its service period
  in the account's timezone; printable to PDF from any browser.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from datetime import datetime
from html import escape
from typing import Any

from invoicer.periods import zone
from rating.money import format_minor

CSV_COLUMNS = (
    "invoice_key",
    "invoice_number",
    "document_type",
    "status",
    "account_id",
    "currency",
    "period_start",
    "period_end",
    "line_key",
    "kind",
    "description",
    "service_start",
    "service_end",
    "quantity",
    "unit",
    "unit_price",
    "amount_precise",
    "amount",
    "amount_minor",
    "subscription_id",
    "plan_id",
    "meter",
    "resource_id",
    # issue 4 additions (appended: earlier columns keep their positions)
    "line_account_id",
    "tier",
    "applies_to",
    "tax_rate",
    "jurisdiction",
    "usage_quantity",
    "included_quantity",
    "excluded_quantity",
    "invoice_notes",
    "issuer",
)
_NUMERIC = {
    "quantity",
    "unit_price",
    "amount_precise",
    "amount",
    "amount_minor",
    "tier",
    "tax_rate",
    "usage_quantity",
    "included_quantity",
    "excluded_quantity",
}
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

Document = Mapping[str, Any]


class ExportError(ValueError):
    """A document that cannot be exported (not an invoice document)."""


def parse_document(text: str, where: str = "invoice") -> Document:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{where}: not JSON: {exc}") from None
    if not isinstance(document, dict) or "lines" not in document:
        raise ExportError(f"{where}: not an invoice document")
    return document


def document_title(document: Document) -> str:
    kind = document.get("document_type", "invoice")
    return {"adjustment": "Adjustment invoice", "credit_note": "Credit note"}.get(kind, "Invoice")


def _cell(column: str, value: object) -> str:
    text = "" if value is None else str(value)
    if column not in _NUMERIC and text.startswith(_FORMULA_STARTS):
        return "'" + text
    return text


def to_csv(document: Document) -> str:
    """One header row, then one row per line, in the document's line order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    period = document["period"]
    for line in document["lines"]:
        refs = line["refs"]
        row = {
            "invoice_key": document["key"],
            "invoice_number": document.get("number"),
            "document_type": document.get("document_type", "invoice"),
            "status": document["status"],
            "account_id": document["account"]["id"],
            "currency": document["currency"],
            "period_start": period["start"],
            "period_end": period["end"],
            "line_key": line["key"],
            "kind": line["kind"],
            "description": line["description"],
            "service_start": line["service_period"]["start"],
            "service_end": line["service_period"]["end"],
            "quantity": line["quantity"],
            "unit": line["unit"],
            "unit_price": line["unit_price"],
            "amount_precise": line["amount_precise"],
            "amount": line["amount"],
            "amount_minor": line["amount_minor"],
            "subscription_id": refs.get("subscription_id"),
            "plan_id": refs.get("plan_id"),
            "meter": refs.get("meter"),
            "resource_id": refs.get("resource_id"),
            "line_account_id": refs.get("account_id") or document["account"]["id"],
            "tier": line.get("tier"),
            "applies_to": line.get("applies_to"),
            "tax_rate": line.get("tax_rate"),
            "jurisdiction": line.get("jurisdiction"),
            "usage_quantity": line.get("usage_quantity"),
            "included_quantity": line.get("included_quantity"),
            "excluded_quantity": line.get("excluded_quantity"),
            "invoice_notes": " | ".join(str(n) for n in document.get("notes") or ()),
            "issuer": document.get("issuer"),
        }
        writer.writerow([_cell(c, row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def _line_notes(line: Mapping[str, Any]) -> str:
    """The small print under a line: kind, key, and tier / excluded usage / target line."""
    parts = [str(line["kind"]), str(line["key"])]
    if line.get("tier") is not None:
        parts.append(f"tier {line['tier']}")
    if line.get("usage_quantity") is not None:
        parts.append(f"used {line['usage_quantity']} {line['unit']}")
    if line.get("included_quantity") not in (None, "0"):
        parts.append(f"included {line['included_quantity']}")
    if line.get("excluded_quantity") not in (None, "0"):
        parts.append(f"excluded (non-billable) {line['excluded_quantity']}")
    if line.get("applies_to"):
        parts.append(f"applies to {line['applies_to']}")
    return " · ".join(parts)


def _tax_label(line: Mapping[str, Any]) -> str:
    rate = line.get("tax_rate") or "0"
    where = f" {line['jurisdiction']}" if line.get("jurisdiction") else ""
    label = f"Tax {rate} %{where} on {line['quantity']}"
    if line.get("applies_to"):
        label += f" ({line['applies_to']})"
    return label


def _local(instant: str, tz_name: str) -> str:
    return datetime.fromisoformat(instant).astimezone(zone(tz_name)).strftime("%Y-%m-%d %H:%M")


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #111;
       margin: 2em auto; max-width: 60em; font-size: 10.5pt; }
h1 { font-size: 18pt; margin: 0 0 .2em 0; }
h2 { font-size: 11.5pt; margin: 1.4em 0 .3em 0; border-bottom: 1px solid #999; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25em .4em; vertical-align: top; }
th { border-bottom: 1px solid #555; font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.sub td { border-top: 1px solid #ccc; font-weight: 600; }
.meta td { padding: .1em .8em .1em 0; }
.totals { margin-top: 1em; width: auto; margin-left: auto; }
.totals td { padding: .2em .6em; }
.totals tr.grand td { border-top: 2px solid #111; font-weight: 700; }
.small { color: #555; font-size: 9pt; }
.draft { color: #a00; font-weight: 700; }
.note { font-weight: 600; }
@media print { body { margin: 0; max-width: none; } }
"""


def to_html(document: Document) -> str:
    """A self-contained HTML page for the invoice (all values escaped)."""
    e = escape
    currency = str(document["currency"])
    period = document["period"]
    tz_name = str(period["timezone"])
    title = document_title(document)
    number = document.get("number")
    heading = f"{title} {number}" if number else f"{title} (draft, not yet issued)"
    meta = [
        ("Invoice key", document["key"]),
        ("Account", f"{document['account']['name']} ({document['account']['id']})"),
        ("Currency", currency),
        (
            "Billing period",
            (
                f"{period['local_start']} to {period['local_end']} ({tz_name}); "
                f"[{period['start']}, {period['end']}) UTC"
            ),
        ),
    ]
    if document.get("issuer"):
        meta.append(("Issued by", f"{document['issuer']} (reseller)"))
    if document.get("issued_at"):
        meta.append(("Issued at", document["issued_at"]))
    if document.get("adjusts"):
        meta.append(("Corrects invoice", document["adjusts"]))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(heading)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(heading)}</h1>",
    ]
    if not number:
        out.append('<p class="draft">DRAFT: amounts may still change.</p>')
    out.append('<table class="meta">')
    out.extend(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in meta)
    out.append("</table>")

    account_id = str(document["account"]["id"])
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    taxes: list[Mapping[str, Any]] = []
    for line in document["lines"]:
        if line["kind"] == "tax":
            taxes.append(line)
            continue
        payee = str(line["refs"].get("account_id") or account_id)
        group = (payee, str(line["refs"].get("subscription_id") or ""))
        groups.setdefault(group, []).append(line)
    several_accounts = len({payee for payee, _ in groups}) > 1
    out.append("<h2>Charges</h2>")
    if not groups:
        out.append("<p>No charges in this period.</p>")
    else:
        out.append("<table>")
        out.append(
            "<tr><th>Description</th><th>Service period</th><th class='num'>Quantity</th>"
            "<th class='num'>Unit price</th><th class='num'>Amount</th></tr>"
        )
        for payee, subscription_id in sorted(groups):
            lines = groups[(payee, subscription_id)]
            plan = lines[0]["refs"].get("plan_id")
            subtotal = sum(int(line["amount_minor"]) for line in lines)
            if subscription_id:
                label = f"Subscription {subscription_id}" + (f" (plan {plan})" if plan else "")
            else:
                label = "Invoice-level lines"
            if several_accounts:  # bill-to / reseller: lines grouped under their account
                label = f"Account {payee}: {label}"
            out.append(
                f"<tr class='sub'><td colspan='4'>{e(label)}</td>"
                f"<td class='num'>{e(format_minor(subtotal, currency))}</td></tr>"
            )
            for line in lines:
                service = line["service_period"]
                span = f"{_local(service['start'], tz_name)} to {_local(service['end'], tz_name)}"
                out.append(
                    "<tr>"
                    f"<td>{e(str(line['description']))}"
                    f"<div class='small'>{e(_line_notes(line))}</div></td>"
                    f"<td>{e(span)}</td>"
                    f"<td class='num'>{e(str(line['quantity']))} {e(str(line['unit']))}</td>"
                    f"<td class='num'>{e(str(line['unit_price']))}</td>"
                    f"<td class='num'>{e(str(line['amount']))}</td>"
                    "</tr>"
                )
        out.append("</table>")
    out.append('<table class="totals">')
    out.append(
        f"<tr><td>Subtotal</td><td class='num'>{e(str(document['subtotal']))} "
        f"{e(currency)}</td></tr>"
    )
    out.extend(
        f"<tr><td>{e(_tax_label(line))}<div class='small'>{e(str(line['description']))}"
        f"</div></td><td class='num'>{e(str(line['amount']))} {e(currency)}</td></tr>"
        for line in taxes
    )
    if taxes:
        out.append(
            f"<tr><td>Tax</td><td class='num'>{e(str(document.get('tax', '')))} "
            f"{e(currency)}</td></tr>"
        )
    out.append(
        f"<tr class='grand'><td>Total</td><td class='num'>{e(str(document['total']))} "
        f"{e(currency)}</td></tr>"
    )
    out.append("</table>")
    out.extend(f"<p class='note'>{e(str(note))}</p>" for note in document.get("notes") or ())
    out.append(
        f"<p class='small'>Service periods are shown in {e(tz_name)}; each line is rounded "
        "once, half away from zero, and the total is the exact sum of the lines.</p>"
    )
    out.extend(["</body>", "</html>", ""])
    return "\n".join(out)
