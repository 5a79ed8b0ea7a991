"""Currencies and the one rounding rule: each amount is rounded once, half away from zero."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext

# ISO 4217 minor-unit exponents of the currencies the catalog accepts.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AUD": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CNY": 2, "CZK": 2, "DKK": 2,
    "EUR": 2, "GBP": 2, "HKD": 2, "HUF": 2, "INR": 2, "JOD": 3, "JPY": 0, "KRW": 0,
    "KWD": 3, "MXN": 2, "NOK": 2, "NZD": 2, "OMR": 3, "PLN": 2, "RON": 2, "SEK": 2,
    "SGD": 2, "TND": 3, "TRY": 2, "USD": 2, "ZAR": 2,
}  # fmt: skip


class UnknownCurrencyError(ValueError):
    def __init__(self, currency: str) -> None:
        super().__init__(f"unknown currency {currency!r} (expected an ISO 4217 code)")
        self.currency = currency


def exponent(currency: str) -> int:
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrencyError(currency) from None


def round_minor(amount: Decimal, currency: str) -> int:
    """Round a precise amount once, half away from zero, to integer minor units."""
    with localcontext() as ctx:
        # Enough digits that quantize never rounds a second time (NUMERIC(38,12) fits).
        ctx.prec = 60
        scaled = amount.scaleb(exponent(currency))
        return int(scaled.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def format_minor(amount_minor: int, currency: str) -> str:
    """Render integer minor units as a plain decimal string, e.g. 415 EUR -> '4.15'."""
    return str(Decimal(amount_minor).scaleb(-exponent(currency)))
