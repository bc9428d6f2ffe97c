"""How gradscope writes a number, in rule sentences and reports alike (one style everywhere)."""

from __future__ import annotations

import math


def fmt(value: float | None, digits: int = 3) -> str:
    """A short, fixed-style number: '-' when missing, scientific outside [1e-3, 1e5).

    Example:
        >>> fmt(0.012345), fmt(2.5e-9), fmt(float("nan")), fmt(float("inf")), fmt(0)
        ('0.0123', '2.50e-09', '-', 'inf', '0')
    """
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    return f"{value:.{max(digits - 1, 1)}e}"
