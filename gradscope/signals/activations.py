"""Per-module output statistics during training forwards, accumulated on the device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..hooks import Guard, HookSet
from .transfer import DeviceBatch

#: Modules whose output units can die: never positive across a whole batch.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Fraction of a bounded activation's range, at either end, counted as saturated.
SATURATION_MARGIN = 0.01

# Per-module accumulator layout (float64, on the module's device).
SUM, SUMSQ, ZEROS, NONFINITE, SATURATED, IN_NONFINITE = range(6)


@dataclass(frozen=True)
class ActivationStats:
    """Statistics of one module's outputs over the training forwards of one step."""

    mean: float
    std: float
    zero_frac: float
    nonfinite_frac: float
    saturated_frac: float | None
    dead_frac: float | None
    input_nonfinite: int
    calls: int
    order: int
    leaf: bool


def _bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a saturating module, or None for unbounded ones."""
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return (0.0, 1.0)
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return (-1.0, 1.0)
    if isinstance(module, nn.ReLU6):
        return (0.0, 6.0)
    if isinstance(module, nn.Hardtanh):
        return (float(module.min_val), float(module.max_val))
    return None


def _float_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if hasattr(value, "values") and hasattr(value, "keys") and not isinstance(value, dict):
        value = dict(value)  # mapping-like outputs (e.g. transformers' ModelOutput)
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _nonfinite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total = total + (t.numel() - torch.isfinite(t).sum())
    return total


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class ActivationCollector:
    """Forward hooks on every module, attached only for the steps that are recorded.

    Leaf modules get full statistics; containers only non-finite counts (for the NaN origin).
    Nothing keeps a reference to an activation after its hook returns.
    """

    def __init__(self, model: nn.Module, guard: Guard, track_nonfinite: bool = True) -> None:
        self._model = model
        self._guard = guard
        self._track_nonfinite = track_nonfinite
        self._hooks = HookSet()
        self._modules = list(model.named_modules())
        self._by_name = dict(self._modules)
        self._leaf = {name: not any(True for _ in m.children()) for name, m in self._modules}
        self._numel: dict[str, int] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._active: dict[tuple[str, int], torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._order: dict[str, int] = {}

    @property
    def attached(self) -> bool:
        return len(self._hooks) > 0

    def attach(self) -> None:
        if self.attached or self._guard.is_off("activations"):
            return
        for name, module in self._modules:
            if not self._leaf[name] and not self._track_nonfinite:
                continue
            hook = self._guard.wrap("activations", self._make_hook(name))
            self._hooks.add(module.register_forward_hook(hook))

    def detach(self) -> None:
        self._hooks.remove()

    def _make_hook(self, name: str):
        leaf = self._leaf[name]
        bounds = _bounds(self._by_name[name]) if leaf else None
        relu = leaf and isinstance(self._by_name[name], RELU_FAMILY)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not module.training or not torch.is_grad_enabled() or in_backward():
                return
            outputs = _float_leaves(output)
            if not outputs:
                return
            with torch.no_grad():
                self._record(name, leaf, bounds, relu, args, outputs)

        return hook

    def _record(self, name, leaf, bounds, relu, args, outputs) -> None:
        primary = outputs[0]
        device = primary.device
        self._calls[name] = self._calls.get(name, 0) + 1
        self._order.setdefault(name, len(self._order))
        x = primary.detach()
        self._numel[name] = self._numel.get(name, 0) + x.numel()
        if leaf:
            parts = [
                x.sum(dtype=torch.float64),
                torch.linalg.vector_norm(x, dtype=torch.float64).square(),
                (x == 0).sum(),
            ]
        else:
            zero = torch.zeros((), dtype=torch.float64, device=device)
            parts = [zero, zero, zero]
        parts.append(_nonfinite([t.detach() for t in outputs], device))
        if bounds is not None:
            low, high = bounds
            margin = SATURATION_MARGIN * (high - low)
            parts.append(((x <= low + margin) | (x >= high - margin)).sum())
        else:
            parts.append(torch.zeros((), dtype=torch.float64, device=device))
        if self._track_nonfinite:
            parts.append(_nonfinite(_float_leaves(args), device))
        else:
            parts.append(torch.zeros((), dtype=torch.float64, device=device))
        vector = torch.stack([p.to(torch.float64) for p in parts])
        if name in self._acc:
            self._acc[name] += vector
        else:
            self._acc[name] = vector
        if relu and x.dim() >= 1:
            self._record_units(name, x)

    def _record_units(self, name: str, x: torch.Tensor) -> None:
        if x.dim() >= 3:  # conv-style maps: units are channels (dim 1)
            dims = [d for d in range(x.dim()) if d != 1]
            units = x.shape[1]
        else:
            dims = list(range(x.dim() - 1))
            units = x.shape[-1]
        active = (x.amax(dim=dims) > 0) if dims else (x > 0)
        key = (name, units)
        if key in self._active:
            self._active[key] |= active
        else:
            self._active[key] = active

    def put(self, batch: DeviceBatch) -> list[str]:
        """Queue the accumulated statistics; return the module names in queue order."""
        names = list(self._acc)
        for name in names:
            batch.put("act:" + name, self._acc[name])
        for (name, units), active in self._active.items():
            batch.put(f"units:{name}:{units}", (~active).sum().reshape(1))
        return names

    def results(self, host: dict[str, np.ndarray]) -> dict[str, ActivationStats]:
        """Turn fetched accumulators into per-module statistics, and reset for the next step."""
        dead: dict[str, list[int]] = {}
        for name, units in self._active:
            count = int(host[f"units:{name}:{units}"][0])
            total = dead.setdefault(name, [0, 0])
            total[0] += count
            total[1] += units
        stats: dict[str, ActivationStats] = {}
        for name in self._acc:
            acc = host["act:" + name]
            n = float(max(self._numel.get(name, 0), 1))
            mean = acc[SUM] / n
            var = max(acc[SUMSQ] / n - mean * mean, 0.0)
            leaf = self._leaf[name]
            bounds = _bounds(self._by_name[name]) is not None
            stats[name] = ActivationStats(
                mean=float(mean) if leaf else float("nan"),
                std=float(np.sqrt(var)) if leaf else float("nan"),
                zero_frac=float(acc[ZEROS] / n) if leaf else float("nan"),
                nonfinite_frac=float(acc[NONFINITE] / n),
                saturated_frac=float(acc[SATURATED] / n) if bounds else None,
                dead_frac=(dead[name][0] / dead[name][1]) if name in dead else None,
                input_nonfinite=int(acc[IN_NONFINITE]),
                calls=self._calls.get(name, 0),
                order=self._order.get(name, -1),
                leaf=leaf,
            )
        self.reset()
        return stats

    def reset(self) -> None:
        self._acc.clear()
        self._numel.clear()
        self._active.clear()
        self._calls.clear()
        self._order.clear()
