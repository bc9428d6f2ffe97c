"""RuleContext: the read-only view of the history a rule sees, with shared derived arrays."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from ..history import History, StepRecord
from ..layout import ModelLayout

#: How many recent recorded steps rules may look at (bounds the cost of an evaluation).
LOOKBACK = 64
#: How many recent per-step losses rules may look at.
LOSS_LOOKBACK = 512


class RuleContext:
    """What a rule reads: recent records stacked into arrays, the first records, the losses.

    Arrays are computed once per evaluation and shared by all rules.

    Example:
        >>> import torch
        >>> ctx = RuleContext(History(ModelLayout.of(torch.nn.Linear(1, 1))))
        >>> ctx.records
        []
    """

    def __init__(self, history: History, thresholds: dict[str, Any] | None = None) -> None:
        self.history = history
        self.layout: ModelLayout = history.layout
        self.t: dict[str, Any] = dict(thresholds or {})

    def with_thresholds(self, thresholds: dict[str, Any]) -> RuleContext:
        """The same view with another rule's thresholds (shares the cached arrays)."""
        clone = object.__new__(RuleContext)
        clone.__dict__.update(self.__dict__)
        clone.t = dict(thresholds)
        return clone

    @cached_property
    def records(self) -> list[StepRecord]:
        return self.history.recent(LOOKBACK)

    @cached_property
    def first(self) -> list[StepRecord]:
        return self.history.first

    @cached_property
    def healthy_records(self) -> list[StepRecord]:
        """Records before weights or the loss first went non-finite (later stats are noise)."""
        out = []
        for r in self.records:
            weights = r.param_norm[~np.isnan(r.param_norm)]
            loss_given = r.loss_requires_grad is not None or not np.isnan(r.loss)
            if (loss_given and not np.isfinite(r.loss)) or not np.all(np.isfinite(weights)):
                break
            out.append(r)
        return out

    @property
    def last(self) -> StepRecord | None:
        return self.records[-1] if self.records else None

    @cached_property
    def steps(self) -> np.ndarray:
        return np.array([r.step for r in self.records], dtype=np.int64)

    @cached_property
    def layer_grad(self) -> np.ndarray:
        """[records x layers] gradient L2 norm per layer."""
        return self._stack(lambda r: r.layer_grad_norm(self.layout), len(self.layout.layers))

    @cached_property
    def layer_weight(self) -> np.ndarray:
        """[records x layers] parameter L2 norm per layer."""
        return self._stack(lambda r: r.layer_param_norm(self.layout), len(self.layout.layers))

    @cached_property
    def layer_update(self) -> np.ndarray:
        """[records x layers] largest sampled update/weight ratio per layer."""
        return self._stack(lambda r: r.layer_update_ratio(self.layout), len(self.layout.layers))

    @cached_property
    def total_grad(self) -> np.ndarray:
        """Global gradient L2 norm per record (NaN where no gradient was measured)."""
        grad = self._stack(lambda r: r.grad_norm, len(self.layout.params))
        if grad.size == 0:
            return np.zeros(0)
        measured = ~np.isnan(grad)
        with np.errstate(invalid="ignore", over="ignore"):
            total = np.sqrt(np.nansum(grad ** 2, axis=1))
        return np.where(measured.any(axis=1), total, np.nan)

    def _stack(self, get, width: int) -> np.ndarray:
        if not self.records:
            return np.zeros((0, width))
        return np.vstack([get(r) for r in self.records])

    def loss_tail(self, count: int = LOSS_LOOKBACK) -> tuple[np.ndarray, np.ndarray]:
        """(steps, losses) of the last `count` steps whose loss is known."""
        values = self.history.loss_values
        steps = self.history.loss_steps
        n = len(values)
        k = min(count, n)
        out_v = np.fromiter((values[i] for i in range(n - k, n)), dtype=float, count=k)
        out_s = np.fromiter((steps[i] for i in range(n - k, n)), dtype=np.int64, count=k)
        return out_s, out_v

    @cached_property
    def losses(self) -> tuple[np.ndarray, np.ndarray]:
        return self.loss_tail()

    def layer_names(self, indices) -> list[str]:
        """Layer names for layer indices, in model order."""
        return [self.layout.layers[i] or "(root)" for i in sorted(set(int(i) for i in indices))]

    def param_names(self, indices) -> list[str]:
        return [self.layout.params[i].name for i in sorted(set(int(i) for i in indices))]
