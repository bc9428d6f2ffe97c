"""Per-module output statistics during training forwards, accumulated on the device."""

from __future__ import annotations

import weakref
from enum import IntEnum
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from ..guard import Guard
from ..hooks import HookSet
from ..records import FLOAT_FIELDS, ActivationStats, ActivationTable, input_owner, input_row
from .reduce import nonfinite_count
from .staging import (
    SAMPLE,
    SATURATION_MARGIN,
    RowStage,
    RowStat,
)
from .transfer import DeviceBatch

#: Modules whose output units can die: never positive across a whole batch.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Values a unit must see in a step before "never positive" says it is dead: with a batch of
#: one or two examples, ordinary ReLU sparsity (about half the units off) looks like death.
MIN_UNIT_ROWS = 16
#: How many of the latest small outputs are remembered for reuse as inputs (see _remember).
RECENT = 4
#: Autograd nodes of functional activations whose output can be judged like a module's:
#: the ReLU family for dead units, sigmoid/tanh (known bounds) for saturation.
FUNCTIONAL_ACTIVATIONS: dict[str, tuple[bool, tuple[float, float] | None]] = {
    "ReluBackward0": (True, None),
    "ReluBackward1": (True, None),
    "SigmoidBackward0": (False, (0.0, 1.0)),
    "SigmoidBackward1": (False, (0.0, 1.0)),
    "TanhBackward0": (False, (-1.0, 1.0)),
    "TanhBackward1": (False, (-1.0, 1.0)),
}
#: Whether a leaf module's common call takes the hook's inlined path (False: always the
#: general `_record`, which gives the same statistics; the tests compare the two).
INLINE_LEAF_CALLS = True
#: Modules whose presence means 3-d activations are (batch, channels, length) maps.
CONV1D_FAMILY: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.ConvTranspose1d)


_REGISTER = nn.Module.register_forward_hook
_REGISTER_PRE = nn.Module.register_forward_pre_hook


class ModuleAcc(IntEnum):
    """Per-module accumulator columns (float64 on the host, summed over the calls of a step)."""

    SUM = 0
    SUMSQ = 1
    ZEROS = 2
    NONFINITE = 3
    SATURATED = 4
    IN_NONFINITE = 5
    DEAD = 6


#: Autograd nodes between a ReLU and the next module that keep its dead units dead and make
#: no live unit look dead (max-pooling keeps each channel's maximum): a ReLU seen through
#: them is still judged for dead units.
RELU_PRESERVING = frozenset({"MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0"})


def _functional_activation(t: torch.Tensor) -> tuple[bool, tuple[float, float] | None] | None:
    """(is ReLU-like, bounds) when `t` is the output of a functional ReLU/sigmoid/tanh,
    or of a ReLU followed by max-pooling."""
    node = t.grad_fn
    through = False
    while node is not None and type(node).__name__ in RELU_PRESERVING:
        node, through = node.next_functions[0][0], True
    if node is None:
        return None
    kind = FUNCTIONAL_ACTIVATIONS.get(type(node).__name__)
    return kind if kind is None or not through or kind[0] else None


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
    if type(value) is tuple and len(value) == 1 and isinstance(value[0], torch.Tensor):
        return [value[0]] if value[0].is_floating_point() else []  # a module's one input
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
    return bool(_IS_COMPILING()) if _IS_COMPILING is not None else False


_IS_COMPILING = getattr(torch.compiler, "is_compiling", None)


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class _Counts:
    """NaN/Inf and dead-unit counts of one device, as 0-d tensors, with where each one goes:
    `offset + sign * value` is added at (row, column). Slots are flat int lists."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.slots: list[int] = []


class _Plan(NamedTuple):
    """Index arrays of one step layout (see ActivationCollector._accumulation_plan):
    (field, offset, sign) per device count field, (positions, sizes) of the staged moments,
    positions of the staged NaN/Inf counts, the flat (row, column) cell of every value in
    the order they are concatenated, and the accumulator's size."""

    counts: list[tuple[str, np.ndarray, np.ndarray]]
    moments: tuple[np.ndarray, np.ndarray] | None
    staged: np.ndarray | None
    flat: np.ndarray | None
    size: int


class _TablePlan(NamedTuple):
    """Per-module arrays of one step layout (see ActivationCollector._table_plan): value
    counts (at least 1), output element counts, rows of containers (no mean, std or zero
    fraction), unit counts, rows without a dead fraction (None: no row has one), and the
    table's ints (calls and order filled in), flags and each name's row."""

    n: np.ndarray
    n_out: np.ndarray
    containers: np.ndarray
    unit_count: np.ndarray
    no_dead: np.ndarray | None
    ints: np.ndarray
    flags: np.ndarray
    positions: dict[str, int]


class ActivationCollector:
    """Forward hooks on every module, attached only for the steps that are recorded.

    Leaf modules get full statistics; containers only non-finite counts (for the NaN origin).
    Nothing keeps a reference to an activation after its hook returns. Only training forwards
    count (train mode, grad enabled). A forward re-run during backward (activation
    checkpointing) counts only for a module that had no such forward this step: the
    reentrant variant runs the first forward under no_grad.

    A hook copies the output of a leaf module into a staging row (`RowStage`): whole when it
    has up to SAMPLE elements, else SAMPLE elements in short runs spread over it. Mean, std,
    zero and saturated fractions come from those rows, reduced together once per step, so a
    large output's are estimates from SAMPLE values. NaN/Inf counts and dead units are
    exact: a large output is also checked whole (one pass), ReLU outputs by unit maxima.
    The host adds up the calls of each module.
    """

    def __init__(self, model: nn.Module, guard: Guard, track_nonfinite: bool = True) -> None:
        self._model = model
        self._guard = guard
        self._track_nonfinite = track_nonfinite
        self._hooks = HookSet()  # hooks registered through a module's own methods
        self._entries: list[Any] = []  # hook dict, key, hook dict, key, ... (see attach)
        self._hook_plan: list[tuple[nn.Module, Any, bool]] | None = None
        self.hook_calls = 0
        self._wrapped: dict[str, Any] = {}
        self._modules = list(model.named_modules())
        self._by_name = dict(self._modules)
        self._leaf = {name: not any(True for _ in m.children()) for name, m in self._modules}
        self._bounded = {name: _bounds(m) is not None for name, m in self._modules}
        # modules with parameters of their own (Linear, Conv, ...) and dropout modules (the
        # PyTorch examples' `self.dropout(F.relu(self.fc1(x)))`): their input is measured
        # when it comes from a functional activation no module hook saw
        self._owners = [name for name, m in self._modules
                        if isinstance(m, nn.modules.dropout._DropoutNd)
                        or any(True for _ in m.parameters(recurse=False))]
        for name in self._owners:
            self._leaf[input_row(name)] = True
            self._bounded[input_row(name)] = False
        self._activation_modules = {name for name, m in self._modules
                                    if self._leaf[name] and (isinstance(m, RELU_FAMILY)
                                                             or _bounds(m) is not None)}
        self._activation_outputs: list[torch.Tensor] = []  # latest outputs of those modules
        self._numel: dict[str, int] = {}
        self._out_numel: dict[str, int] = {}
        self._recomputed: set[str] = set()
        self._channels_first_3d = any(isinstance(m, CONV1D_FAMILY) for m in model.modules())
        self._stage = RowStage()
        self._index_cache: dict[tuple[str, ...], dict[str, int]] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._table_plans: dict[tuple, _TablePlan] = {}
        self._bounded_changes = 0  # times a row's bounded flag turned True
        # flat int lists (few Python objects): (row, staged handle, values) per staged output,
        # (row, column, staged handle) per NaN/Inf count read from a staged row
        self._moments: list[int] = []
        self._staged_counts: list[int] = []
        self._counts: dict[torch.device, _Counts] = {}
        self._fields: list[tuple[torch.device, str]] = []
        # non-finite counts of outputs already measured this step, reused when the same
        # tensor (same version: not modified in place since) is the next module's input
        # (three dicts by id, so that an entry is one weakref and two ints, not a tuple too)
        self._counted: dict[int, weakref.ref] = {}
        self._counted_version: dict[int, int] = {}
        self._counted_as: dict[int, Any] = {}
        self._recent: list[tuple[torch.Tensor, int, int]] = []
        self._active: dict[tuple[str, int], torch.Tensor] = {}
        self._unit_rows: dict[str, int] = {}  # values seen per unit (batch rows x positions)
        self._calls: dict[str, int] = {}
        self._order: dict[str, int] = {}

    @property
    def attached(self) -> bool:
        return len(self._hooks) > 0 or len(self._entries) > 0

    def _plan(self) -> list[tuple[nn.Module, Any, bool]]:
        """(module, guarded hook, is a pre-hook) in registration order; hooks built once."""
        if self._hook_plan is None:
            plan = []
            for name, module in self._modules:
                if not self._leaf[name] and not self._track_nonfinite:
                    continue
                hook = self._wrapped.get(name)
                if hook is None:
                    hook = self._wrapped[name] = self._make_hook(name)  # guarded itself
                plan.append((module, hook, False))
            for name in self._owners:
                row = input_row(name)
                hook = self._wrapped.get(row)
                if hook is None:
                    hook = self._wrapped[row] = self._make_input_hook(row)  # guarded itself
                plan.append((self._by_name[name], hook, True))
            self._hook_plan = plan
        return self._hook_plan

    def attach(self) -> None:
        """Register the hooks (on each recorded step: a registered hook costs every forward).

        A plain module gets them as `register_forward_hook` / `register_forward_pre_hook`
        would add them (an entry under a fresh handle id at the end of its hook dict, which
        is all those do) without a handle object per hook; a module that overrides those
        methods gets them through its own."""
        if self.attached or self._guard.is_off("activations"):
            return
        entries = self._entries
        for module, hook, pre in self._plan():
            method = type(module).register_forward_pre_hook if pre else type(
                module).register_forward_hook
            if method is not (_REGISTER_PRE if pre else _REGISTER):
                self._hooks.add(method(module, hook))
                continue
            hooks = module._forward_pre_hooks if pre else module._forward_hooks
            key = RemovableHandle.next_id
            RemovableHandle.next_id = key + 1
            hooks[key] = hook
            entries += (hooks, key)

    def detach(self) -> None:
        """Remove the hooks and drop whatever an unfinished step staged."""
        entries, self._entries = self._entries, []
        for i in range(0, len(entries), 2):
            entries[i].pop(entries[i + 1], None)
        self._hooks.remove()
        self.reset()

    def _make_hook(self, name: str):
        leaf = self._leaf[name]
        bounds = _bounds(self._by_name[name]) if leaf else None
        relu = leaf and isinstance(self._by_name[name], RELU_FAMILY)
        # everything a call reads, bound once: a hook runs for every module of every
        # recorded forward, so attribute and global lookups are a good part of its cost
        # (the containers below are cleared in place by reset(), never replaced)
        is_compiling = _IS_COMPILING
        grad_enabled = torch.is_grad_enabled
        set_grad_enabled = torch._C._set_grad_enabled
        graph_task = torch._C._current_graph_task_id
        tensor_type = torch.Tensor
        strided = torch.strided
        record = self._record
        nonfinite_count = self._nonfinite_count
        stage_add = self._stage.add
        calls, order, recomputed = self._calls, self._order, self._recomputed
        numels, out_numels = self._numel, self._out_numel
        add_moments, add_staged_counts = self._moments.extend, self._staged_counts.extend
        recent, activation_outputs = self._recent, self._activation_outputs
        track = self._track_nonfinite
        activation = name in self._activation_modules
        # a leaf that is no ReLU (whose units are watched): its common call, one small
        # plain tensor in and one out, takes the inlined path below (what _record does)
        simple = leaf and not relu and INLINE_LEAF_CALLS
        in_column, out_column = ModuleAcc.IN_NONFINITE, ModuleAcc.NONFINITE
        # guarded as Guard.wrap guards a hook, without its extra call per module
        off, fail = self._guard.switched_off, self._guard.fail

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if "activations" in off:  # the guard's check, inlined (see Guard.wrap)
                return
            try:
                if is_compiling is not None and is_compiling():
                    return
                # a leaf module's forward reached the hooks (inside compiled code none does)
                self.hook_calls += leaf
                if not module.training or not grad_enabled():
                    return
                if graph_task() != -1:  # in backward: checkpoint recomputation
                    if name in calls and name not in recomputed:
                        return
                    recomputed.add(name)
                if (simple and type(output) is tensor_type and output.layout is strided
                        and output.is_floating_point() and output.numel() <= SAMPLE
                        and type(args) is tuple and len(args) == 1
                        and isinstance(args[0], tensor_type)):
                    x: torch.Tensor | None = args[0]
                    if not track or not args[0].is_floating_point():
                        x = None
                    set_grad_enabled(False)  # torch.no_grad() without its Python overhead
                    try:
                        if activation:
                            activation_outputs.append(output)
                            if len(activation_outputs) > RECENT:
                                del activation_outputs[0]
                        calls[name] = calls.get(name, 0) + 1
                        row = order.setdefault(name, len(order))  # first-call order = its row
                        numel = output.numel()
                        out_numels[name] = out_numels.get(name, 0) + numel
                        if x is not None and x is not output:  # the input first, unless in place
                            for tensor, version, count in recent:
                                if tensor is x and version == x._version:
                                    add_staged_counts((row, in_column, count))
                                    break
                            else:
                                nonfinite_count(x, row, in_column)
                        handle = stage_add(output, bounds)  # the whole output
                        numels[name] = numels.get(name, 0) + numel
                        add_moments((row, handle, numel))
                        recent.append((output, output._version, handle))  # as _remember does
                        if len(recent) > RECENT:
                            del recent[0]
                        add_staged_counts((row, out_column, handle))
                        if x is output:
                            nonfinite_count(x, row, in_column)
                    finally:
                        set_grad_enabled(True)
                    return
                outputs = _float_leaves(output)
                if not outputs:
                    return
                set_grad_enabled(False)
                try:
                    record(name, leaf, bounds, relu, args, outputs)
                finally:
                    set_grad_enabled(True)
            except Exception as err:  # gradscope must never stop training
                fail("activations", err)

        return hook

    def _make_input_hook(self, row: str):
        """A forward pre-hook measuring a module's input when a functional activation made it."""

        is_compiling = _IS_COMPILING
        grad_enabled = torch.is_grad_enabled
        tensor_type = torch.Tensor
        activation_outputs = self._activation_outputs  # cleared in place by reset()
        off, fail = self._guard.switched_off, self._guard.fail  # guarded as in _make_hook

        def hook(module: nn.Module, args: tuple) -> None:
            if "activations" in off:  # the guard's check, inlined (see Guard.wrap)
                return
            try:
                if ((is_compiling is not None and is_compiling()) or not module.training
                        or not grad_enabled()):
                    return
                if not args or not isinstance(args[0], tensor_type):
                    return
                x = args[0]
                for t in activation_outputs:
                    if t is x:  # an activation module's output, or another module's input, measured
                        return
                kind = _functional_activation(x)
                if kind is None or not x.is_floating_point() or x.layout is not torch.strided:
                    return
                self._activation_outputs.append(x)  # a second consumer (fc21, fc22) skips it
                if len(self._activation_outputs) > RECENT:
                    del self._activation_outputs[0]
                if in_backward():  # checkpoint recomputation
                    if row in self._calls and row not in self._recomputed:
                        return
                    self._recomputed.add(row)
                grad_was = torch.is_grad_enabled()
                torch._C._set_grad_enabled(False)
                try:
                    self._record_input(row, kind[0], kind[1], x.detach())
                finally:
                    torch._C._set_grad_enabled(grad_was)
            except Exception as err:  # gradscope must never stop training
                fail("activations", err)

        return hook

    def _record_input(self, row_name: str, relu: bool, bounds: tuple[float, float] | None,
                      x: torch.Tensor) -> None:
        """Mean, std, zero and saturated fractions and dead units of a functional
        activation's output, read where the next parameterised module receives it."""
        self._calls[row_name] = self._calls.get(row_name, 0) + 1
        row = self._order.setdefault(row_name, len(self._order))
        if bounds is not None and not self._bounded[row_name]:
            self._bounded[row_name] = True
            self._bounded_changes += 1
        if relu and x.dim() >= 1:
            self._record_units(row_name, x)
        handle = self._stage.add(x, bounds)
        size = min(x.numel(), SAMPLE)
        self._numel[row_name] = self._numel.get(row_name, 0) + size
        self._moments += (row, handle, size)

    def _remember(self, t: torch.Tensor, count: Any) -> None:
        """Keep the NaN/Inf count (0-d tensor or staged row) of `t` as it is now.

        Small tensors (staged rows) are remembered only while they are among the RECENT
        latest, by strong references: they are usually the next module's input or their
        container's output, and a weak reference would make torch keep each one's Python
        object alive for the step (many objects for the garbage collector on models of many
        small modules). Large ones are remembered for the step, weakly.
        """
        if isinstance(count, int):
            self._recent.append((t, t._version, count))
            if len(self._recent) > RECENT:
                del self._recent[0]
            return
        key = id(t)
        self._counted[key] = weakref.ref(t)
        self._counted_version[key] = t._version
        self._counted_as[key] = count

    def _recall(self, t: torch.Tensor) -> Any:
        """The remembered count of `t` if it has not been modified since, else None."""
        for tensor, version, count in self._recent:
            if tensor is t and version == t._version:
                return count
        key = id(t)
        seen = self._counted.get(key)
        if seen is None or seen() is not t or self._counted_version[key] != t._version:
            return None
        return self._counted_as[key]

    def _nonfinite_count(self, t: torch.Tensor, row: int, column: int) -> None:
        """Count the NaN/Inf elements of `t` into (row, column); reuse a count of the same
        tensor (same version: not modified in place since) made earlier this step."""
        count = self._recall(t)
        if count is None:
            x = t.detach()
            if x.numel() <= SAMPLE and x.layout is torch.strided:
                count = self._stage.add(x)
            else:
                count = nonfinite_count(x)
            self._remember(t, count)
        if isinstance(count, int):  # a staged row: its count arrives with the others
            self._staged_counts += (row, column, count)
        else:
            counts = self._counts.get(count.device)
            if counts is None:
                counts = self._counts[count.device] = _Counts()
            counts.tensors.append(count)
            counts.slots += (row, column, 1, 0)

    def _record(self, name, leaf, bounds, relu, args, outputs) -> None:
        primary = outputs[0]
        if name in self._activation_modules:
            self._activation_outputs.append(primary)
            if len(self._activation_outputs) > RECENT:
                del self._activation_outputs[0]
        self._calls[name] = self._calls.get(name, 0) + 1
        row = self._order.setdefault(name, len(self._order))  # first-call order = its row
        x = primary  # read under no_grad (the hook turned it off): no detached copy needed
        numel = x.numel()
        out_numel = numel if len(outputs) == 1 else sum(t.numel() for t in outputs)
        self._out_numel[name] = self._out_numel.get(name, 0) + out_numel
        inputs = _float_leaves(args) if self._track_nonfinite else []
        # inputs first (most are outputs counted just before), unless the module worked in
        # place: then its output, the same tensor, is counted first (the ReLU way is cheaper)
        in_place = (inputs[0] is primary if len(inputs) == 1
                    else any(t is primary for t in inputs))
        if not in_place:
            for t in inputs:
                self._nonfinite_count(t, row, ModuleAcc.IN_NONFINITE)
        rest = outputs
        peak = self._record_units(name, x) if relu and x.dim() >= 1 else None
        if leaf and x.layout is torch.strided:
            handle = self._stage.add(x, bounds)  # whole, or a sample if large
            size = min(numel, SAMPLE)
            self._numel[name] = self._numel.get(name, 0) + size
            self._moments += (row, handle, size)
            if numel <= SAMPLE:  # the staged row is the whole output: its count is exact
                self._remember(primary, handle)
                self._staged_counts += (row, ModuleAcc.NONFINITE, handle)
                rest = outputs[1:]
            elif peak is not None and x.device.type == "cpu" and len(outputs) == 1:
                # a ReLU output holds no -inf, so NaN/Inf can only sit in units whose
                # maximum (just computed for dead units) is not finite: count there only
                # (selecting them by value is a host operation on CPU tensors, no transfer)
                count = self._count_in_units(x, peak)
                self._remember(primary, count)
                self._nonfinite_count(primary, row, ModuleAcc.NONFINITE)
                rest = ()
        for t in rest:
            self._nonfinite_count(t, row, ModuleAcc.NONFINITE)
        if in_place:
            for t in inputs:
                self._nonfinite_count(t, row, ModuleAcc.IN_NONFINITE)

    def _unit_dims(self, x: torch.Tensor) -> tuple[list[int], int]:
        """The dims a unit's values span, and the unit dim: channels (dim 1) for conv maps
        (batch, channels, ...), else the last dim."""
        if x.dim() >= 4 or (x.dim() == 3 and self._channels_first_3d):
            return [d for d in range(x.dim()) if d != 1], 1
        return list(range(x.dim() - 1)), x.dim() - 1

    def _count_in_units(self, x: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """NaN/Inf count of a CPU ReLU output, looking only at units with a non-finite max."""
        _, unit_dim = self._unit_dims(x)
        bad = torch.nonzero(~torch.isfinite(peak.reshape(-1))).reshape(-1)
        picked = x.index_select(unit_dim, bad)
        return torch.count_nonzero(picked - picked)

    def _record_units(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Note which units were positive in `x`; return the per-unit maxima."""
        dims, unit_dim = self._unit_dims(x)
        units = x.shape[unit_dim]
        peak = x.amax(dim=dims) if dims else x
        active = ~(peak <= 0)  # dead = every value <= 0; a unit that saw NaN is not called dead
        self._unit_rows[name] = self._unit_rows.get(name, 0) + x.numel() // max(units, 1)
        key = (name, units)
        if key in self._active:
            self._active[key] |= active
        else:
            self._active[key] = active
        return peak

    def put(self, batch: DeviceBatch) -> list[str]:
        """Queue the accumulated statistics; return the names of the modules measured."""
        for (name, units), active in self._active.items():
            counts = self._counts.setdefault(active.device, _Counts())
            counts.tensors.append(torch.count_nonzero(active))
            counts.slots += (self._order[name], ModuleAcc.DEAD, -1, units)
        self._fields = []
        for index, (device, counts) in enumerate(self._counts.items()):
            field = f"act:{index}:counts"
            batch.put(field, torch.stack(counts.tensors))
            self._fields.append((device, field))
        self._stage.put(batch, "act:stage")
        return list(self._order)

    def _accumulation_plan(self) -> _Plan:
        """Where each fetched value goes (cached: the same modules stage and count the
        same rows step after step, so the index arrays are built once per layout)."""
        counts = tuple((device, tuple(self._counts[device].slots)) for device, _ in self._fields)
        key = (tuple(self._moments), tuple(self._staged_counts), self._stage.layout(), counts,
               len(self._order))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if len(self._plans) > 16:
            self._plans.clear()
        width = ModuleAcc.DEAD + 1
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        count_slots = []
        for (_, field), (_, slots_list) in zip(self._fields, counts):
            slots = np.asarray(slots_list, dtype=np.int64).reshape(-1, 4)
            rows.append(slots[:, 0])
            cols.append(slots[:, 1])
            count_slots.append((field, slots[:, 3], slots[:, 2]))
        moments = None
        if self._moments:
            where, handles, sizes = np.array(self._moments, dtype=np.int64).reshape(-1, 3).T
            moments = (self._stage.positions(handles), sizes)
            for column in (ModuleAcc.SUM, ModuleAcc.SUMSQ, ModuleAcc.ZEROS, ModuleAcc.SATURATED):
                rows.append(where)
                cols.append(np.full(len(where), column, dtype=np.int64))
        staged = None
        if self._staged_counts:
            where, columns, handles = np.array(self._staged_counts,
                                               dtype=np.int64).reshape(-1, 3).T
            staged = self._stage.positions(handles)
            rows.append(where)
            cols.append(columns)
        flat = np.concatenate(rows) * width + np.concatenate(cols) if rows else None
        plan = self._plans[key] = _Plan(count_slots, moments, staged, flat,
                                        len(self._order) * width)
        return plan

    def _accumulate(self, host: dict[str, np.ndarray]) -> np.ndarray:
        plan = self._accumulation_plan()
        width = ModuleAcc.DEAD + 1
        if plan.flat is None:
            return np.zeros((len(self._order), width))
        values: list[np.ndarray] = [offset + sign * host[field]
                                    for field, offset, sign in plan.counts]
        staged = self._stage.columns(host)  # [STATS, rows]
        if plan.moments is not None:
            positions, sizes = plan.moments
            stats = staged[:, positions]
            # each row's variance from its centred sums (no cancellation when the values sit
            # far from zero), then n (var + mean^2) as its sum of squares in float64: for a
            # single call the mean^2 cancels exactly again in results()
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                mean = stats[RowStat.SUM] / sizes
                offset = stats[RowStat.CENTRED] / sizes
                var = np.maximum(stats[RowStat.NORM] ** 2 / sizes - offset * offset, 0.0)
                squares = sizes * (var + mean * mean)
            values += (stats[RowStat.SUM], squares, sizes - stats[RowStat.NONZERO],
                       stats[RowStat.SATURATED])
        if plan.staged is not None:
            values.append(staged[RowStat.NONFINITE, plan.staged])
        # bincount sums the values of each (row, column) cell (much faster than np.add.at)
        return np.bincount(plan.flat, weights=np.concatenate(values),
                           minlength=plan.size).reshape(-1, width)

    def _table_plan(self) -> _TablePlan:
        """What a step's table takes from its layout alone: the modules, their value
        counts, leaf/bounded/dead-unit flags, calls and order (cached: the same modules
        are called the same way step after step)."""
        key = (tuple(self._order), tuple(self._numel.items()), tuple(self._out_numel.items()),
               tuple(self._calls.items()), tuple(self._active), tuple(self._unit_rows.items()),
               self._bounded_changes)
        plan = self._table_plans.get(key)
        if plan is not None:
            return plan
        if len(self._table_plans) > 16:
            self._table_plans.clear()
        names = list(self._order)
        units: dict[str, int] = {}
        for name, count in self._active:
            units[name] = units.get(name, 0) + count
        count = len(names)

        def column(values: dict[str, int]) -> np.ndarray:
            """values[name] (0 when missing) of each module, in row order."""
            return np.fromiter(map(values.get, names, repeat(0)), np.int64, count)

        n = np.maximum(column(self._numel), 1).astype(np.float64)
        n_out = np.maximum(column(self._out_numel), 1).astype(np.float64)
        leaf = np.fromiter(map(self._leaf.__getitem__, names), bool, count)
        if units:
            has_dead = np.array([name in units and self._unit_rows.get(name, 0) >= MIN_UNIT_ROWS
                                 for name in names], dtype=bool)
            unit_count = np.maximum(column(units), 1).astype(np.float64)
        else:  # no ReLU output this step
            has_dead = np.zeros(count, dtype=bool)
            unit_count = np.ones(count)
        ints = np.empty((count, 3), dtype=np.int64)
        ints[:, 1] = column(self._calls)
        ints[:, 2] = np.arange(count)
        bounded = np.fromiter(map(self._bounded.__getitem__, names), bool, count)
        flags = np.stack([leaf, bounded, has_dead], axis=1)
        index = self._index_cache.get(key[0])
        if index is None:  # the same modules in the same order step after step: one dict
            if len(self._index_cache) > 16:
                self._index_cache.clear()
            index = self._index_cache[key[0]] = {name: i for i, name in enumerate(names)}
        plan = self._table_plans[key] = _TablePlan(
            n, n_out, np.flatnonzero(~leaf), unit_count,
            np.flatnonzero(~has_dead) if has_dead.any() else None, ints, flags, index)
        return plan

    def results(self, host: dict[str, np.ndarray]) -> ActivationTable:
        """Turn fetched statistics into per-module statistics, and reset for the next step."""
        acc = self._accumulate(host)
        plan = self._table_plan()
        names = list(self._order)
        n = plan.n
        floats = np.empty((len(names), len(FLOAT_FIELDS)))
        # each column computed for every module (written in place), then NaN where it does
        # not apply: what np.where(applies, value, nan) gives
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf on NaN/Inf outputs
            mean = np.divide(acc[:, ModuleAcc.SUM], n, out=floats[:, 0])
            var = acc[:, ModuleAcc.SUMSQ] / n - mean * mean
            var = np.where(var < 0.0, 0.0, var)  # clamp at 0; NaN stays NaN
            np.sqrt(var, out=floats[:, 1])
        np.divide(acc[:, ModuleAcc.ZEROS], n, out=floats[:, 2])
        np.divide(acc[:, ModuleAcc.NONFINITE], plan.n_out, out=floats[:, 3])
        np.divide(acc[:, ModuleAcc.SATURATED], n, out=floats[:, 4])
        if plan.no_dead is None:  # no unit judged dead or alive this step
            floats[:, 5] = np.nan
        else:
            np.divide(acc[:, ModuleAcc.DEAD], plan.unit_count, out=floats[:, 5])
            floats[plan.no_dead, 5] = np.nan
        floats[plan.containers, :3] = np.nan
        ints = plan.ints.copy()
        ints[:, 0] = acc[:, ModuleAcc.IN_NONFINITE]
        flags = plan.flags.copy()
        self.reset()
        return ActivationTable(names, floats, ints, flags, plan.positions)

    def reset(self) -> None:
        self._stage.reset()
        self._moments.clear()
        self._staged_counts.clear()
        self._counts.clear()
        self._fields = []
        self._counted.clear()
        self._counted_version.clear()
        self._counted_as.clear()
        self._recent.clear()  # cleared in place: the hooks hold these containers
        self._activation_outputs.clear()
        self._numel.clear()
        self._out_numel.clear()
        self._recomputed.clear()
        self._active.clear()
        self._unit_rows.clear()
        self._calls.clear()
        self._order.clear()


__all__ = [
    "SATURATION_MARGIN", "ActivationCollector", "ActivationStats", "ActivationTable",
    "compiling", "in_backward", "input_owner", "input_row",
]
