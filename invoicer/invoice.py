"""Invoice lines and invoices: frozen values with their invariants checked on construction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from invoicer.periods import Period, PeriodError, to_utc


class LineKind(StrEnum):
    RECURRING = "recurring"
    HOURLY = "hourly"
    USAGE = "usage"
    DISCOUNT = "discount"  # a campaign's negative line (BILLING-SEMANTICS §6)
    COMMITMENT = "commitment"  # the minimum-commitment true-up (§6)
    TAX = "tax"  # one per rate, or per taxed line with line-level rounding (§7)
    ADJUSTMENT = "adjustment"  # late usage after issue (BILLING-SEMANTICS §10)


class InvoiceError(ValueError):
    """An invoice or line that breaks an invariant (a bug upstream, never bad input)."""


def line_key(
    account_id: str, period: Period, subscription_id: str, charge: str, detail: str | None = None
) -> str:
    """``{account}/{period local start date}/{subscription}/{charge}[/{detail}]``."""
    key = f"{account_id}/{period.local_start_date:%Y-%m-%d}/{subscription_id}/{charge}"
    return key if detail is None else f"{key}/{detail}"


def invoice_key(account_id: str, period: Period) -> str:
    """``{account}/{period local start date}``: one invoice per account and period."""
    return f"{account_id}/{period.local_start_date:%Y-%m-%d}"


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One charge, rounded once.

    ``quantity`` is in ``unit`` (display units, 12 places at most); ``amount_precise`` is the
    exact amount truncated to 12 places and ``amount_minor`` its one rounding, half away from
    zero, to the currency's minor units. ``quantity x unit_price`` may differ from
    ``amount_precise`` where the line says why: a proration (recurring), a cap (hourly).
    """

    key: str
    kind: LineKind
    description: str
    service_start: datetime
    service_end: datetime
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount_precise: Decimal
    amount_minor: int
    currency: str
    subscription_id: str
    plan_id: str
    meter: str | None = None
    resource_id: str | None = None
    # usage lines: the period's usage and the allowance (prorated) it was reduced by
    usage_quantity: Decimal | None = None
    included_quantity: Decimal | None = None
    # hourly lines: the cap that limited the amount, when it did
    cap: Decimal | None = None
    # graduated and volume usage lines: the tier (1-based) the quantity is priced at
    tier: int | None = None
    # discount and tax lines: the key of the line they apply to, when it is one line
    applies_to: str | None = None
    # tax lines: the rate in percent and the jurisdiction
    tax_rate: Decimal | None = None
    jurisdiction: str | None = None
    # usage lines: the usage a billing rule made non-billable (shown, not charged; §8)
    excluded_quantity: Decimal | None = None
    # bill-to and reseller invoices: the account whose usage the line is for, when it is
    # not the invoice's own account (None: the invoice's account; §9)
    account_id: str | None = None

    def __post_init__(self) -> None:
        try:
            start = to_utc(f"line {self.key} service start", self.service_start)
            end = to_utc(f"line {self.key} service end", self.service_end)
        except PeriodError as exc:
            raise InvoiceError(str(exc)) from None
        if not start < end:
            raise InvoiceError(f"line {self.key}: service period is empty or reversed")
        object.__setattr__(self, "service_start", start)
        object.__setattr__(self, "service_end", end)


@dataclass(frozen=True, slots=True)
class Invoice:
    """An account's draft invoice for one period; lines sorted by key, totals exact sums."""

    key: str
    account_id: str
    account_name: str
    currency: str
    period: Period
    lines: tuple[InvoiceLine, ...]
    subtotal_minor: int
    total_minor: int
    status: str = "draft"
    # "invoice", or for a correction of an issued invoice "adjustment" (total >= 0) or
    # "credit_note" (total < 0); ``adjusts`` is then the key of the corrected invoice.
    document_type: str = "invoice"
    adjusts: str | None = None
    # Notes the invoice must print (e.g. the EU reverse-charge statement), in order.
    notes: tuple[str, ...] = ()
    # Who issues it: None = the platform; a reseller's account id for the invoice of one of
    # its customers at the reseller's price book (BILLING-SEMANTICS §9).
    issuer: str | None = None

    @property
    def tax_minor(self) -> int:
        """The sum of the tax lines."""
        return sum(line.amount_minor for line in self.lines if line.kind is LineKind.TAX)

    def __post_init__(self) -> None:
        keys = [line.key for line in self.lines]
        if keys != sorted(keys):
            raise InvoiceError(f"invoice {self.key}: lines are not sorted by key")
        if len(set(keys)) != len(keys):
            raise InvoiceError(f"invoice {self.key}: duplicate line keys")
        for line in self.lines:
            if line.currency != self.currency:
                raise InvoiceError(
                    f"invoice {self.key}: line {line.key} is in {line.currency}, "
                    f"not {self.currency}"
                )
        net = sum(line.amount_minor for line in self.lines if line.kind is not LineKind.TAX)
        if self.subtotal_minor != net:
            raise InvoiceError(
                f"invoice {self.key}: subtotal is not the sum of its lines before tax"
            )
        if self.total_minor != self.subtotal_minor + self.tax_minor:
            raise InvoiceError(f"invoice {self.key}: total is not subtotal + tax lines")


def make_invoice(
    account_id: str,
    account_name: str,
    currency: str,
    period: Period,
    lines: list[InvoiceLine] | tuple[InvoiceLine, ...],
    *,
    notes: tuple[str, ...] = (),
) -> Invoice:
    """An invoice with its lines sorted by key and its totals summed from rounded lines:
    subtotal = the lines before tax, total = subtotal + the tax lines."""
    ordered = tuple(sorted(lines, key=lambda line: line.key))
    subtotal_minor = sum(line.amount_minor for line in ordered if line.kind is not LineKind.TAX)
    tax_minor = sum(line.amount_minor for line in ordered if line.kind is LineKind.TAX)
    return Invoice(
        key=invoice_key(account_id, period),
        account_id=account_id,
        account_name=account_name,
        currency=currency,
        period=period,
        lines=ordered,
        subtotal_minor=subtotal_minor,
        total_minor=subtotal_minor + tax_minor,
        notes=notes,
    )
