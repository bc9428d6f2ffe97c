"""Per-module output statistics during training forwards, accumulated on the device."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..hooks import Guard, HookSet
from .reduce import CPU_SHARED_CAST, moments, nonfinite_count
from .transfer import DeviceBatch

#: Modules whose output units can die: never positive across a whole batch.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Values a unit must see in a step before "never positive" says it is dead: with a batch of
#: one or two examples, ordinary ReLU sparsity (about half the units off) looks like death.
MIN_UNIT_ROWS = 16
#: Fraction of a bounded activation's range, at either end, counted as saturated.
SATURATION_MARGIN = 0.01
#: Modules whose presence means 3-d activations are (batch, channels, length) maps.
CONV1D_FAMILY: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.ConvTranspose1d)

# Per-module accumulator layout (float64 on the host, summed over the calls of a step).
SUM, SUMSQ, ZEROS, NONFINITE, SATURATED, IN_NONFINITE, DEAD = range(7)
NORM = DEAD + 1  # a float part holding an L2 norm: squared on the host, added to SUMSQ


@dataclass(frozen=True, slots=True)
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
    if type(value) is tuple and all(isinstance(t, torch.Tensor) for t in value):
        return [t for t in value if t.is_floating_point()]  # the common case, without pytree
    if hasattr(value, "values") and hasattr(value, "keys") and not isinstance(value, dict):
        value = dict(value)  # mapping-like outputs (e.g. transformers' ModelOutput)
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compiling() -> bool:
    """True while torch.compile traces the code: gradscope's forward hooks then do nothing.

    Compiled code does not run Python hooks on each call, and tracing them would split the
    graph (or fail under fullgraph=True); the Scope warns when a recorded step saw no forward.
    """
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def _nonzero_count(x: torch.Tensor) -> torch.Tensor:
    """count_nonzero(x). Its CPU kernel branches per element, up to 5x slower when zeros are
    scattered at random (ReLU, dropout); counting a bool() cast (NaN -> True, -0.0 -> False,
    the same test) does not branch."""
    if x.device.type == "cpu" and x.numel() >= CPU_SHARED_CAST:
        return torch.count_nonzero(x.bool())
    return torch.count_nonzero(x)


def _saturated(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """How many elements lie within SATURATION_MARGIN of either end of [low, high]."""
    margin = SATURATION_MARGIN * (high - low)
    if low == -high:  # symmetric range: |x| >= high - margin is the same test, one kernel less
        return torch.count_nonzero(x.abs() >= high - margin)
    return torch.count_nonzero((x <= low + margin) | (x >= high - margin))


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class _Parts:
    """The scalar statistics of one device, with where each one goes on the host.

    Float parts are added as they are; a count part adds `offset + sign * value`. Slots are
    flat lists of ints (row, column[, sign, offset] per part): no object per part.
    """

    def __init__(self) -> None:
        self.floats: list[torch.Tensor] = []
        self.float_slots: list[int] = []
        self.counts: list[torch.Tensor] = []
        self.count_slots: list[int] = []


class ActivationCollector:
    """Forward hooks on every module, attached only for the steps that are recorded.

    Leaf modules get full statistics; containers only non-finite counts (for the NaN origin).
    Nothing keeps a reference to an activation after its hook returns. Only training forwards
    count (train mode, grad enabled). A forward re-run during backward (activation
    checkpointing) counts only for a module that had no such forward this step: the
    reentrant variant runs the first forward under no_grad.

    Each statistic is a 0-d tensor; `put()` stacks them once per device and the host adds up
    the calls of each module, so a hook launches only the reductions themselves.
    """

    def __init__(self, model: nn.Module, guard: Guard, track_nonfinite: bool = True) -> None:
        self._model = model
        self._guard = guard
        self._track_nonfinite = track_nonfinite
        self._hooks = HookSet()
        self.hook_calls = 0
        self._wrapped: dict[str, Any] = {}
        self._modules = list(model.named_modules())
        self._by_name = dict(self._modules)
        self._leaf = {name: not any(True for _ in m.children()) for name, m in self._modules}
        self._bounded = {name: _bounds(m) is not None for name, m in self._modules}
        self._numel: dict[str, int] = {}
        self._out_numel: dict[str, int] = {}
        self._recomputed: set[str] = set()
        self._channels_first_3d = any(isinstance(m, CONV1D_FAMILY) for m in model.modules())
        self._parts: dict[torch.device, _Parts] = {}
        self._fields: list[tuple[torch.device, str, str]] = []
        # non-finite counts of outputs already measured this step, reused when the same
        # tensor (same version: not modified in place since) is the next module's input
        self._counted: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._active: dict[tuple[str, int], torch.Tensor] = {}
        self._unit_rows: dict[str, int] = {}  # values seen per unit (batch rows x positions)
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
            hook = self._wrapped.get(name)
            if hook is None:  # built once, re-registered on each recorded step
                hook = self._wrapped[name] = self._guard.wrap("activations",
                                                              self._make_hook(name))
            self._hooks.add(module.register_forward_hook(hook))

    def detach(self) -> None:
        self._hooks.remove()
        self._counted.clear()

    def _make_hook(self, name: str):
        leaf = self._leaf[name]
        bounds = _bounds(self._by_name[name]) if leaf else None
        relu = leaf and isinstance(self._by_name[name], RELU_FAMILY)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if compiling():
                return
            # a leaf module's forward reached the hooks (inside compiled code none does)
            self.hook_calls += leaf
            if not module.training or not torch.is_grad_enabled():
                return
            if in_backward():  # checkpoint recomputation
                if name in self._calls and name not in self._recomputed:
                    return
                self._recomputed.add(name)
            outputs = _float_leaves(output)
            if not outputs:
                return
            grad_was = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)  # torch.no_grad(), without its Python overhead
            try:
                self._record(name, leaf, bounds, relu, args, outputs)
            finally:
                torch._C._set_grad_enabled(grad_was)

        return hook

    def _nonfinite_count(self, t: torch.Tensor) -> torch.Tensor:
        """Number of NaN/Inf elements of `t` (0-d), reused for a tensor already counted."""
        seen = self._counted.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            return seen[2]
        count = nonfinite_count(t.detach())
        self._counted[id(t)] = (weakref.ref(t), t._version, count)
        return count

    def _record(self, name, leaf, bounds, relu, args, outputs) -> None:
        primary = outputs[0]
        self._calls[name] = self._calls.get(name, 0) + 1
        row = self._order.setdefault(name, len(self._order))  # first-call order = its row
        x = primary.detach()
        numel = x.numel()
        self._numel[name] = self._numel.get(name, 0) + numel
        out_numel = numel if len(outputs) == 1 else sum(t.numel() for t in outputs)
        self._out_numel[name] = self._out_numel.get(name, 0) + out_numel
        parts = self._parts.get(x.device)
        if parts is None:
            parts = self._parts[x.device] = _Parts()
        counts, count_slots = parts.counts, parts.count_slots
        if leaf:
            total, norm, squared, nonfinite = moments(x)
            if nonfinite is not None:  # counted on the way: keep it for the loop below
                self._counted[id(primary)] = (weakref.ref(primary), primary._version, nonfinite)
            parts.floats += (total, norm)
            parts.float_slots += (row, SUM, row, SUMSQ if squared else NORM)
            counts.append(_nonzero_count(x))
            count_slots += (row, ZEROS, -1, numel)
            if bounds is not None:
                counts.append(_saturated(x, *bounds))
                count_slots += (row, SATURATED, 1, 0)
        for t in outputs:
            counts.append(self._nonfinite_count(t))
            count_slots += (row, NONFINITE, 1, 0)
        if self._track_nonfinite:
            for t in _float_leaves(args):
                counts.append(self._nonfinite_count(t))
                count_slots += (row, IN_NONFINITE, 1, 0)
        if relu and x.dim() >= 1:
            self._record_units(name, x)

    def _record_units(self, name: str, x: torch.Tensor) -> None:
        if x.dim() >= 4 or (x.dim() == 3 and self._channels_first_3d):
            # conv maps (batch, channels, ...): units are channels (dim 1)
            dims = [d for d in range(x.dim()) if d != 1]
            units = x.shape[1]
        else:
            dims = list(range(x.dim() - 1))
            units = x.shape[-1]
        active = (x.amax(dim=dims) > 0) if dims else (x > 0)
        self._unit_rows[name] = self._unit_rows.get(name, 0) + x.numel() // max(units, 1)
        key = (name, units)
        if key in self._active:
            self._active[key] |= active
        else:
            self._active[key] = active

    def put(self, batch: DeviceBatch) -> list[str]:
        """Queue the accumulated statistics; return the names of the modules measured."""
        for (name, units), active in self._active.items():
            parts = self._parts.setdefault(active.device, _Parts())
            parts.counts.append(torch.count_nonzero(active))
            parts.count_slots += (self._order[name], DEAD, -1, units)
        self._fields = []
        for index, (device, parts) in enumerate(self._parts.items()):
            floats, counts = f"act:{index}:floats", f"act:{index}:counts"
            if parts.floats:
                batch.put(floats, torch.stack(parts.floats))
            if parts.counts:
                batch.put(counts, torch.stack(parts.counts))
            self._fields.append((device, floats, counts))
        return list(self._order)

    def _accumulate(self, host: dict[str, np.ndarray]) -> np.ndarray:
        acc = np.zeros((len(self._order), DEAD + 1))
        for device, floats, counts in self._fields:
            parts = self._parts[device]
            if parts.floats:
                rows, cols = np.asarray(parts.float_slots, dtype=np.int64).reshape(-1, 2).T
                values = np.array(host[floats], dtype=np.float64)
                norms = cols == NORM
                values[norms] = values[norms] ** 2  # the same float64 square as on the device
                cols[norms] = SUMSQ
                np.add.at(acc, (rows, cols), values)
            if parts.counts:
                slots = np.asarray(parts.count_slots, dtype=np.int64).reshape(-1, 4)
                rows, cols, signs, offsets = slots.T
                np.add.at(acc, (rows, cols), offsets + signs * host[counts])
        return acc

    def results(self, host: dict[str, np.ndarray]) -> dict[str, ActivationStats]:
        """Turn fetched statistics into per-module statistics, and reset for the next step."""
        acc = self._accumulate(host)
        names = list(self._order)
        units: dict[str, int] = {}
        for name, count in self._active:
            units[name] = units.get(name, 0) + count
        n = np.array([max(self._numel.get(name, 0), 1) for name in names], dtype=np.float64)
        n_out = np.array([max(self._out_numel.get(name, 0), 1) for name in names],
                         dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf on NaN/Inf outputs
            mean = acc[:, SUM] / n
            var = acc[:, SUMSQ] / n - mean * mean
            var = np.where(var < 0.0, 0.0, var)  # clamp at 0; NaN stays NaN
            std = np.sqrt(var)
        zero_frac = (acc[:, ZEROS] / n).tolist()
        nonfinite_frac = (acc[:, NONFINITE] / n_out).tolist()
        saturated_frac = (acc[:, SATURATED] / n).tolist()
        dead, inputs = acc[:, DEAD].tolist(), acc[:, IN_NONFINITE].tolist()
        mean, std = mean.tolist(), std.tolist()
        nan = float("nan")
        stats: dict[str, ActivationStats] = {}
        for row, name in enumerate(names):
            leaf = self._leaf[name]
            stats[name] = ActivationStats(
                mean=mean[row] if leaf else nan,
                std=std[row] if leaf else nan,
                zero_frac=zero_frac[row] if leaf else nan,
                nonfinite_frac=nonfinite_frac[row],
                saturated_frac=saturated_frac[row] if self._bounded[name] else None,
                dead_frac=(dead[row] / units[name])
                if name in units and self._unit_rows.get(name, 0) >= MIN_UNIT_ROWS else None,
                input_nonfinite=int(inputs[row]),
                calls=self._calls.get(name, 0),
                order=row,
                leaf=leaf,
            )
        self.reset()
        return stats

    def reset(self) -> None:
        self._parts.clear()
        self._fields = []
        self._counted.clear()
        self._numel.clear()
        self._out_numel.clear()
        self._recomputed.clear()
        self._active.clear()
        self._unit_rows.clear()
        self._calls.clear()
        self._order.clear()
