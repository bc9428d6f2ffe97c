"""StepRecord (what one recorded step measured) and History (a bounded store of them)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .layout import ModelLayout
from .signals.activations import ActivationStats
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
    activations: dict[str, ActivationStats] = field(default_factory=dict)
    data: DataStats | None = None
    nonfinite_origin: str | None = None
    nonfinite_grad_params: list[str] = field(default_factory=list)

    @property
    def overflow(self) -> bool:
        """An optimizer step skipped because gradients were non-finite (AMP loss scaling)."""
        return self.skipped and bool(np.any(self.grad_nonfinite > 0))

    def layer_grad_norm(self, layout: ModelLayout) -> np.ndarray:
        """Gradient L2 norm per layer (module owning the parameters), in model order."""
        return _per_layer(layout, self.grad_norm)

    def layer_param_norm(self, layout: ModelLayout) -> np.ndarray:
        return _per_layer(layout, self.param_norm)

    def layer_update_ratio(self, layout: ModelLayout) -> np.ndarray:
        """Largest sampled update/weight ratio among each layer's parameters."""
        out = np.full(len(layout.layers), np.nan)
        for index, layer in enumerate(layout.param_layer):
            value = self.update_ratio[index]
            if np.isfinite(value) and not (value <= out[layer]):
                out[layer] = value
        return out


def _per_layer(layout: ModelLayout, per_param: np.ndarray) -> np.ndarray:
    """Combine per-parameter L2 norms into per-layer L2 norms (NaN when none was measured)."""
    owners = np.asarray(layout.param_layer, dtype=np.int64)
    measured = ~np.isnan(per_param)
    squares = np.bincount(owners[measured], weights=per_param[measured] ** 2,
                          minlength=len(layout.layers))
    counts = np.bincount(owners[measured], minlength=len(layout.layers))
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.sqrt(squares), np.nan)


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

    def __init__(self, layout: ModelLayout, capacity: int = 2000, loss_capacity: int = 100_000):
        self.layout = layout
        self.capacity = capacity
        self._first: list[StepRecord] = []
        self._recent: deque[StepRecord] = deque(maxlen=capacity)
        self.loss_steps: deque[int] = deque(maxlen=loss_capacity)
        self.loss_values: deque[float] = deque(maxlen=loss_capacity)
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
        return np.asarray(self.loss_steps, dtype=np.int64), np.asarray(self.loss_values)
