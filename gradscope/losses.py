"""LossBuffer: the losses given to step(), held on the device until one transfer moves them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import GradscopeError
from .history import History
from .signals.transfer import DeviceBatch

#: Losses of unrecorded steps held at most before they are moved to the host on their own.
MAX_PENDING = 1000


def scalar_loss(loss: Any) -> tuple[torch.Tensor | float | None, bool | None]:
    """(the loss as a detached 0-d tensor or a float, whether it required grad) for step().

    `None` is no loss this step (nothing recorded for it, not a NaN loss); a tensor must hold
    one value; anything else is refused with a sentence saying what to pass.

    Example:
        >>> value, requires_grad = scalar_loss(torch.tensor([2.0], requires_grad=True))
        >>> value.shape, requires_grad
        (torch.Size([]), True)
        >>> scalar_loss(0.5)
        (0.5, None)
    """
    if loss is None:
        return None, None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise GradscopeError(
                f"step() needs the scalar training loss, got a tensor of shape "
                f"{tuple(loss.shape)}; reduce it first (e.g. loss.mean()) or pass the value "
                "you called backward() on."
            )
        value = loss.detach()
        return (value.reshape(()) if value.dim() else value), loss.requires_grad
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss), None
    raise GradscopeError(
        f"step() needs the loss as a tensor or a number, got {type(loss).__name__}; "
        "pass the value you called backward() on."
    )


class LossBuffer:
    """Losses of the steps since the last transfer, moved into a History in step order.

    Tensor losses stay on their device: `put(batch)` queues them on a recorded step's
    DeviceBatch (so they cost no transfer of their own) and `take(host)` stores the values;
    `flush()` does both with a transfer of its own (at close, or when the report is asked for).

    Example:
        >>> from gradscope.layout import ModelLayout
        >>> history = History(ModelLayout.of(torch.nn.Linear(1, 1)))
        >>> losses = LossBuffer(history)
        >>> losses.add(0, torch.tensor(0.5)); losses.add(1, 0.25)
        >>> losses.flush()
        {0: 0.5, 1: 0.25}
        >>> history.losses()[1].tolist()
        [0.5, 0.25]
    """

    def __init__(self, history: History) -> None:
        self.history = history
        self._pending: list[tuple[int, torch.Tensor | float]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, step: int, loss: torch.Tensor | float) -> None:
        self._pending.append((step, loss))

    @property
    def full(self) -> bool:
        """Whether enough losses wait that they should be moved without a recorded step."""
        return len(self._pending) >= MAX_PENDING

    def put(self, batch: DeviceBatch) -> None:
        """Queue the pending tensor losses on `batch` (one stacked tensor per device)."""
        tensors = [value for _, value in self._pending if isinstance(value, torch.Tensor)]
        if not tensors:
            return
        device = tensors[0].device
        if all(t.device == device for t in tensors):  # one device: the usual case
            batch.put("loss", torch.stack(tensors))
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for value in tensors:
            by_device.setdefault(value.device, []).append(value)
        for group in by_device.values():
            batch.put("loss", torch.stack(group))

    def take(self, host: dict[str, np.ndarray]) -> dict[int, float]:
        """Store the pending losses (tensor values from `host`) in the history; {step: loss}."""
        pending = self._pending
        moved = host.get("loss")
        if pending and moved is not None and len(moved) == len(pending) and _one_device(pending):
            # every loss a tensor on one device (put() stacked them as one): in step order
            steps = [step for step, _ in pending]
            stacked: list[float] = moved.tolist()
            pending.clear()
            self.history.add_losses(steps, stacked)
            return dict(zip(steps, stacked))
        tensor_values = iter(host.get("loss", np.array([])).tolist())
        # put() grouped the tensors by device: rebuild the values in step order
        by_device: dict[torch.device, list[int]] = {}
        for pos, (_, value) in enumerate(self._pending):
            if isinstance(value, torch.Tensor):
                by_device.setdefault(value.device, []).append(pos)
        values = [math.nan if isinstance(v, torch.Tensor) else v for _, v in self._pending]
        for positions in by_device.values():
            for pos in positions:
                values[pos] = float(next(tensor_values))
        steps = [step for step, _ in self._pending]
        self._pending.clear()
        if steps:
            self.history.add_losses(steps, values)
        return dict(zip(steps, values))

    def flush(self) -> dict[int, float]:
        """Move every pending loss into the history now (one transfer); {step: loss}."""
        if not self._pending:
            return {}
        batch = DeviceBatch()
        self.put(batch)
        return self.take(batch.fetch())


def _one_device(pending: list[tuple[int, torch.Tensor | float]]) -> bool:
    """Whether every pending loss is a tensor, all on one device."""
    first = pending[0][1]
    if not isinstance(first, torch.Tensor):
        return False
    device = first.device
    return all(isinstance(v, torch.Tensor) and v.device == device for _, v in pending)


def any_nonfinite(losses: dict[int, float]) -> bool:
    """Whether one of `losses` is NaN or infinite.

    Example:
        >>> any_nonfinite({0: 1.0, 1: float("nan")})
        True
    """
    return any(not math.isfinite(v) for v in losses.values())
