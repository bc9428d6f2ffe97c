"""Flight recorder: a few on-device numbers for every step, so that the first bad step is
known exactly even when only every N-th step is recorded.

Per training step it keeps, on the device: whether the model's input and output held NaN/Inf
and the largest |gradient| of every parameter before the optimizer step (one min/max pass
each: unlike a sum or a norm it never overflows for finite values). Weights are not read on
every step (a second pass over the whole model, most of the cost): an update that overflows
them shows in the next step's output and gradients, and on recorded steps in their norms.
The rows wait on the device and travel with the next recorded step's single transfer. On
CPU a step's values are one flat row made with a few kernels (see flight_rows.StepRows).

On CPU, where reading a value costs no transfer, a step whose numbers turn non-finite is
also replayed at once: its forward runs again on the same inputs and still-unchanged weights
with a check on every module, so the module (or the parent code between two modules) that
made the first NaN/Inf is named. Buffers and the RNG are restored: training is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import numpy as np
import torch
from torch import nn

from ..hooks import Guard, HookSet
from ..records import FlightLog
from .activations import _float_leaves, compiling
from .data import first_tensor
from .distributed import is_dtensor, local_tensor, world_size
from .flight_rows import IN, OUT, GradPlan, StepRows
from .grads import stack_plan
from .output import output_logits
from .transfer import DeviceBatch, group_by_device_dtype, on_device

INPUT, OUTPUT = range(2)

_graph_task = torch._C._current_graph_task_id  # -1 outside a backward pass (see in_backward)
_rng_state = torch.default_generator.get_state  # what torch.get_rng_state() returns


def peaks(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Largest |value| of each tensor (NaN if it holds NaN), float64, one pass each.

    Example:
        >>> peaks([torch.tensor([1.0, -3.0]), torch.tensor([float("nan"), 0.0])]).tolist()
        [3.0, nan]
    """
    if tensors[0].device.type == "cpu" and len(tensors) > 1:
        return _stacked_peaks(tensors)
    pairs = [torch.aminmax(t) for t in tensors]  # a single-pass kernel, fast on CPU
    low = torch.stack([lo for lo, _ in pairs]).to(torch.float64)
    high = torch.stack([hi for _, hi in pairs]).to(torch.float64)
    return torch.maximum(low.abs(), high.abs())


def _stacked_peaks(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """peaks() of CPU tensors of one dtype: small tensors of one shape stacked into a matrix
    and reduced by rows (a kernel per tensor costs more than its arithmetic on models of
    many small layers), large ones one aminmax pass each. Min and max are exact in any
    dtype and keep NaN, so the values are those of one aminmax per tensor."""
    plan = stack_plan(tensors)
    parts = []
    for members in plan.groups:
        if len(members) == 1:
            low, high = torch.aminmax(tensors[members[0]])
            low, high = low.reshape(1), high.reshape(1)
        else:
            rows = torch.stack([tensors[i] for i in members]).view(len(members), -1)
            # amin and amax along the dim: aminmax along a dim is the slow CPU kernel
            low, high = rows.amin(1), rows.amax(1)
        parts.append(torch.maximum(low.abs(), high.abs()))
    if len(parts) == 1:
        return parts[0].to(torch.float64)  # one group holds the tensors in their order
    return torch.cat(parts).index_select(0, plan.back).to(torch.float64)


def _flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-d float64 value that is non-finite exactly when `t` holds NaN/Inf: min + max,
    from one min/max pass (no overflow for finite values, no flag read).

    Example:
        >>> bool(_flag(torch.tensor([1.0, -3.0])).isfinite())
        True
        >>> bool(_flag(torch.tensor([1.0, float("inf")])).isfinite())
        False
    """
    low, high = torch.aminmax(t.detach())
    return low.to(torch.float64) + high.to(torch.float64)


def _any(t: torch.Tensor) -> bool:
    """Whether a CPU bool tensor holds a True value, read without a transfer method (on
    CPU, selecting by value is a host operation; no device is involved)."""
    return torch.nonzero(t.reshape(-1)).shape[0] > 0


_GRAD = attrgetter("grad")


class FlightRecorder:
    """Per-step flags and maxima on the device, handed over at the next recorded step.

    Example:
        >>> model = nn.Linear(2, 1); guard = Guard()
        >>> flight = FlightRecorder(model, list(model.parameters()), guard, optimized=False)
        >>> flight.attach(); _ = model(torch.ones(1, 2)).sum().backward()
        >>> flight.end_step(0, recorded=False); batch = DeviceBatch()
        >>> flight.put(batch, 1); log = flight.result(batch.fetch(), 1)
        >>> log.steps, log.output_bad
        ([0], [False])
        >>> flight.close()
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], guard: Guard,
                 optimized: bool = False) -> None:
        self._model = model
        # with an optimizer, gradients are read in its pre-step hook; a step where that hook
        # did not run was skipped (an AMP overflow): its gradients are not read
        self._optimized = optimized
        self._params = list(params)
        self._guard = guard
        self._hooks = HookSet()
        self._sums: list[torch.Tensor | None] = [None, None]  # input, output of this step
        self._flags: list[torch.Tensor] = []  # per step: [input sum, output sum]
        self._steps: list[int] = []
        self._maxima: list[torch.Tensor] = []  # per step: largest |grad| of each parameter
        self._norm_steps: list[int] = []
        self._captured = False
        self._replaying = False
        self._last_input: tuple[tuple, dict] | None = None
        self._rng: torch.Tensor | None = None
        # the replay runs one forward on this process only: never under torch.distributed,
        # where a forward may wait for the other ranks
        self._cpu = (bool(self._params) and all(p.device.type == "cpu" for p in self._params)
                     and world_size() == 1)
        # on CPU a step's numbers are one flat row with few kernels (see flight_rows)
        self._rows = StepRows(len(self._params)) if self._cpu else None
        self._latched = False
        self.origin: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        self._hooks.add(self._model.register_forward_pre_hook(
            self._guard.wrap("flight", self._on_input), with_kwargs=True))
        self._hooks.add(self._model.register_forward_hook(
            self._guard.wrap("flight", self._on_output)))

    def close(self) -> None:
        """Remove the hooks (the rows kept so far can still be put and read)."""
        self._hooks.remove()
        self._last_input = None
        if self._rows is not None:
            self._rows.reset_step()

    def _training(self, module: nn.Module) -> bool:
        # under torch.compile tracing the hooks do nothing (compiled code runs no hooks), and
        # nothing after that first test is traced
        return (not compiling() and module.training and not self._replaying
                and torch.is_grad_enabled() and _graph_task() == -1)

    def _add(self, slot: int, total: torch.Tensor) -> None:
        held = self._sums[slot]
        self._sums[slot] = total if held is None else held + total

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._training(module):
            return
        if self._cpu and not self._latched:
            self._last_input = (args, kwargs)
            self._rng = _rng_state()
        x = args[0] if args and isinstance(args[0], torch.Tensor) else first_tensor(args, kwargs)
        if x is not None and x.is_floating_point() and x.numel():
            x = local_tensor(x) if is_dtensor(x) else x
            if self._rows is not None:
                self._rows.limits(IN, torch.aminmax(x.detach() if x.requires_grad else x))
            else:
                self._add(INPUT, _flag(x))

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._training(module):
            return
        if type(output) is torch.Tensor:  # output_logits() of a plain tensor, inline
            leaf = output if output.is_floating_point() and output.numel() else None
        else:
            leaf = output_logits(output)
        if leaf is not None:
            leaf = local_tensor(leaf) if is_dtensor(leaf) else leaf
            if self._rows is not None:
                self._rows.limits(OUT, torch.aminmax(leaf.detach()))
            else:
                self._add(OUTPUT, _flag(leaf))

    # ------------------------------------------------------------------ per step
    def capture(self, step: int, recorded: bool) -> None:
        """Read the step's gradients (before the optimizer step): the maxima of unrecorded
        steps are kept; on CPU a non-finite step is replayed once."""
        if self._captured:
            return
        self._captured = True
        if not self._cpu and recorded:
            return  # a recorded step measures its own gradient maxima
        # no autograd graph for what is read (torch.no_grad() without its per-call objects)
        grad_mode = torch.is_grad_enabled()
        if grad_mode:
            torch._C._set_grad_enabled(False)
        try:
            grads = list(map(_GRAD, self._params))
            if self._rows is not None:
                self._capture_row(grads, step, recorded)
                return
            if recorded:
                return
            row = self._maxima_row(grads)
            if row is not None:
                self._maxima.append(row)
                self._norm_steps.append(step)
        finally:
            if grad_mode:
                torch._C._set_grad_enabled(True)

    def _maxima_row(self, grads: list[torch.Tensor | None]) -> torch.Tensor | None:
        # a sharded (DTensor) gradient: this rank's shard (a detector, no collective);
        # a strided layout leaves out sparse gradients, numel() empty ones
        present = [(local_tensor(g) if is_dtensor(g) else g, i) for i, g in enumerate(grads)
                   if g is not None and g.layout is torch.strided and g.numel() > 0
                   and not g.is_complex()]
        if not present:
            return None
        device = present[0][0].device
        groups = group_by_device_dtype(*zip(*present))
        if len(groups) == 1 and len(present) == len(self._params):
            return peaks(groups[0][0])  # every parameter, in order: the row itself
        # -1 marks "not measured" (a peak is >= 0; NaN is a gradient that holds NaN)
        row = torch.full((len(self._params),), -1.0, dtype=torch.float64, device=device)
        for group, group_idx in groups:
            if group[0].device == device:
                row.index_copy_(0, on_device(list(group_idx), device), peaks(group))
        return row

    def _capture_row(self, grads: list[torch.Tensor | None], step: int, recorded: bool
                     ) -> None:
        """capture() on CPU: one row of the step's values so far, checked when due."""
        assert self._rows is not None
        # a recorded step measures its own gradient maxima: only the check reads them here
        if recorded and not self._check_now():
            return
        full = None
        plan: GradPlan | None = self._rows.plan(grads)
        if plan is not None and plan.sharded:
            full = self._maxima_row(grads)  # shards: the general path, as a full row
            grads, plan = [None] * len(grads), None
        if recorded and plan is not None:  # the check alone: fewer kernels (same verdict)
            piece = self._rows.check_piece(grads, plan)
        else:
            piece = self._rows.piece(grads, keep=not recorded, full=full, plan=plan)
        if piece is not None and self._check_now() and not self._rows.finite(piece):
            self._replay(step)

    def _replay(self, step: int) -> None:
        self._latched = True
        self.origin = replay(self._model, self._last_input, self._rng, step)
        self._last_input = None

    def _check_now(self) -> bool:
        """Whether a non-finite step is still to be replayed (CPU, no replay yet)."""
        return self._cpu and not self._latched

    def end_step(self, step: int, recorded: bool) -> None:
        """Close the step: keep its input/output sums (and capture, if no optimizer did)."""
        if not self._captured and not self._optimized:
            self.capture(step, recorded)
        elif not self._captured and self._check_now():  # the input and output only
            assert self._rows is not None
            piece = self._rows.piece(None, keep=False)
            if piece is not None and not self._rows.finite(piece):
                self._replay(step)
        self._captured = False
        if not self._latched and not recorded:
            self._last_input = None  # references to the batch live one step at most
        if self._rows is not None:
            self._rows.end(step)
            return
        zero = None
        sums = []
        for s in self._sums:
            if s is None:
                if zero is None:
                    device = next((t.device for t in self._sums if t is not None), None)
                    zero = torch.zeros((), dtype=torch.float64,
                                       device=device or torch.device("cpu"))
                s = zero
            sums.append(s)
        if self._sums[INPUT] is not None or self._sums[OUTPUT] is not None:
            self._flags.append(torch.stack(sums))
            self._steps.append(step)
        self._sums = [None, None]

    def put(self, batch: DeviceBatch, step: int) -> None:
        """Queue what was kept since the last record (the current step `step` included)."""
        if self._rows is not None:
            self._rows.put(batch)
            return
        if self._flags:
            batch.put("flight:flags", torch.stack(self._flags).reshape(-1))
        if self._maxima:
            batch.put("flight:maxima", torch.stack(self._maxima).reshape(-1))

    def result(self, host: dict[str, np.ndarray], step: int, keep: bool = False
               ) -> FlightLog | None:
        """The FlightLog of the steps queued by put(); None when nothing was kept. With
        `keep`, the rows stay for the next record (a look before the run is over)."""
        if self._rows is not None:
            return self._row_result(host, keep)
        flags = host.get("flight:flags")
        maxima = host.get("flight:maxima")
        steps, norm_steps, origin = list(self._steps), list(self._norm_steps), self.origin
        if not keep:
            self._flags, self._maxima, self._steps, self._norm_steps = [], [], [], []
            self.origin = None
        if flags is None and maxima is None and origin is None:
            return None
        log = FlightLog(steps=list(steps), input_bad=[], output_bad=[], origin=origin)
        if flags is not None:
            pairs = flags.reshape(-1, 2)
            log.input_bad = [not math.isfinite(v) for v in pairs[:, INPUT].tolist()]
            log.output_bad = [not math.isfinite(v) for v in pairs[:, OUTPUT].tolist()]
        else:
            log.steps = []
        if maxima is not None:
            rows = maxima.reshape(-1, len(self._params))
            # non-finite peaks read inf, unmeasured ones (-1) NaN
            rows = np.where(rows < 0, np.nan, np.where(np.isnan(rows), np.inf, rows))
            log.norm_steps = list(norm_steps)
            log.grad_max = rows.tolist()
        return log

    def _row_result(self, host: dict[str, np.ndarray], keep: bool) -> FlightLog | None:
        assert self._rows is not None
        steps, input_bad, output_bad, norm_steps, grad_max = self._rows.read(host)
        origin = self.origin
        if not keep:
            self._rows.clear()
            self.origin = None
        if not steps and not norm_steps and origin is None:
            return None
        return FlightLog(steps=steps, input_bad=input_bad, output_bad=output_bad,
                         norm_steps=norm_steps, grad_max=grad_max, origin=origin)


# ---------------------------------------------------------------------- replay
def _bad(t: torch.Tensor) -> bool:
    return t.numel() > 0 and _any(~torch.isfinite(t.detach()))


def _bad_leaves(value: Any) -> bool:
    return any(_bad(t) for t in _float_leaves(value))


def _where_bad(x: torch.Tensor, limit: int = 8) -> dict[str, Any]:
    """Rows (dim 0) and columns (dim 1) of `x` holding NaN/Inf, the first `limit` of each."""
    at = torch.nonzero(~torch.isfinite(x.detach()))
    rows = sorted(set(at[:, 0].tolist()))[:limit] if at.shape[0] else []
    cols = sorted(set(at[:, 1].tolist()))[:limit] if at.shape[0] and x.dim() > 1 else []
    return {"rows": rows, "columns": cols, "count": int(at.shape[0])}


@torch.no_grad()
def replay(model: nn.Module, inputs: tuple[tuple, dict] | None, rng: torch.Tensor | None,
           step: int) -> dict[str, Any]:
    """Run the forward of `inputs` again with a NaN/Inf check on every module; return where
    the first non-finite value appeared: {"kind": "input" | "module" | "gap" | "none", ...}.

    The model's buffers and the RNG state are restored afterwards.

    Example:
        >>> class Div(nn.Module):
        ...     def forward(self, x): return x / x.sum()
        >>> net = nn.Sequential(nn.ReLU(), Div())
        >>> found = replay(net, ((-torch.ones(1, 2),), {}), None, 0)
        >>> found["kind"], found["module"], found["type"]
        ('module', '1', 'Div')
    """
    if inputs is None:
        return {"step": step, "kind": "unknown"}
    args, kwargs = inputs
    x = first_tensor(args, kwargs)
    if x is not None and x.is_floating_point() and _bad(x):
        return {"step": step, "kind": "input", **_where_bad(x)}
    names = {m: name for name, m in model.named_modules()}
    stack: list[str] = []
    done: dict[str, str | None] = {}  # module -> its last child that completed
    found: dict[str, Any] = {}

    def pre(module: nn.Module, a: tuple) -> None:
        name = names.get(module, "?")
        if not found and stack and _bad_leaves(a):
            parent = stack[-1]
            found.update(kind="gap", module=parent, after=done.get(parent), before=name)
        stack.append(name)
        done.setdefault(name, None)

    def post(module: nn.Module, a: tuple, out: Any) -> None:
        name = stack.pop() if stack else names.get(module, "?")
        if stack:
            done[stack[-1]] = name
        if found or not _bad_leaves(out):
            return
        own = [p for p in module.parameters(recurse=False) if _bad(p)]
        child = done.get(name)
        kind = "module" if child is None else "gap"
        found.update(kind=kind, module=name, weights_bad=bool(own))
        if child is not None:
            found.update(after=child, before=None)

    hooks = HookSet()
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        for module in names:
            hooks.add(module.register_forward_pre_hook(pre))
            hooks.add(module.register_forward_hook(post))
        with torch.random.fork_rng(devices=[]):
            if rng is not None:
                torch.set_rng_state(rng)
            model(*args, **kwargs)
    finally:
        hooks.remove()
        for buffer, saved in buffers:
            buffer.copy_(saved)
    if not found:
        return {"step": step, "kind": "none"}
    found["type"] = type(dict(model.named_modules())[found["module"]]).__name__
    return {"step": step, **found}


__all__ = ["FlightLog", "FlightRecorder", "peaks", "replay"]
