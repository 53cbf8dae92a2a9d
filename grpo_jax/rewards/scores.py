"""What a reward returned -> a score: a finite float, or None for a value that cannot count (scored 0, "invalid").

Both reward paths use :func:`as_score`: inline rewards when their batch is cleaned (``combine``), isolated rewards
inside the worker process before the result is sent back (``pool``), so only a float or an :class:`Invalid`
description ever crosses the pipe, and no returned object can fail to pickle or crash the trainer when unpickled.
"""
from __future__ import annotations

import numbers
import reprlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np

# Beyond this a value is a bug, not a reward: it would swamp every other term, and the group statistics of the
# advantages square the float32 rewards (float32 overflows at 3.4e38, so |r| must stay far below 1.8e19).
MAX_ABS_SCORE = 1e9
_REAL = (numbers.Real, Decimal, np.bool_, np.integer, np.floating)


@dataclass(frozen=True)
class Invalid:
    """A value that :func:`as_score` rejected, kept only as its description (what the worker pool sends back)."""

    what: str


def as_score(value: Any) -> float | None:
    """``float(value)`` when ``value`` is a real number with ``|value| <= MAX_ABS_SCORE``; None otherwise; never raises.

    Real numbers: bool, int, float, Fraction, Decimal (and types registered as ``numbers.Real``, e.g. sympy's), NumPy
    bool/integer/floating scalars, and 0-d arrays (NumPy or JAX) holding one of those. None for everything else:
    None, str, bytes, complex, lists, arrays of 1 or more dimensions (even of size 1), arbitrary objects; and for
    real numbers whose conversion raises (an int of 10**400, Decimal('sNaN'), a ``__float__`` that raises), is NaN
    or ±inf, or exceeds ``MAX_ABS_SCORE``.
    """
    try:
        if not isinstance(value, _REAL) and getattr(value, "shape", None) == ():
            value = np.asarray(value)[()]  # a 0-d array -> its element
        if not isinstance(value, _REAL):
            return None
        score = float(value)
    except Exception:  # OverflowError, ValueError, or whatever a hostile __float__ / shape / __array__ raises
        return None
    return score if abs(score) <= MAX_ABS_SCORE else None


def describe(value: Any) -> str:
    """A short, safe description of a rejected value for the log: its type and a truncated repr."""
    if isinstance(value, Invalid):
        return value.what
    try:
        if isinstance(value, int) and abs(value).bit_length() > 64:
            text = f"with {abs(value).bit_length()} bits"  # repr of a huge int is slow, or refused past 4300 digits
        else:
            text = reprlib.repr(value)
    except Exception:
        text = "(unprintable)"
    return f"{type(value).__name__} {text}"
