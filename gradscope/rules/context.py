"""RuleContext: the read-only view of the history a rule sees, with shared derived arrays."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

from ..history import History, StepRecord
from ..layout import ModelLayout

T = TypeVar("T")

#: How many recent recorded steps rules may look at (bounds the cost of an evaluation).
LOOKBACK = 16
#: How many recent per-step losses rules may look at.
LOSS_LOOKBACK = 256


def _healthy(record: StepRecord) -> bool:
    """Whether the loss (when given) and the weights of `record` are finite (kept with it)."""
    try:
        return record._derived["healthy"]  # type: ignore[no-any-return]
    except KeyError:
        return record.derived("healthy", lambda: not (
            (record.loss_given and not math.isfinite(record.loss))
            or not record.weights_finite()))


class RuleContext:
    """What a rule reads: the recent and the first records, the losses, the layout and the
    rule's thresholds (`t`). Values derived from them (`memo`) are computed once per
    evaluation and shared by all rules.

    Example:
        >>> import torch
        >>> ctx = RuleContext(History(ModelLayout.of(torch.nn.Linear(1, 1))))
        >>> ctx.records
        []
    """

    def __init__(self, history: History, thresholds: dict[str, Any] | None = None,
                 shared: dict[str, Any] | None = None) -> None:
        self.history = history
        self.layout: ModelLayout = history.layout
        self.t: dict[str, Any] = dict(thresholds or {})
        self._shared: dict[str, Any] = {} if shared is None else shared

    def with_thresholds(self, thresholds: dict[str, Any]) -> RuleContext:
        """The same view with another rule's thresholds (shares the derived arrays)."""
        return RuleContext(self.history, thresholds, self._shared)

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """A value derived once per evaluation and shared by every rule."""
        if key not in self._shared:
            self._shared[key] = compute()
        value: T = self._shared[key]
        return value

    @property
    def records(self) -> list[StepRecord]:
        return self.memo("records", lambda: self.history.recent(LOOKBACK))

    @property
    def first(self) -> list[StepRecord]:
        return self.memo("first", lambda: self.history.first)

    @property
    def healthy_records(self) -> list[StepRecord]:
        """Records before weights or the loss first went non-finite (later stats are noise)."""

        def compute() -> list[StepRecord]:
            records = self.records
            for i, r in enumerate(records):
                if not _healthy(r):
                    return records[:i]
            return list(records)

        return self.memo("healthy", compute)

    def usable(self, warmup: float) -> list[StepRecord]:
        """The healthy records past `warmup` that are not AMP overflow-skipped steps
        (common.usable of healthy_records), once per evaluation."""
        return self.memo(f"usable:{warmup}", lambda: [
            r for r in self.healthy_records
            if r.step >= warmup and not (r.skipped and r.overflow)])

    @property
    def last(self) -> StepRecord | None:
        return self.records[-1] if self.records else None

    @property
    def losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, losses) of the last LOSS_LOOKBACK steps whose loss is known."""
        return self.memo("losses", lambda: (self.history.loss_steps.tail(LOSS_LOOKBACK),
                                            self.history.loss_values.tail(LOSS_LOOKBACK)))

    def layer_names(self, indices: Iterable[int | np.integer[Any]]) -> list[str]:
        """Layer names for layer indices, in model order."""
        return [self.layout.layers[i] or "(root)" for i in sorted(set(int(i) for i in indices))]

    def param_names(self, indices: Iterable[int | np.integer[Any]]) -> list[str]:
        return [self.layout.params[i].name for i in sorted(set(int(i) for i in indices))]
