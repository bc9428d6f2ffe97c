"""StepRecord (what one recorded step measured) and History (a bounded store of them)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from .layout import ModelLayout
from .signals.activations import ActivationStats, ActivationTable
from .signals.data import DataStats


@dataclass
class StepRecord:
    """All signals of one recorded step. Per-parameter arrays follow `History.layout.params`.

    NaN in a per-parameter array means "not measured at this step" (e.g. no gradient).
    """

    step: int
    loss: float
    stepped: bool
    skipped: bool
    lrs: list[float]
    grad_norm: np.ndarray
    grad_max: np.ndarray
    grad_nonfinite: np.ndarray
    grad_none: np.ndarray
    param_norm: np.ndarray
    update_ratio: np.ndarray
    changed: np.ndarray
    stale_grad: np.ndarray
    not_in_optimizer: np.ndarray
    requires_grad: np.ndarray
    backward_count: int
    loss_requires_grad: bool | None
    activations: Mapping[str, ActivationStats] = field(default_factory=dict)
    data: DataStats | None = None
    nonfinite_origin: str | None = None
    nonfinite_grad_params: list[str] = field(default_factory=list)
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def overflow(self) -> bool:
        """An optimizer step skipped because gradients were non-finite (AMP loss scaling)."""
        return self.skipped and self._cached(
            "any_nonfinite_grad", lambda: bool(np.any(self.grad_nonfinite > 0)))

    def layer_grad_norm(self, layout: ModelLayout) -> np.ndarray:
        """Gradient L2 norm per layer (module owning the parameters), in model order."""
        return self._cached("layer_grad", lambda: _per_layer(layout, self.grad_norm))

    def layer_param_norm(self, layout: ModelLayout) -> np.ndarray:
        return self._cached("layer_param", lambda: _per_layer(layout, self.param_norm))

    def layer_update_ratio(self, layout: ModelLayout) -> np.ndarray:
        """Update/weight ratio per layer: ||dW|| / ||W|| over all of the layer's parameters,
        each parameter's sampled ratio weighted by its norm (so a small bias that moves a lot
        does not stand for the whole layer). NaN where nothing was measured.
        """

        def compute() -> np.ndarray:
            owners = layout.owners
            ok = np.isfinite(self.update_ratio) & np.isfinite(self.param_norm)
            moved = np.bincount(owners[ok], weights=(self.update_ratio[ok]
                                                     * self.param_norm[ok]) ** 2,
                                minlength=len(layout.layers))
            weight = np.bincount(owners[ok], weights=self.param_norm[ok] ** 2,
                                 minlength=len(layout.layers))
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(weight > 0, np.sqrt(moved / weight), np.nan)

        return self._cached("layer_update", compute)

    def total_grad_norm(self) -> float:
        """Global gradient L2 norm (inf if any gradient held NaN/Inf; NaN if none measured)."""

        def compute() -> float:
            measured = ~np.isnan(self.grad_norm)
            if not measured.any():
                return float("nan")
            return float(np.sqrt(np.sum(self.grad_norm[measured] ** 2)))

        return self._cached("total_grad", compute)

    def weights_finite(self) -> bool:
        """True when every measured parameter norm is finite."""
        return self._cached("weights_finite", lambda: bool(
            np.all(np.isfinite(self.param_norm[~np.isnan(self.param_norm)]))))

    def modules_over(self, field: str, limit: float) -> dict[str, float]:
        """Modules whose activation statistic `field` (e.g. "dead_frac") exceeds `limit`."""

        positive = self._cached("positive", self._positive_activations)[field]
        if limit <= 0:
            return positive
        return self._cached(f"over:{field}:{limit}", lambda: {
            name: value for name, value in positive.items() if value > limit})

    def _positive_activations(self) -> dict[str, dict[str, float]]:
        """Modules with a non-zero dead, saturated or non-finite fraction (one pass)."""
        table = self.activations
        if isinstance(table, ActivationTable):  # columns: no object per module
            names = table.names
            found = {}
            for field in ("dead_frac", "saturated_frac", "nonfinite_frac"):
                column = table.column(field)
                hits = np.flatnonzero(np.nan_to_num(column) != 0).tolist()
                found[field] = {names[i]: float(column[i]) for i in hits}
            return found
        dead: dict[str, float] = {}
        saturated: dict[str, float] = {}
        nonfinite: dict[str, float] = {}
        for name, stats in self.activations.items():
            if stats.dead_frac:
                dead[name] = stats.dead_frac
            if stats.saturated_frac:
                saturated[name] = stats.saturated_frac
            if stats.nonfinite_frac:
                nonfinite[name] = stats.nonfinite_frac
        return {"dead_frac": dead, "saturated_frac": saturated, "nonfinite_frac": nonfinite}

    def _cached(self, key: str, compute):
        """Per-layer views are derived once per record (records are not changed once stored)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]


def _per_layer(layout: ModelLayout, per_param: np.ndarray) -> np.ndarray:
    """Combine per-parameter L2 norms into per-layer L2 norms (NaN when none was measured)."""
    owners = layout.owners
    measured = ~np.isnan(per_param)
    squares = np.bincount(owners[measured], weights=per_param[measured] ** 2,
                          minlength=len(layout.layers))
    counts = np.bincount(owners[measured], minlength=len(layout.layers))
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.sqrt(squares), np.nan)


class Ring:
    """A fixed-capacity numeric ring (numpy-backed): cheap appends, O(k) tail and head slices.

    Indexing, len(), iteration and `maxlen` behave like a `collections.deque(maxlen=...)`.

    Example:
        >>> r = Ring(3, np.int64); r.extend([1, 2, 3, 4])
        >>> list(r), r[-1], r.tail(2).tolist()
        ([2, 3, 4], 4, [3, 4])
    """

    def __init__(self, maxlen: int, dtype=np.float64) -> None:
        self.maxlen = maxlen
        self._data = np.zeros(maxlen, dtype=dtype)
        self._count = 0  # total ever appended

    def __len__(self) -> int:
        return min(self._count, self.maxlen)

    def extend(self, values) -> None:
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

    def __getitem__(self, index: int):
        return self._data[self._slot(index)].item()

    def __iter__(self):
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

    def __len__(self) -> int:
        return len(self._recent)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.records())

    def append(self, record: StepRecord) -> None:
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
