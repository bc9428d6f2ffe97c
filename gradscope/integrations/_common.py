"""Pieces shared by the training-framework callbacks: the step loss, headline figures, safety."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from ..diagnosis import Diagnosis
    from ..history import StepRecord

F = TypeVar("F", bound=Callable[..., Any])


class StepLoss:
    """Collects the loss of each micro-batch of one optimizer step, on the device.

    `value("sum")` suits losses already divided by the number of micro-batches (Lightning's
    accumulation); `value("mean")` suits per-micro-batch means. The result is detached; it
    keeps only whether the original losses required grad, which gradscope records.

    Example:
        >>> acc = StepLoss(); acc.add(torch.tensor(1.0)); acc.add(torch.tensor(3.0))
        >>> float(acc.value("mean"))
        2.0
    """

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._requires_grad = False

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
            self._requires_grad = self._requires_grad or loss.requires_grad
            self._parts.append(loss.detach().reshape(()).float())

    def value(self, how: str = "sum") -> torch.Tensor | None:
        """The step's loss, or None when no micro-batch loss was seen; then clears."""
        if not self._parts:
            return None
        with torch.no_grad():
            stacked = torch.stack(self._parts)
            total = stacked.sum() if how == "sum" else stacked.mean()
        # a fresh leaf that says, as the real loss did, whether backward could run from it
        total = total.detach().requires_grad_(self._requires_grad)
        self.clear()
        return total

    def clear(self) -> None:
        self._parts = []
        self._requires_grad = False


def headline(record: StepRecord, diagnoses: Sequence[Diagnosis]) -> dict[str, float]:
    """A few figures worth logging per recorded step: total gradient norm, largest update
    ratio, and the number of warnings (and errors) among `diagnoses` (pass the diagnoses as
    of the rules' last run, `scope.diagnoser.diagnoses()`: this runs no rule).

    Example:
        >>> import gradscope
        >>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
        >>> scope = gradscope.watch(model, opt, every=1)
        >>> model(torch.ones(4, 2)).sum().backward(); opt.step(); scope.step(1.0)
        >>> figures = headline(scope.history.last, scope.diagnoser.diagnoses())
        >>> figures["gradscope/grad_norm_total"] > 0, figures["gradscope/warnings"]
        (True, 0.0)
    """
    total = record.total_grad_norm()
    ratios = record.update_ratio[np.isfinite(record.update_ratio)]
    return {
        "gradscope/grad_norm_total": total,
        "gradscope/update_ratio_max": float(ratios.max()) if ratios.size else math.nan,
        "gradscope/warnings": float(sum(d.severity == "warning" for d in diagnoses)),
        "gradscope/errors": float(sum(d.severity == "error" for d in diagnoses)),
    }


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside a framework wrapper (Lightning, accelerate), or None.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), 0.1)
        >>> torch_optimizer(opt) is opt
        True
    """
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def guarded(piece: str) -> Callable[[F], F]:
    """Decorate a callback method so an exception inside it warns once and never propagates."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._once.call(piece, fn, self, *args, **kwargs)

        return method  # type: ignore[return-value]

    return wrap
