"""Taxes (BILLING-SEMANTICS §7): the account's tax profile applied to its invoice lines.

- ``rate``: tax = rate x the sum of the rounded taxable lines (every line before tax:
  charges, discounts, the commitment true-up), rounded once, half away from zero, as one
  ``tax`` line per rate keyed ``{account}/{period}/tax/{jurisdiction}-{rate}``. With
  ``line_level_rounding`` each taxable line gets its own tax line instead
  (``{line key}/tax``), each rounded once; the invoice's tax is then their sum.
- ``reverse_charge``: one 0.00 tax line at 0 % and the note :data:`REVERSE_CHARGE_NOTE`.
- ``exempt``: one 0.00 tax line at 0 %, saying so.
- no profile: no tax lines (the invoice total is its subtotal).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from fractions import Fraction

from invoicer.discounts import minor_to_decimal
from invoicer.exact import decimal_text, fraction, minor_units, truncate
from invoicer.invoice import InvoiceLine, LineKind
from invoicer.periods import Period
from rating.catalog import Account, TaxKind, TaxProfile
from rating.money import exponent

REVERSE_CHARGE_NOTE = (
    "Reverse charge: VAT to be accounted for by the recipient (Art. 196 Directive 2006/112/EC)"
)


def tax_notes(profile: TaxProfile | None) -> tuple[str, ...]:
    if profile is not None and profile.kind is TaxKind.REVERSE_CHARGE:
        return (REVERSE_CHARGE_NOTE,)
    return ()


def _rate_label(profile: TaxProfile) -> str:
    rate = decimal_text(profile.rate)
    if profile.kind is TaxKind.RATE:
        return f"{profile.jurisdiction or 'rate'}-{rate}"
    return profile.kind.value


def _description(profile: TaxProfile, base_minor: int, currency: str) -> str:
    base = minor_to_decimal(base_minor, currency)
    if profile.kind is TaxKind.REVERSE_CHARGE:
        return f"VAT 0 % on {base} {currency}: {REVERSE_CHARGE_NOTE}"
    if profile.kind is TaxKind.EXEMPT:
        return f"Tax exempt: 0 % on {base} {currency}"
    where = f" ({profile.jurisdiction})" if profile.jurisdiction else ""
    return f"Tax {decimal_text(profile.rate)} %{where} on {base} {currency}"


def _tax_line(
    profile: TaxProfile,
    *,
    key: str,
    base_minor: int,
    currency: str,
    service: tuple[datetime, datetime],
    refs: InvoiceLine | None,
) -> InvoiceLine:
    rate = fraction(profile.rate) / 100
    base = Fraction(base_minor, 10 ** exponent(currency))
    precise = truncate(base * rate)
    return InvoiceLine(
        key=key,
        kind=LineKind.TAX,
        description=_description(profile, base_minor, currency),
        service_start=service[0],
        service_end=service[1],
        quantity=minor_to_decimal(base_minor, currency),
        unit=f"{currency} taxable",
        unit_price=truncate(rate),
        amount_precise=precise,
        amount_minor=minor_units(precise, currency, f"line {key}"),
        currency=currency,
        subscription_id="" if refs is None else refs.subscription_id,
        plan_id="" if refs is None else refs.plan_id,
        meter=None if refs is None else refs.meter,
        resource_id=None if refs is None else refs.resource_id,
        applies_to=None if refs is None else refs.key,
        tax_rate=profile.rate,
        jurisdiction=profile.jurisdiction,
    )


def tax_lines(
    account: Account, period: Period, key_prefix: str, lines: Sequence[InvoiceLine]
) -> list[InvoiceLine]:
    """The tax lines for ``lines`` (every line before tax) under the account's profile."""
    profile = account.tax
    taxable = [line for line in lines if line.kind is not LineKind.TAX]
    if profile is None or not taxable:
        return []
    currency = account.currency
    if profile.kind is TaxKind.RATE and profile.line_level_rounding:
        return [
            _tax_line(
                profile,
                key=f"{line.key}/tax",
                base_minor=line.amount_minor,
                currency=currency,
                service=(line.service_start, line.service_end),
                refs=line,
            )
            for line in taxable
        ]
    base = sum(line.amount_minor for line in taxable)
    key = f"{key_prefix}/tax/{_rate_label(profile)}"
    service = (period.start, period.end)
    return [
        _tax_line(profile, key=key, base_minor=base, currency=currency, service=service, refs=None)
    ]
