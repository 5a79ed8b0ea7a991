"""Exact arithmetic for invoice lines: fractions in, one rounding out.

Line amounts are computed as ``fractions.Fraction`` (exact: 505/745 x 12.00, bytes / 2**30)
and leave it in exactly two forms, side by side:

- ``amount_precise``: the exact value truncated toward zero to 12 decimal places (the
  ``NUMERIC(38,12)`` contract). Truncation is a representation, not a rounding of money: it
  never crosses a half-way point at the currency's precision (<= 3 places), so
- ``amount_minor = round_minor(amount_precise, currency)`` (``ROUND_HALF_UP``, once) equals
  rounding the exact value itself half away from zero.

Rendered decimals never use exponent notation: quantities show their significant digits,
money shows at least its currency's exponent ("12.00", "0.322", JPY "1017").
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from functools import lru_cache

from rating.money import exponent, round_minor

PRECISE_PLACES = 12
# round_minor works in the default 28-digit decimal context: with 12 places and up to 3 of
# currency exponent, amounts below 10**13 are always exact there.
MAX_LINE_AMOUNT = Decimal(10) ** 13


class AmountRangeError(ValueError):
    """An amount too large for the invoice's exact representation."""


def truncate(value: Fraction, places: int = PRECISE_PLACES) -> Decimal:
    """``value`` truncated toward zero to ``places`` decimals, exactly (integer arithmetic)."""
    numerator = value.numerator
    scaled = abs(numerator) * 10**places // value.denominator
    if numerator < 0:  # (not ``value < 0``: a Fraction comparison costs ten times more)
        scaled = -scaled
    return Decimal(scaled).scaleb(-places)


def minor_units(precise: Decimal, currency: str, where: str) -> int:
    """Round a precise line amount once (``ROUND_HALF_UP`` via ``round_minor``)."""
    if abs(precise) >= MAX_LINE_AMOUNT:
        raise AmountRangeError(
            f"{where}: amount {precise} {currency} is out of the supported range "
            f"(below {MAX_LINE_AMOUNT:f})"
        )
    return round_minor(precise, currency)


def fraction(value: Decimal) -> Fraction:
    """A finite ``Decimal`` as an exact ``Fraction`` (cached: prices repeat on every line;
    equal Decimals are the same number, so they share one Fraction)."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite number")
    return _fraction(value)


@lru_cache(maxsize=4096)
def _fraction(value: Decimal) -> Fraction:
    return Fraction(value)


def decimal_text(value: Decimal, min_places: int = 0) -> str:
    """Fixed-point text: trailing zeros stripped, at least ``min_places`` decimals.

    String work on ``format(value, "f")`` (no exponent, exact digits): the same text as
    formatting ``value.normalize()`` with ``max(places, min_places)`` decimals (a property
    test compares the two), without the normalisation's context arithmetic, which also
    rounded values of more than 28 significant digits (never an amount: < 10**13 with 12
    places)."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite number")
    if not value:  # equal zeros differ in text ("-0"): not cached
        return _decimal_text(value, min_places)
    return _cached_decimal_text(value, min_places)


def _decimal_text(value: Decimal, min_places: int) -> str:
    text = format(value, "f")
    whole, _, places = text.partition(".")
    places = places.rstrip("0")
    if len(places) < min_places:
        places += "0" * (min_places - len(places))
    return f"{whole}.{places}" if places else whole


# Equal non-zero Decimals have the same text (their digits without trailing zeros), and
# amounts, prices and quantities repeat across lines and accounts.
_cached_decimal_text = lru_cache(maxsize=1 << 16)(_decimal_text)


def money_text(value: Decimal, currency: str) -> str:
    """Money as text with at least the currency's exponent: 12 EUR -> "12.00"."""
    return decimal_text(value, exponent(currency))
