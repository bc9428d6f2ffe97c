"""Small helpers the built-in rules share: number formatting, persistence, ranking causes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ..diagnosis import Cause
from ..history import StepRecord
from ..numbers import fmt as fmt  # the one number style, for the rules
from .base import Threshold

#: Thresholds most rules share.
WINDOW = Threshold(
    5, "recorded steps a condition must hold before it is reported: one bad batch is noise, "
    "five in a row is a pattern")
WARMUP = Threshold(
    20, "steps at the start of training that warning rules ignore: early steps are "
    "transient (initial loss drop, optimizer state filling, learning-rate warm-up)")
HEALTHY_UPDATE = 1e-3  # update/weight ratio of a healthily training layer (Karpathy, CS231n)


def usable(records: Sequence[StepRecord], warmup: float) -> list[StepRecord]:
    """Records past warm-up that are not AMP overflow-skipped steps."""
    return [r for r in records if r.step >= warmup and not r.overflow]


def persistent(records: Sequence[StepRecord], window: float,
               condition: Callable[[StepRecord], bool]) -> list[StepRecord] | None:
    """The last `window` records if `condition` holds on each of them, else None."""
    n = int(window)
    if n <= 0 or len(records) < n:
        return None
    tail = list(records[-n:])
    return tail if all(condition(r) for r in tail) else None


def in_lr_warmup(records: Sequence[StepRecord]) -> bool:
    """True while a learning rate is still rising across the given records (warm-up)."""
    if len(records) < 2 or not records[-1].lrs or not records[0].lrs:
        return False
    first, last = records[0].lrs, records[-1].lrs
    return any(b > a * 1.01 for a, b in zip(first, last) if math.isfinite(a) and math.isfinite(b))


def ranked(scores: Iterable[tuple[str, float, str]]) -> list[Cause]:
    """Causes with positive scores (repeated ids summed), normalised to sum to 1, best first.

    Example:
        >>> [c.id for c in ranked([("a", 1.0, ""), ("b", 3.0, ""), ("c", 0.0, "")])]
        ['b', 'a']
    """
    merged: dict[str, tuple[float, str]] = {}
    for cid, s, ev in scores:
        if s > 0:
            old_score, old_text = merged.get(cid, (0.0, ""))
            merged[cid] = (old_score + s, "; ".join(t for t in (old_text, ev) if t))
    kept = [(cid, s, ev) for cid, (s, ev) in merged.items()]
    total = sum(s for _, s, _ in kept) or 1.0
    causes = [Cause(cid, round(s / total, 3), ev) for cid, s, ev in kept]
    return sorted(causes, key=lambda c: -c.likelihood)


def fast_median(values) -> float:
    """Median of a small 1-D sequence (NaN when empty); cheaper than np.median for short inputs.

    Example:
        >>> fast_median([3.0, 1.0, 2.0, 10.0])
        2.5
    """
    ordered = np.sort(np.asarray(values, dtype=float))
    n = ordered.size
    if n == 0:
        return float("nan")
    mid = n // 2
    return float(ordered[mid]) if n % 2 else float(0.5 * (ordered[mid - 1] + ordered[mid]))


def plain_median(values: Sequence[float]) -> float:
    """fast_median of a short list of floats without NaN, in plain Python (no array is
    built): the same value, ordered the same way.

    Example:
        >>> plain_median([3.0, 1.0, 2.0, 10.0]) == fast_median([3.0, 1.0, 2.0, 10.0])
        True
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return float(ordered[mid]) if n % 2 else float(0.5 * (ordered[mid - 1] + ordered[mid]))


def median_finite(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Median ignoring NaN/inf (NaN where nothing is finite); a sort, not np.nanmedian,
    which goes through masked arrays and costs ten times more on small inputs.

    Example:
        >>> median_finite(np.array([[1.0, np.nan], [3.0, 4.0], [np.inf, 6.0]]), axis=0).tolist()
        [2.0, 5.0]
    """
    array = np.where(np.isfinite(values), values, np.nan)
    if axis is None:
        # one sorted run of the finite values: the same middle values as the general path
        flat = array.reshape(-1)
        finite = np.sort(flat[~np.isnan(flat)])
        count = finite.size
        if count == 0:
            return np.nan
        return float(0.5 * (finite[(count - 1) // 2] + finite[count // 2]))
    if array.size == 0:
        return np.nan
    if array.ndim == 2 and axis == 0:  # a window of per-layer rows: plain indexing
        ordered = np.sort(array, axis=0)  # NaN sorts last
        counts = np.count_nonzero(~np.isnan(array), axis=0)
        columns = np.arange(array.shape[1])
        low = ordered[np.maximum(counts - 1, 0) // 2, columns]
        high = ordered[np.minimum(counts // 2, array.shape[0] - 1), columns]
        return np.where(counts > 0, 0.5 * (low + high), np.nan)
    ordered = np.sort(array, axis=axis)  # NaN sorts last
    count = np.sum(~np.isnan(array), axis=axis, keepdims=True)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=axis)
    high = np.take_along_axis(ordered, np.minimum(count // 2, ordered.shape[axis] - 1),
                              axis=axis)
    median = np.where(count > 0, 0.5 * (low + high), np.nan).squeeze(axis)
    return float(median) if median.ndim == 0 else median


