"""Whether the model's output rows are probabilities, and whether the loss treats them as logits.

A model that ends in a softmax gives rows in [0, 1] that sum to 1. Fed to a loss that applies
its own softmax (`cross_entropy`), the predictions can never become confident: the loss keeps
a floor of ln(1 + (C - 1) / e) and learning crawls. Such a loss does not change when a
constant is added to every entry of a row, so the gradient it sends back sums to zero along
each row; a loss written for probabilities (the negative log of the right entry) does not.

On recorded steps, for the first training forward of the step: the output's min and max, the
largest |row sum - 1|, and from the gradient reaching the output, the largest |row sum| over
the largest |entry|. Eight numbers (extremes whose largest magnitudes are taken on the
host), queued for the step's single transfer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..guard import Guard
from ..records import OutputStats
from .activations import _float_leaves
from .transfer import DeviceBatch


def _largest_abs(low: float, high: float) -> float:
    """max(|low|, |high|), NaN when either is NaN (as a reduction over the values would be).

    Example:
        >>> _largest_abs(-3.0, 2.0), _largest_abs(1.0, math.nan)
        (3.0, nan)
    """
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return max(abs(low), abs(high))


def output_logits(output: Any) -> torch.Tensor | None:
    """The tensor a loss is computed from: `logits` of a mapping that has them
    (transformers), else the first floating-point tensor of the output.

    Example:
        >>> output_logits({"logits": torch.zeros(2, 3), "loss": torch.zeros(())}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, Mapping) and "logits" in output:
        output = output["logits"]
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() and output.numel() else None
    leaves = [t for t in _float_leaves(output) if t.numel()]
    return leaves[0] if leaves else None


class OutputCollector:
    """The OutputStats of a recorded step (see the module docstring).

    Example:
        >>> collector = OutputCollector()
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> probs = logits.softmax(-1)
        >>> collector.observe(probs)
        >>> torch.nn.functional.cross_entropy(probs, torch.tensor([0, 1, 2, 0])).backward()
        >>> batch = DeviceBatch(); collector.put(batch)
        True
        >>> stats = collector.result(batch.fetch())
        >>> stats.probability_rows, stats.shift_invariant_loss
        (True, True)
    """

    def __init__(self, guard: Guard | None = None) -> None:
        self._guard = guard
        self._values: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None
        self._meta: tuple[int, bool] | None = None  # classes, half precision
        self._hook: Any = None
        # autograd calls the hook: guarded, so an error here never stops a backward
        self._grad_hook = guard.wrap("output", self._on_grad) if guard else self._on_grad

    def observe(self, output: Any) -> None:
        """Measure the first training output of the step (later ones are left alone)."""
        if self._meta is not None:
            return
        leaf = output_logits(output)
        if leaf is None or leaf.dim() < 2 or leaf.shape[-1] < 2 or not leaf.requires_grad:
            return
        values = leaf.detach()
        low, high = torch.aminmax(values)
        # the extremes of the row sums: the largest |row sum - 1| is at one of them
        sums = torch.aminmax(values.sum(-1, dtype=torch.float32))
        if low.dtype != torch.float32:  # float32 like the row sums: one dtype to stack
            low, high = low.float(), high.float()
        self._values = torch.stack([low, high, sums.min, sums.max])
        self._meta = (int(leaf.shape[-1]), leaf.element_size() < 4)
        self._hook = leaf.register_hook(self._grad_hook)

    def _on_grad(self, grad: torch.Tensor) -> None:
        if self._grad is not None or self._meta is None:
            return
        g = grad.detach()
        # the extremes of the row sums and of the entries (one pass each, no |g| copy of
        # a large output); the largest |.| of each is taken on the host
        sums = torch.aminmax(g.sum(-1, dtype=torch.float32))
        low, high = torch.aminmax(g)
        if low.dtype != torch.float32:  # float32 like the row sums: one dtype to stack
            low, high = low.float(), high.float()
        self._grad = torch.stack([sums.min, sums.max, low, high])

    def put(self, batch: DeviceBatch) -> bool:
        if self._values is None:
            return False
        batch.put("output", self._values)
        if self._grad is not None:
            batch.put("output_grad", self._grad)
        return True

    def result(self, host: dict[str, np.ndarray]) -> OutputStats | None:
        meta, values, grad = self._meta, host.get("output"), host.get("output_grad")
        self.reset()
        if meta is None or values is None:
            return None
        classes, half = meta
        grad_row = math.nan
        if grad is not None:
            sum_low, sum_high, low, high = grad.tolist()
            entry = _largest_abs(low, high)
            if entry > 0:
                grad_row = _largest_abs(sum_low, sum_high) / entry
        low, high, sum_low, sum_high = values.tolist()
        # |row sum - 1| in float32, as the row sums are (exact there: they are float32)
        one = np.float32(1.0)
        row_error = _largest_abs(float(np.float32(sum_low) - one),
                                 float(np.float32(sum_high) - one))
        return OutputStats(classes=classes, min=low, max=high, row_sum_error=row_error,
                           grad_row_sum=grad_row, half_precision=half)

    def reset(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._values = self._grad = self._meta = self._hook = None
