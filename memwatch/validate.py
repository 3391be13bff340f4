"""Validation of the numeric options that are not rule limits, worded like Python's own errors."""

from __future__ import annotations

import decimal
import math
import numbers


def check_number(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> float:
    """Validate a number against a range and return it as a float.

    :raises TypeError: for a bool, a string or anything that is not a real number
    :raises ValueError: for NaN, a number out of the range, or a fraction where a
        whole number is expected
    """
    expected = "an integer" if integer else "a number"
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    upper = "inf" if math.isinf(high) else f"{high:g}"
    accepted = f"{expected} in {left}{low:g}, {upper}{right}"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {accepted}, got {value!r}") from None
    too_low = number < low or (number == low and not low_inclusive)
    too_high = number > high or (number == high and not high_inclusive)
    if math.isnan(number) or math.isinf(number) or too_low or too_high:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    if integer and not number.is_integer():
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return number


def check_flag(name: str, value: object) -> bool:
    """Validate a True/False argument."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
