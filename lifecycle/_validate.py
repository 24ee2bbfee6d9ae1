"""Checks of user-given options, and exception descriptions that never raise.

Every module that takes a number of seconds or a count from a user checks it here, so that
the same mistake gets the same exception type and the same sentence everywhere: a `TypeError`
for what is not a number at all, a `ValueError` for a number out of range.
"""

from __future__ import annotations

import math
from typing import Literal, overload

__all__ = ["count", "describe", "seconds"]


@overload
def seconds(
    what: str, value: float, *, optional: Literal[False] = ..., zero: bool = ...
) -> float: ...


@overload
def seconds(
    what: str, value: float | None, *, optional: Literal[True], zero: bool = ...
) -> float | None: ...


def seconds(
    what: str, value: float | None, *, optional: bool = False, zero: bool = False
) -> float | None:
    """Check a number of seconds given by a user; return it as a float.

    Args:
        what: What the value is, as the message should name it (``"stop_timeout"``,
            ``"interval of health check 'db'"``).
        value: The value to check.
        optional: ``None`` is allowed (it means "no limit") and returned as it is.
        zero: ``0`` is allowed; otherwise the value must be positive.

    Raises:
        TypeError: The value is not a number (a `bool` is not one), or is ``None`` where
            ``optional`` is false.
        ValueError: The value is negative, zero where ``zero`` is false, infinite or NaN.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        alternative = " or None for no limit" if optional else ""
        raise TypeError(f"{what} must be a number of seconds{alternative}, not {value!r}.")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        kind = "a finite number of seconds >= 0" if zero else "a positive, finite number of seconds"
        alternative = " (or None for no limit)" if optional else ""
        raise ValueError(f"{what} must be {kind}{alternative}, not {value!r}.")
    return float(value)


def count(what: str, value: int, *, minimum: int = 1) -> int:
    """Check a whole number given by a user (a concurrency, a threshold); return it.

    Raises:
        TypeError: The value is not an `int` (a `bool` is not one).
        ValueError: The value is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a whole number >= {minimum}, not {value!r}.")
    if value < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, not {value!r}.")
    return value


def describe(exc: BaseException | None) -> str:
    """``"TypeName: message"`` for an exception; never raises, whatever its ``__str__`` does.

    An exception whose ``__str__`` raises (or returns something that is not a string) is
    described by its type alone, with a note that its message could not be read.
    """
    if exc is None:
        return ""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:
        return f"{name} (its message could not be read: its __str__ raised)"
    return f"{name}: {text}" if text else name
