"""History: a bounded store of StepRecords (see gradscope.records) and of every step's loss."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from .layout import ModelLayout
from .records import FlightLog, StepRecord

T = TypeVar("T")

__all__ = ["FiniteScan", "History", "Ring", "StepRecord", "history_up_to"]


class Ring:
    """A fixed-capacity numeric ring (numpy-backed): cheap appends, O(k) tail and head slices.

    Indexing, len(), iteration and `maxlen` behave like a `collections.deque(maxlen=...)`.

    Example:
        >>> r = Ring(3, np.int64); r.extend([1, 2, 3, 4])
        >>> list(r), r[-1], r.tail(2).tolist()
        ([2, 3, 4], 4, [3, 4])
    """

    def __init__(self, maxlen: int, dtype: type[np.generic] = np.float64) -> None:
        self.maxlen = maxlen
        self._data = np.zeros(maxlen, dtype=dtype)
        self._count = 0  # total ever appended

    def __len__(self) -> int:
        return min(self._count, self.maxlen)

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self._data[self._count % self.maxlen] = value
            self._count += 1

    def _slot(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("ring index out of range")
        return (self._count - n + index) % self.maxlen

    def __getitem__(self, index: int) -> Any:
        return self._data[self._slot(index)].item()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.array().tolist())

    @property
    def count(self) -> int:
        """How many values were ever appended (the absolute index of the next one)."""
        return self._count

    def tail(self, count: int) -> np.ndarray:
        """The last `count` values, oldest first (a copy)."""
        n = len(self)
        count = max(0, min(count, n))
        start = (self._count - count) % self.maxlen
        if start + count <= self.maxlen:  # one run of slots: a slice, no index array
            run: np.ndarray = self._data[start:start + count].copy()
            return run
        slots = (np.arange(self._count - count, self._count)) % self.maxlen
        return self._data[slots]

    def array(self) -> np.ndarray:
        return self.tail(len(self))


class FiniteScan:
    """What the rules ask of every value a float Ring holds, kept up to date from the values
    appended since the last question instead of rescanning the ring: are they all finite,
    which is the first finite one, and the largest finite one (a sliding-window maximum).

    Example:
        >>> r = Ring(3); scan = FiniteScan(r); r.extend([float("nan"), 2.0, 5.0, 1.0])
        >>> scan.all_finite(), scan.first_finite(), scan.max_finite()
        (True, (1, 2.0), 5.0)
    """

    #: Values appended at once above which the maxima are found with one vectorised pass.
    VECTOR = 32

    def __init__(self, ring: Ring) -> None:
        self._ring = ring
        self._seen = 0  # absolute index of the first value not looked at yet
        self._bad: deque[int] = deque()  # absolute indices of held non-finite values, in order
        # (absolute index, value) of the held finite values larger than every later one,
        # values decreasing: the first is the largest held finite value
        self._peaks: deque[tuple[int, float]] = deque()

    def _refresh(self) -> int:
        """Take in the values appended since the last call; the absolute index of the oldest
        held value."""
        ring = self._ring
        count = ring.count
        oldest = count - len(ring)
        start = max(self._seen, oldest)
        if start < count:
            self._take(start, ring.tail(count - start))
            self._seen = count
        bad, peaks = self._bad, self._peaks
        while bad and bad[0] < oldest:
            bad.popleft()
        while peaks and peaks[0][0] < oldest:
            peaks.popleft()
        return oldest

    def _take(self, start: int, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        if not finite.all():
            self._bad.extend((np.flatnonzero(~finite) + start).tolist())
        peaks = self._peaks
        if values.size <= self.VECTOR:
            for i, value in enumerate(values.tolist()):
                if value == value and abs(value) != math.inf:
                    while peaks and peaks[-1][1] <= value:
                        peaks.pop()
                    peaks.append((start + i, value))
            return
        # a value stays a peak when it is above every later one (ties: the later one stays)
        masked = np.where(finite, values, -np.inf)
        later = np.empty_like(masked)
        later[-1] = -np.inf
        later[:-1] = np.maximum.accumulate(masked[::-1])[::-1][1:]
        keep = np.flatnonzero(finite & (masked > later))
        if keep.size:
            top = float(masked[keep[0]])
            while peaks and peaks[-1][1] <= top:
                peaks.pop()
            peaks.extend(zip((keep + start).tolist(), masked[keep].tolist()))

    def all_finite(self) -> bool:
        """Whether every held value is finite."""
        self._refresh()
        return not self._bad

    def first_finite(self) -> tuple[int, float] | None:
        """(absolute index, value) of the oldest held finite value, None when there is none."""
        index = self._refresh()
        for bad in self._bad:
            if bad != index:
                break
            index += 1
        if index >= self._ring.count:
            return None
        return index, float(self._ring._data[index % self._ring.maxlen])

    def max_finite(self) -> float:
        """The largest held finite value (-inf when there is none)."""
        self._refresh()
        return self._peaks[0][1] if self._peaks else -math.inf


class History:
    """Recorded steps in a bounded ring (plus the first few, kept for reference), and the loss
    of every step in a longer ring.

    Example:
        >>> import torch
        >>> h = History(ModelLayout.of(torch.nn.Linear(1, 1)), capacity=3)
        >>> len(h), h.capacity
        (0, 3)
    """

    KEEP_FIRST = 10
    KEEP_FIRST_LOSSES = 32

    def __init__(self, layout: ModelLayout, capacity: int = 2000, loss_capacity: int = 100_000):
        self.layout = layout
        self.capacity = capacity
        self._first: list[StepRecord] = []
        self._recent: deque[StepRecord] = deque(maxlen=capacity)
        self.loss_steps = Ring(loss_capacity, np.int64)
        self.loss_values = Ring(loss_capacity, np.float64)
        #: the held losses' non-finite values, first and largest finite one, kept up to date
        self.loss_scan = FiniteScan(self.loss_values)
        self.first_losses: list[float] = []  # the first losses of the run, kept for good
        self.total_recorded = 0
        self._kept: dict[Any, Any] = {}
        #: the flight recorder's steps after the last record (read when the run is brought
        #: up to date: close(), diagnose(), report()); a new record takes them over
        self.flight_tail: FlightLog | None = None

    def __len__(self) -> int:
        return len(self._recent)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.records())

    def append(self, record: StepRecord) -> None:
        self.flight_tail = None  # a record holds the flight recorder's steps up to it
        if len(self._first) < self.KEEP_FIRST:
            self._first.append(record)
        self._recent.append(record)
        self.total_recorded += 1

    def add_losses(self, steps: list[int], values: list[float]) -> None:
        room = self.KEEP_FIRST_LOSSES - len(self.first_losses)
        if room > 0:
            self.first_losses.extend(float(v) for v in list(values)[:room])
        self.loss_steps.extend(steps)
        self.loss_values.extend(values)

    def kept(self, key: Any, compute: Callable[[], T]) -> T:
        """`compute()`, worked out once and kept under `key`: for values derived from what
        never changes once added (the first records, the first losses), with a key that
        names how much of it they read.

        Example:
            >>> import torch
            >>> h = History(ModelLayout.of(torch.nn.Linear(1, 1)))
            >>> h.kept(("first", 0), lambda: 1), h.kept(("first", 0), lambda: 2)
            (1, 1)
        """
        try:
            return self._kept[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._kept[key] = compute()
            return value

    def records(self) -> list[StepRecord]:
        """Recorded steps in order: the first ones kept, then the recent ring (no duplicates)."""
        recent = list(self._recent)
        start = recent[0].step if recent else None
        head = [r for r in self._first if start is None or r.step < start]
        return head + recent

    def recent(self, count: int) -> list[StepRecord]:
        """The last `count` recorded steps."""
        if count <= 0:
            return []
        n = len(self._recent)
        return [self._recent[i] for i in range(max(0, n - count), n)]

    @property
    def first(self) -> list[StepRecord]:
        return list(self._first)

    @property
    def last(self) -> StepRecord | None:
        return self._recent[-1] if self._recent else None

    def losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, losses) of every step whose loss is still held."""
        return self.loss_steps.array(), self.loss_values.array()


def history_up_to(history: History, drop: int) -> History:
    """The history as it stood `drop` records ago: a new History holding the records and
    losses up to then (used to find when a sign began; rare, so a copy is fine).

    Example:
        >>> import torch
        >>> h = History(ModelLayout.of(torch.nn.Linear(1, 1)))
        >>> history_up_to(h, 0).last is None
        True
    """
    records = history.records()
    kept = records[: len(records) - drop] if drop else records
    upto = kept[-1].step if kept else -1
    steps, values = history.losses()
    keep = steps <= upto
    earlier = History(history.layout, capacity=history.capacity,
                      loss_capacity=max(int(keep.sum()), 1))
    earlier.add_losses(steps[keep].tolist(), values[keep].tolist())
    earlier.first_losses = list(history.first_losses[: int(keep.sum())])
    for record in kept:
        earlier.append(record)
    earlier.total_recorded = history.total_recorded - drop
    return earlier
