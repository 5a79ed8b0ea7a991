"""Issuing invoices (BILLING-SEMANTICS §10) and the ``invoice.issued`` event.

Issuing takes the next number of a gapless per-issuer series and freezes the invoice. The
store allocates the number, rewrites the document and writes the outbox event in ONE
transaction (``Store.issue_invoice``); this module only says what the issued document and
the event look like. Events are published afterwards through a ``BillingEventSink`` port
(the Kafka adapter lives in the composition root: the invoicer never imports Kafka).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from aggregation.ports import BillingEvent, IssueRendering, Store, StoredInvoice
from invoicer.documents import JsonValue, canonical_json
from invoicer.periods import Period, format_instant, to_utc
from invoicer.periods import period_label as label_of_period

DEFAULT_ISSUER = "ML"
BILLING_EVENTS_TOPIC = "billing.events.v1"
INVOICE_ISSUED = "invoice.issued"
EVENT_SCHEMA = "meterline.billing-event/v1"
_ISSUER = re.compile(r"^[A-Z][A-Z0-9]{0,11}$")
_PERIOD_LABEL = re.compile(r"^\d{4}-\d{2}$")


class IssueError(ValueError):
    """An issue request that cannot be carried out (unknown key, bad issuer, nothing to do)."""


def series_for(issuer: str, issued_at: datetime) -> str:
    """The numbering series: the issuer's prefix and the UTC year of issue (``ML-2026``).
    Each series counts 1, 2, 3, ... without gaps."""
    if not _ISSUER.match(issuer):
        raise IssueError(
            f"issuer {issuer!r} must be 1-12 capital letters or digits, starting with a letter"
        )
    return f"{issuer}-{to_utc('issued_at', issued_at).year:04d}"


def reseller_series(reseller_id: str, issued_at: datetime) -> str:
    """The series of the invoices a reseller issues to its customers (BILLING-SEMANTICS
    §9): ``{reseller account id}-{UTC year}``, gapless on its own, apart from the
    platform's."""
    return f"{reseller_id}-{to_utc('issued_at', issued_at).year:04d}"


def invoice_number(series: str, seq: int) -> str:
    """``ML-2026-000001``: six digits at least (wider when a series passes 999,999)."""
    if seq < 1:
        raise IssueError(f"sequence numbers start at 1, got {seq}")
    return f"{series}-{seq:06d}"


def _load(document: str, key: str) -> dict[str, JsonValue]:
    value = json.loads(document)
    if not isinstance(value, dict):
        raise IssueError(f"invoice {key!r}: stored document is not a JSON object")
    return value


def issued_event(document: dict[str, JsonValue], topic: str, issued_at: datetime) -> BillingEvent:
    """The ``invoice.issued`` event of an issued document; its id is derived from the
    number, so a re-publication carries the same id (consumers dedupe by it)."""
    number = str(document["number"])
    account = document["account"]
    period = document["period"]
    assert isinstance(account, dict)
    assert isinstance(period, dict)
    event_id = f"{INVOICE_ISSUED}/{number}"
    value: dict[str, JsonValue] = {
        "schema": EVENT_SCHEMA,
        "event_id": event_id,
        "type": INVOICE_ISSUED,
        "key": document["key"],
        "number": number,
        "document_type": document.get("document_type", "invoice"),
        "adjusts": document.get("adjusts"),
        "account": account["id"],
        "issuer": document.get("issuer"),
        "currency": document["currency"],
        "total_minor": document["total_minor"],
        "total": document["total"],
        "period": {
            "start": period["start"],
            "end": period["end"],
            "local_start": period["local_start"],
            "local_end": period["local_end"],
            "timezone": period["timezone"],
        },
        "issued_at": format_instant(issued_at),
    }
    return BillingEvent(
        event_id=event_id,
        topic=topic,
        key=str(account["id"]),
        value=json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        created_at=issued_at,
    )


def render_issued(
    draft: StoredInvoice, number: str, issued_at: datetime, topic: str = BILLING_EVENTS_TOPIC
) -> IssueRendering:
    """The issued document (the draft with status, number and issue instant) and its event."""
    document = _load(draft.document, draft.key)
    document["status"] = "issued"
    document["number"] = number
    document["issued_at"] = format_instant(issued_at)
    return IssueRendering(
        number=number,
        document=canonical_json(document),
        events=(issued_event(document, topic, issued_at),),
    )


@dataclass(frozen=True, slots=True)
class IssueResult:
    issued: tuple[StoredInvoice, ...]  # in the order they were numbered


def issue_invoices(
    store: Store,
    keys: Sequence[str],
    issued_at: datetime,
    issuer: str = DEFAULT_ISSUER,
    topic: str = BILLING_EVENTS_TOPIC,
) -> IssueResult:
    """Issue ``keys`` in the order given, each in its own transaction (a crash leaves the
    ones done issued and numbered without gaps, the rest drafts). Raises before numbering
    anything when a key is unknown or already issued."""
    issued_at = to_utc("issued_at", issued_at)
    series = series_for(issuer, issued_at)
    if len(set(keys)) != len(keys):
        raise IssueError("an invoice key is given twice")
    series_of: dict[str, str] = {}
    for key in keys:
        stored = store.load_invoice(key)
        if stored is None:
            raise IssueError(f"no invoice {key!r}")
        if stored.status != "draft":
            raise IssueError(f"invoice {key!r} is already issued; nothing was issued")
        reseller = _load(stored.document, key).get("issuer")
        series_of[key] = series
        if isinstance(reseller, str):  # a reseller's invoice to its customer (§9)
            series_of[key] = reseller_series(reseller, issued_at)
            if series_of[key] == series:
                raise IssueError(
                    f"invoice {key!r}: reseller {reseller!r} would share the platform's "
                    f"series {series!r}; choose another --issuer"
                )

    def render(draft: StoredInvoice, seq: int) -> IssueRendering:
        number = invoice_number(series_of[draft.key], seq)
        return render_issued(draft, number, issued_at, topic)

    issued = [store.issue_invoice(key, series_of[key], issued_at, render) for key in keys]
    return IssueResult(tuple(issued))


def document_period_label(document: dict[str, JsonValue], key: str = "invoice") -> str:
    """The ``YYYY-MM`` label of a stored document's billing period: the month holding the
    period's last local day (``invoicer.periods.period_label``), the rule ``meterline close
    --period`` uses, so that close, issue and list select the same period for every policy
    (``month_end_day: 25``: the label 2026-11 is [2026-10-26, 2026-11-26))."""
    period = document.get("period")
    if not isinstance(period, dict):
        raise IssueError(f"invoice {key!r}: stored document has no period")
    start, end, tz = period.get("start"), period.get("end"), period.get("timezone")
    if not (isinstance(start, str) and isinstance(end, str) and isinstance(tz, str)):
        raise IssueError(f"invoice {key!r}: stored document has an incomplete period")
    year, month = label_of_period(
        Period(datetime.fromisoformat(start), datetime.fromisoformat(end), tz)
    )
    return f"{year:04d}-{month:02d}"


def drafts_of(store: Store, period_label: str | None = None) -> list[str]:
    """Keys of the drafts (invoices, adjustments, credit notes), sorted; with
    ``period_label`` ("2026-10") only those of the period labelled so (the one whose last
    local day is in that month, as ``close --period`` selects it)."""
    if period_label is not None and not _PERIOD_LABEL.match(period_label):
        raise IssueError(f"period {period_label!r} must look like 2026-10")
    keys = []
    for stored in store.load_invoices():
        if stored.status != "draft":
            continue
        if period_label is not None:
            document = _load(stored.document, stored.key)
            if document_period_label(document, stored.key) != period_label:
                continue
        keys.append(stored.key)
    return keys


class BillingEventSink(Protocol):
    """Where billing events go (Kafka ``billing.events.v1`` in production)."""

    def publish(self, events: Sequence[BillingEvent]) -> None:
        """Deliver every event, returning only once the broker confirmed all of them;
        raise otherwise (nothing is then marked published and all are retried)."""
        ...


def publish_pending(
    store: Store, sink: BillingEventSink, now: datetime, batch: int = 500, max_batches: int = 1000
) -> int:
    """Publish outbox events until none is pending (at most ``max_batches`` rounds); return
    how many were published. At least once: a crash between publish and mark publishes the
    same events (same ids) again."""
    now = to_utc("now", now)
    published = 0
    for _ in range(max_batches):
        pending = store.pending_billing_events(batch)
        if not pending:
            break
        sink.publish(pending)
        published += store.mark_billing_events_published([e.event_id for e in pending], now)
    return published
