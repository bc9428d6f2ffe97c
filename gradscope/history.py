"""History: a bounded store of StepRecords (see gradscope.records) and of every step's loss."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .layout import ModelLayout
from .records import FlightLog, StepRecord

__all__ = ["History", "Ring", "StepRecord", "history_up_to"]


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

    def tail(self, count: int) -> np.ndarray:
        """The last `count` values, oldest first."""
        n = len(self)
        count = max(0, min(count, n))
        slots = (np.arange(self._count - count, self._count)) % self.maxlen
        return self._data[slots]

    def array(self) -> np.ndarray:
        return self.tail(len(self))


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
        self.first_losses: list[float] = []  # the first losses of the run, kept for good
        self.total_recorded = 0
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
