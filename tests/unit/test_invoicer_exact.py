"""Exact amounts and their one rounding (BILLING-SEMANTICS §10 "Rounding")."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from invoicer.exact import (
    AmountRangeError,
    decimal_text,
    fraction,
    minor_units,
    money_text,
    truncate,
)


def test_truncate_cuts_toward_zero_at_twelve_places() -> None:
    assert truncate(Fraction(12 * 505, 745)) == Decimal("8.134228187919")
    assert truncate(Fraction(2, 3)) == Decimal("0.666666666666")
    assert truncate(Fraction(-2, 3)) == Decimal("-0.666666666666")
    assert truncate(Fraction(1, 2**30)) == Decimal("0.000000000931")
    assert truncate(Fraction(5, 3), 4) == Decimal("1.6666")


def test_truncation_never_crosses_a_half_way_point() -> None:
    # Rounding the 12-place half-up (not truncating) would turn 0.004999999999999...
    # into 0.005000000000 and bill a cent that rounding the exact value does not.
    almost_half_cent = Fraction(5, 1000) - Fraction(1, 10**15)

    precise = truncate(almost_half_cent)

    assert precise == Decimal("0.004999999999")
    assert minor_units(precise, "EUR", "line") == 0
    assert minor_units(truncate(Fraction(5, 1000)), "EUR", "line") == 1


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("0.3220", "EUR", 32),
        ("0.005", "EUR", 1),
        ("-0.005", "EUR", -1),  # half away from zero
        ("58.5", "JPY", 59),
        ("0.1035", "KWD", 104),
    ],
)
def test_minor_units_round_half_away_from_zero(amount: str, currency: str, minor: int) -> None:
    assert minor_units(Decimal(amount), currency, "line") == minor


def test_amounts_beyond_the_exact_range_are_refused_with_their_line() -> None:
    with pytest.raises(AmountRangeError, match="line acme/x"):
        minor_units(Decimal(10) ** 13, "EUR", "line acme/x")


def test_fraction_is_exact_and_refuses_non_finite() -> None:
    assert fraction(Decimal("0.0070")) == Fraction(7, 1000)
    with pytest.raises(ValueError, match="not a finite number"):
        fraction(Decimal("NaN"))


@pytest.mark.parametrize(
    ("value", "text"),
    [("46", "46"), ("100", "100"), ("1E+2", "100"), ("0.322000000000", "0.322"), ("0", "0")],
)
def test_decimal_text_has_no_exponent_and_no_trailing_zeros(value: str, text: str) -> None:
    assert decimal_text(Decimal(value)) == text


@pytest.mark.parametrize(
    ("value", "currency", "text"),
    [
        ("12", "EUR", "12.00"),
        ("0.322", "EUR", "0.322"),
        ("0.0070", "EUR", "0.007"),
        ("1017", "JPY", "1017"),
        ("1.5", "KWD", "1.500"),
    ],
)
def test_money_text_shows_at_least_the_currency_exponent(
    value: str, currency: str, text: str
) -> None:
    assert money_text(Decimal(value), currency) == text
