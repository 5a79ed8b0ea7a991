"""The fast ``truncate`` and ``decimal_text`` of ``invoicer.exact`` give exactly what their
straightforward definitions give (the close benchmark's hot path; results must not move)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from invoicer.exact import decimal_text, fraction, truncate


def reference_truncate(value: Fraction, places: int) -> Decimal:
    scaled = abs(value.numerator) * 10**places // value.denominator
    if value < 0:
        scaled = -scaled
    return Decimal(scaled).scaleb(-places)


def reference_text(value: Decimal, min_places: int) -> str:
    normal = value.normalize()
    exp = normal.as_tuple().exponent
    assert isinstance(exp, int)
    return f"{normal:.{max(-exp, min_places, 0)}f}"


fractions = st.fractions(max_denominator=10**18).filter(lambda f: abs(f) < 10**14)
places = st.sampled_from([0, 2, 3, 4, 6, 12])  # < 28 digits, as in invoices


@given(fractions, places)
def test_truncate_is_the_reference(value: Fraction, p: int) -> None:
    fast, slow = truncate(value, p), reference_truncate(value, p)
    assert fast.as_tuple() == slow.as_tuple()


@given(fractions, places, st.sampled_from([0, 2, 3]))
def test_decimal_text_is_the_reference(value: Fraction, p: int, min_places: int) -> None:
    number = reference_truncate(value, p)
    assert decimal_text(number, min_places) == reference_text(number, min_places)


@given(
    st.decimals(
        allow_nan=False, allow_infinity=False, places=8, min_value=-(10**12), max_value=10**12
    )
)
def test_decimal_text_of_any_exponent_and_fraction_of_decimals(number: Decimal) -> None:
    for value in (number, Decimal(f"{number:E}"), number * Decimal("1.000")):
        assert decimal_text(value) == reference_text(value, 0)
        assert decimal_text(value, 2) == reference_text(value, 2)
    assert fraction(number) == Fraction(number)
    assert fraction(number * Decimal("1.000")) == Fraction(number)  # equal Decimals, one cache
