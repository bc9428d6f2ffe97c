"""StepRecorder: the hooks on a model and its optimizers, and the StepRecord of each step."""

from __future__ import annotations

import functools
import math
import warnings
from operator import attrgetter
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .errors import GradscopeWarning
from .guard import Guard
from .history import StepRecord
from .hooks import HookSet
from .layout import ModelLayout, forward_roots
from .losses import LossBuffer, any_nonfinite
from .options import WatchOptions
from .records import ActivationTable, FlightLog
from .signals.activations import ActivationCollector, _float_leaves, compiling, in_backward
from .signals.data import DataCollector, first_tensor
from .signals.distributed import is_sharded
from .signals.flight import FlightRecorder
from .signals.grads import (
    Rows,
    measurable,
    put_grad_stats,
    put_nonfinite_counts,
    put_param_norms,
    put_stale_grad_norms,
)
from .signals.loss_graph import activation_before_logit_loss
from .signals.output import OutputCollector
from .signals.transfer import DeviceBatch
from .signals.updates import UpdateTracker

#: Per-parameter fields of the step's transfer (each an array over the layout's parameters).
PARAM_FIELDS = ("grad_norm", "grad_max", "param_norm", "update_diff", "update_base",
                "update_bits_moved", "stale_grad", "grad_nonfinite")


_REQUIRES_GRAD = attrgetter("requires_grad")


class StepRecorder:
    """Hooks on the model and optimizers; measures the recorded steps into StepRecords.

    Every `options.every`-th step (and the step after a non-finite loss) is recorded: its
    forward, backward and optimizer step are observed and `finish_step()` returns its record
    after one device-to-host transfer. Other steps cost nothing but their loss, which waits
    on the device in `losses`. Each signal runs under `guard`: one failing is switched off
    and never stops training.

    Example:
        >>> import torch
        >>> from gradscope.history import History
        >>> model = torch.nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
        >>> layout = ModelLayout.of(model)
        >>> losses = LossBuffer(History(layout))
        >>> recorder = StepRecorder(model, layout, [opt], WatchOptions(every=1), losses, Guard())
        >>> recorder.attach()
        >>> loss = model(torch.randn(4, 3)).pow(2).mean(); loss.backward(); opt.step()
        >>> record = recorder.finish_step(loss.detach(), True)
        >>> record.step, record.stepped, record.grad_norm.shape
        (0, True, (2,))
        >>> recorder.detach()
    """

    def __init__(self, model: nn.Module, layout: ModelLayout,
                 optimizers: list[torch.optim.Optimizer], options: WatchOptions,
                 losses: LossBuffer, guard: Guard) -> None:
        self.model = model
        self.layout = layout
        self.optimizers = optimizers
        self.every = options.every
        self.losses = losses
        self.guard = guard
        self.closed = False
        #: whoever reads this recorder's records, kept alive by the hooks on the model
        self.owner: object | None = None
        self.step = 0  # the step being observed: how many times finish_step() ran
        self._hooks = HookSet()
        self._recording_hooks = HookSet()
        self._tensor_hooks = HookSet()
        self._batch = DeviceBatch()
        self._index = {id(t): i for i, t in enumerate(layout.tensors)}
        #: what the loop calls forward on (the model, or the parts of a container) and, for
        #: each, the indices of its parameters
        self._roots = forward_roots(model)
        self._root_params = ([list(range(len(layout.tensors)))] if self._roots == [model] else
                             [[self._index[id(p)] for p in root.parameters()
                               if id(p) in self._index] for root in self._roots])
        self._updates = UpdateTracker(layout.tensors, options.update_sample)
        self.activations = (ActivationCollector(model, guard, options.nonfinite_origin)
                            if options.activations else None)
        self._data = DataCollector()
        self._output = OutputCollector(guard)
        self.flight = FlightRecorder(model, layout.tensors, guard, optimized=bool(optimizers))
        # sharded (FSDP2) gradients are combined by a collective on recorded steps, so every
        # rank must record the same steps: no extra recording triggered by this rank's loss
        self._sharded = any(is_sharded(t) for t in layout.tensors)
        self._warned_no_forward = False
        self._force_record = False
        self._stepped = False
        self._prev_stepped = False
        self.recording = False
        # per-step state, reset by _reset_step_state() after every step
        self._read: set[int] = set()
        self._read_early: set[int] = set()
        self._held_grads: dict[int, torch.Tensor] = {}
        self._grad_none = np.zeros(len(layout.params), dtype=bool)
        self._stepping: dict[int, list[int]] = {}
        self._orphans: list[int] | None = None
        self._backward_count = 0
        self._backward_tasks: set[int] = set()  # backward() calls seen this step
        self._stale_roots: set[int] = set()  # roots whose leftover gradients were checked
        self._in_closure = False  # inside an optimizer step that evaluates a closure
        self._closure_calls = 0  # evaluations of the step's closure (see _count_closure_calls)
        self._closure_checked = False
        self._activation_before_loss: str | None = None
        self._loss_requires_grad: bool | None = None
        # the guarded hooks of recorded steps, made once (re-registered on each of them)
        self._root_input_hook = guard.wrap("data", self._on_root_input)
        self._root_output_hooks = [
            guard.wrap("accumulation", functools.partial(self._on_root_output, k))
            for k in range(len(self._roots))]
        self._backward_start_hooks = [
            guard.wrap("accumulation", functools.partial(self._on_backward_start, k))
            for k in range(len(self._roots))]

    # ----------------------------------------------------------------- attach / detach
    def attach(self) -> None:
        """Hook the optimizers, and the model when the first step is recorded."""
        self.flight.attach()
        for opt in self.optimizers:
            # each signal inside is guarded on its own: one failing never stops the others
            self._hooks.add(opt.register_step_pre_hook(
                self.guard.wrap("optimizer", self._on_optimizer_pre)))
            self._hooks.add(opt.register_step_pre_hook(self._count_closure_calls))
            self._hooks.add(opt.register_step_post_hook(
                self.guard.wrap("optimizer", self._on_optimizer_post)))
        self.recording = True
        self._begin_recording()

    def detach(self) -> None:
        """Remove every hook and drop what the step held; nothing of the recorder remains."""
        self.closed = True
        self.flight.close()
        self._hooks.remove()
        self._detach_recording_hooks()
        self._held_grads = {}
        self._output.reset()
        self._updates.reset()

    def _begin_recording(self) -> None:
        self.guard.call("activations", self._attach_recording_hooks)

    def _attach_recording_hooks(self) -> None:
        for root, on_output in zip(self._roots, self._root_output_hooks):
            self._recording_hooks.add(root.register_forward_pre_hook(
                self._root_input_hook, with_kwargs=True))
            self._recording_hooks.add(root.register_forward_hook(on_output))
        if self.activations is not None:
            self.activations.attach()

    def _detach_recording_hooks(self) -> None:
        self._recording_hooks.remove()
        self._tensor_hooks.remove()
        if self.activations is not None:
            self.activations.detach()

    # ----------------------------------------------------------------- optimizer bookkeeping
    def optimizer_param_ids(self) -> set[int]:
        """ids of the parameters some optimizer holds (read per use: groups may be added)."""
        ids: set[int] = set()
        for opt in self.optimizers:
            for g in opt.param_groups:
                ids.update(map(id, g["params"]))
        return ids

    def _params_outside_optimizers(self, held: set[int]) -> list[int]:
        """Trainable parameters in no optimizer: their change is measured over the whole step."""
        if held.issuperset(map(id, self.layout.tensors)):  # all held (the usual case)
            return []
        return [i for i, p in enumerate(self.layout.tensors)
                if p.requires_grad and id(p) not in held]

    def _optimizer_indices(self, optimizer: torch.optim.Optimizer) -> list[int]:
        if not self._read:  # nothing read yet this step (the usual case): the same, in bulk
            found: list[int | None] = []
            for group in optimizer.param_groups:
                found.extend(map(self._index.get, map(id, group["params"])))
            return [i for i in found if i is not None]
        seen: list[int] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                i = self._index.get(id(p))
                if i is not None and i not in self._read:
                    seen.append(i)
        return seen

    # ----------------------------------------------------------------- hooks
    def _training_forward(self, module: nn.Module) -> bool:
        return (not compiling() and module.training and torch.is_grad_enabled()
                and not in_backward())

    def _on_root_input(self, module: nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
        if self.closed or not self._training_forward(module):
            return
        tensor = first_tensor(args, kwargs)
        if tensor is not None:
            self._data.observe(tensor)

    def _on_root_output(self, root: int, module: nn.Module, args: tuple[Any, ...],
                        output: Any) -> None:
        # Any forward whose output is later backpropagated counts, eval mode included
        # (fine-tuning with dropout off); outputs that never get a backward cost nothing.
        if self.closed or compiling() or not torch.is_grad_enabled() or in_backward():
            return
        if self._training_forward(module):
            self.guard.call("output", self._output.observe, output)
        # every output that needs grad: the loss may come from any of them
        for leaf in _float_leaves(output):
            if leaf.requires_grad:
                self._tensor_hooks.add(leaf.register_hook(self._backward_start_hooks[root]))

    def _on_backward_start(self, root: int, grad: torch.Tensor) -> None:
        if self.closed:
            return
        task = torch._C._current_graph_task_id()  # one id per backward() call
        new_task = task not in self._backward_tasks
        if new_task:
            self._backward_tasks.add(task)
            self._backward_count += 1
        # The first backward through a root after an optimizer step must find that root's
        # gradients cleared. Each root on its own: a GAN clears D before D's losses and G
        # before G's, so G's gradients are still there when D's first backward runs, rightly.
        first = root not in self._stale_roots and self._prev_stepped
        # A closure optimizer (LBFGS) evaluates the closure several times in one step: each
        # evaluation must start from cleared gradients, or they add up across evaluations.
        again = new_task and self._closure_calls == 2 and not self._closure_checked
        if not (first or again):
            return
        self._stale_roots.add(root)
        self._closure_checked = self._closure_checked or again
        # Parameters outside every optimizer are never cleared by optimizer.zero_grad()
        # and never stepped, so leftover gradient there is harmless: check the others.
        held = self.optimizer_param_ids()
        indices = self._root_params[root]
        tensors = [self.layout.tensors[i] for i in indices]
        # all trainable and held (the usual case): all of them, checked in bulk
        if not (all(map(_REQUIRES_GRAD, tensors))
                and (not held or held.issuperset(map(id, tensors)))):
            indices = [i for i in indices if self.layout.tensors[i].requires_grad
                       and (not held or id(self.layout.tensors[i]) in held)]
            tensors = [self.layout.tensors[i] for i in indices]
        put_stale_grad_norms(tensors, list(indices), self._batch)

    def _count_closure_calls(self, optimizer: torch.optim.Optimizer, args: Any,
                             kwargs: Any) -> tuple[Any, Any] | None:
        """On a recorded step, hand the optimizer a closure that counts its own calls (and
        calls the user's with the same arguments): a closure optimizer evaluates it several
        times per step, and each evaluation must start from cleared gradients."""
        try:
            if self.closed or not self.recording or self.guard.is_off("accumulation"):
                return None
            closure, positional = _closure(args, kwargs)
            if closure is None:
                return None

            @functools.wraps(closure)
            def counted(*a: Any, **k: Any) -> Any:
                self._closure_calls += 1
                return closure(*a, **k)

            if positional:
                return (args[0], counted, *args[2:]), kwargs
            return args, {**kwargs, "closure": counted}
        except Exception as err:  # gradscope must never stop training
            self.guard.call("accumulation", _raise, err)
            return None

    def _on_optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.closed:
            return
        self.guard.call("flight", self.flight.capture, self.step, self.recording)
        if not self.recording:
            return
        indices = self._optimizer_indices(optimizer)
        # A closure optimizer (LBFGS) computes its gradients inside step(), by calling the
        # closure: they are read after the step, not before it.
        self._in_closure = _closure(args, kwargs)[0] is not None
        # gradients read earlier by read_gradients() still get their update measured
        early = [i for g in optimizer.param_groups for p in g["params"]
                 if (i := self._index.get(id(p))) in self._read_early] if self._read_early else []
        self._read_early.difference_update(early)
        self.guard.call("updates", self._updates.before, indices + early, self.step)
        if not self._in_closure:
            # the weight norms read the copy of the weights the update tracker just took
            # (nothing runs in between: the same values) instead of stacking them again
            self.guard.call("gradients", self._read_grads, indices,
                            self._updates.current_rows)
        self._updates.drop_current()
        indices = indices + early
        self._stepping[id(optimizer)] = indices
        if self._orphans is None:
            self._orphans = self._params_outside_optimizers(self.optimizer_param_ids())
            self.guard.call("updates", self._updates.before, self._orphans, self.step)
            self._updates.drop_current()

    def _on_optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.closed:
            return
        self._stepped = True
        if not self.recording:
            return
        indices = self._stepping.pop(id(optimizer), [])
        if self._in_closure:
            self._in_closure = False
            self.guard.call("gradients", self._read_grads,
                            [i for i in indices if i not in self._read])
        self.guard.call("updates", self._updates.after, indices, self._batch, self.step,
                        self._next_is_recorded())

    def _next_is_recorded(self) -> bool:
        """Whether the next step is recorded too: then its before-step bit sums are this
        step's after-step ones (the update tracker keeps them)."""
        return self.will_record(self.step + 1)

    def _read_grads(self, indices: list[int], rows: Rows | None = None) -> None:
        """Queue the gradient statistics and weight norms of `indices`; `rows`: current
        copies of weights to read instead of stacking them (see `put_param_norms`)."""
        if not indices:
            return
        tensors = [self.layout.tensors[i] for i in indices]
        grads = put_grad_stats(tensors, indices, self._batch)
        put_param_norms(tensors, indices, self._batch, "param_norm", rows)
        self._read.update(indices)
        if not [g for g in grads if g is None]:  # every gradient there (the usual case)
            self._grad_none[indices] = False
            self._held_grads.update(zip(indices, cast(list[torch.Tensor], grads)))
            return
        for i, p, g in zip(indices, tensors, grads):
            self._grad_none[i] = p.requires_grad and g is None
            if g is not None:
                self._held_grads[i] = g

    def read_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Read the gradients of `optimizer`'s parameters (all when None) now."""
        if self.closed or not self.recording:
            return
        if optimizer is None:
            indices = list(range(len(self.layout.params)))
        else:
            indices = [self._index[id(p)] for g in optimizer.param_groups for p in g["params"]
                       if id(p) in self._index]
        self._read_early.update(indices)
        self.guard.call("gradients", self._read_grads, indices)

    # ----------------------------------------------------------------- step lifecycle
    def _reset_step_state(self) -> None:
        self._read = set()
        self._read_early = set()
        self._held_grads = {}
        self._grad_none = np.zeros(len(self.layout.params), dtype=bool)
        self._stepping = {}
        self._orphans = None
        self._backward_count = 0
        self._backward_tasks = set()
        self._stale_roots = set()
        self._in_closure = False
        self._closure_calls = 0
        self._closure_checked = False
        self._loss_requires_grad = None
        self._activation_before_loss = None
        self._output.reset()

    def will_record(self, step: int) -> bool:
        """Whether `step` is to be recorded (every `every`-th, or forced by a NaN/Inf loss)."""
        if self.guard.is_off("record"):  # switched off by an error: hooks come off too
            return False
        forced = self._force_record and not self._sharded
        return forced or step % self.every == 0

    def observe_loss(self, loss: object) -> None:
        """Read the loss's graph on a recorded step (see signals.loss_graph)."""
        if self.recording and not self.closed:
            found = activation_before_logit_loss(loss)
            read = isinstance(loss, torch.Tensor) and loss.grad_fn is not None
            # "" = the graph was read and shows none; None = there was no graph to read
            self._activation_before_loss = found if found is not None else ("" if read else None)

    def finish_step(self, loss: torch.Tensor | float | None,
                    loss_requires_grad: bool | None = None) -> StepRecord | None:
        """End the current step: its record if it was recorded (None otherwise, or when
        recording failed), then get ready for the next one."""
        if loss is not None:
            self.losses.add(self.step, loss)
        self._loss_requires_grad = loss_requires_grad
        self.guard.call("flight", self.flight.end_step, self.step, self.recording)
        record = None
        if self.recording and not self.guard.is_off("record"):
            record = self.guard.call("record", self._record_step)
            self._batch = DeviceBatch()  # nothing a failed recording queued may leak onward
        elif self.losses.full:
            self.guard.call("loss", self._flush_losses)
        self._tensor_hooks.remove()  # this step's output-gradient hooks have done their job
        self._prev_stepped = self._stepped or not self.optimizers
        self._stepped = False
        was_recording = self.recording
        if was_recording:
            self._reset_step_state()
        else:  # an unrecorded step leaves the rest as the last reset left it
            self._loss_requires_grad = None
        self.step += 1
        self.recording = self.will_record(self.step)
        self._force_record = False
        if self.recording and not was_recording:
            self._begin_recording()
        elif was_recording and not self.recording:
            self._detach_recording_hooks()
        return record

    def flush_losses(self) -> bool:
        """Move the losses waiting on the device into the history now (one transfer);
        whether there were any."""
        return bool(self.guard.call("loss", self._flush_losses))

    def peek_flight(self) -> FlightLog | None:
        """The flight recorder's steps since the last record (one transfer), kept for the
        next record too; None when there are none."""
        return self.guard.call("flight", self._peek_flight)

    def _peek_flight(self) -> FlightLog | None:
        batch = DeviceBatch()
        self.flight.put(batch, self.step)
        return self.flight.result(batch.fetch(), self.step, keep=True)

    def _flush_losses(self) -> dict[int, float]:
        moved = self.losses.flush()
        if any_nonfinite(moved):
            self._force_record = True
        return moved

    def _record_step(self) -> StepRecord:
        n = len(self.layout.params)
        if len(self._read) < n:  # gradients that no optimizer hook read
            remaining = [i for i in range(n) if i not in self._read]
            self.guard.call("gradients", self._read_grads, remaining)
        if self._orphans:
            self.guard.call("updates", self._updates.after, self._orphans, self._batch,
                            self.step, self._next_is_recorded())
        self.losses.put(self._batch)
        act_names: list[str] = []
        if self.activations is not None:
            act_names = self.guard.call("activations", self.activations.put, self._batch) or []
        self.guard.call("data", self._data.put, self._batch)
        self.guard.call("output", self._output.put, self._batch)
        self.guard.call("flight", self.flight.put, self._batch, self.step)
        self._check_forward_seen()
        host = self._batch.fetch(_param_sizes(n))
        losses = self.losses.take(host)
        if any_nonfinite(losses):
            self._force_record = True
        table = None
        if act_names and self.activations is not None:
            table = (self.guard.call("activations", self.activations.results, host)
                     or ActivationTable.empty())
        record = self._build_record(host, losses.get(self.step, math.nan), table)
        if table is not None:
            record.nonfinite_origin = nonfinite_origin(table)
        record.data = self.guard.call("data", self._data.result, host)
        record.output = self.guard.call("output", self._output.result, host)
        record.activation_before_loss = self._activation_before_loss
        record.flight = self.guard.call("flight", self.flight.result, host, self.step)
        self.guard.call("gradients", self._count_nonfinite_grads, record)
        self._held_grads = {}
        return record

    def _build_record(self, host: dict[str, np.ndarray], loss: float,
                      activations: ActivationTable | None = None) -> StepRecord:
        n = len(self.layout.params)
        update_ratio, changed = (self.guard.call("updates", self._updates.results, host, n)
                                 or (np.full(n, np.nan), np.full(n, np.nan)))
        tensors = self.layout.tensors
        requires_grad = np.fromiter(map(_REQUIRES_GRAD, tensors), dtype=bool, count=n)
        if self.optimizers:
            held = self.optimizer_param_ids()
            not_in_optimizer = requires_grad & ~np.fromiter(
                map(held.__contains__, map(id, tensors)), dtype=bool, count=n)
        else:
            not_in_optimizer = np.zeros(n, dtype=bool)
        lrs = [float(g["lr"]) if isinstance(g.get("lr"), (int, float)) else math.nan
               for opt in self.optimizers for g in opt.param_groups]
        return StepRecord(
            step=self.step,
            loss=loss,
            stepped=self._stepped,
            skipped=bool(self.optimizers) and not self._stepped,
            lrs=lrs,
            grad_norm=_field(host, "grad_norm", n),
            grad_max=_field(host, "grad_max", n),
            grad_nonfinite=np.zeros(n),
            grad_none=self._grad_none.copy(),
            param_norm=_field(host, "param_norm", n),
            update_ratio=update_ratio,
            changed=changed,
            stale_grad=_field(host, "stale_grad", n),
            not_in_optimizer=not_in_optimizer,
            requires_grad=requires_grad,
            backward_count=self._backward_count,
            loss_requires_grad=self._loss_requires_grad,
            activations=activations if activations is not None else ActivationTable.empty(),
        )

    def _count_nonfinite_grads(self, record: StepRecord) -> None:
        if np.isfinite(record.grad_norm).all():  # the common case: all measured and finite
            return
        bad = np.flatnonzero(np.isinf(record.grad_norm)).tolist()
        # a held gradient that went into the norm kernels but came back NaN holds NaN itself
        bad += [i for i in np.flatnonzero(np.isnan(record.grad_norm)).tolist()
                if i in self._held_grads and measurable(self._held_grads[i])]
        if not bad:
            return
        # NaN in grad_norm means "no gradient"; a gradient holding NaN is stored as inf.
        record.grad_norm[bad] = np.inf
        record.grad_max[bad] = np.inf
        put_nonfinite_counts([self._held_grads.get(i) for i in bad], bad, self._batch)
        counts = self._batch.fetch({"grad_nonfinite": len(record.grad_norm)})
        record.grad_nonfinite = np.nan_to_num(counts.get("grad_nonfinite",
                                                         record.grad_nonfinite), nan=0.0)
        names = self.layout.param_names
        record.nonfinite_grad_params = [names[i] for i in sorted(bad, reverse=True)
                                        if record.grad_nonfinite[i] > 0]

    def _check_forward_seen(self) -> None:
        """Warn once when gradients were computed but no leaf module's forward hook ran."""
        if self.activations is None:
            return
        calls, self.activations.hook_calls = self.activations.hook_calls, 0
        if (self._warned_no_forward or calls or not self._held_grads
                or self.guard.is_off("activations")):
            return
        self._warned_no_forward = True
        warnings.warn(
            "gradscope: gradients were computed but no forward of the model reached gradscope's "
            "module hooks, so activation statistics (dead/saturated units, NaN origin) are not "
            "recorded; this happens under torch.compile, whose compiled code runs no Python "
            "hooks. Gradients, updates and the loss are still measured. For activation "
            "statistics run a few steps without torch.compile; to keep input statistics, watch "
            "the compiled module: gradscope.watch(torch.compile(model), optimizer).",
            GradscopeWarning,
            stacklevel=7,  # the user's scope.step() call
        )


def nonfinite_origin(activations: ActivationTable) -> str | None:
    """The first module (in completion order) whose output went non-finite from finite inputs.

    A container is a candidate only when none of its submodules is one (its NaN came from
    its own code, not from a child), so the innermost origin wins whatever the hook order.

    Example:
        >>> nonfinite_origin(ActivationTable.empty()) is None
        True
    """
    hit = np.flatnonzero((activations.column("nonfinite_frac") > 0)
                         & (activations.input_nonfinite == 0)).tolist()
    if not hit:
        return None
    names = activations.names
    found = {names[i]: int(activations.orders[i]) for i in hit}
    inner = [(order, name) for name, order in found.items()
             if not any(other != name and (name == "" or other.startswith(name + "."))
                        for other in found)]
    return min(inner)[1] if inner else None


@functools.cache
def _param_sizes(count: int) -> dict[str, int]:
    """The transfer's array length of every per-parameter field (shared: never changed)."""
    return {name: count for name in PARAM_FIELDS}


def _field(host: dict[str, np.ndarray], name: str, count: int) -> np.ndarray:
    """The per-parameter field `name` from the host values (all NaN when none came)."""
    found = host.get(name)
    return found if found is not None else np.full(count, np.nan)


def _closure(args: Any, kwargs: Any) -> tuple[Any, bool]:
    """(the closure given to optimizer.step, whether it was positional), or (None, False);
    torch hands step hooks the optimizer itself as args[0]."""
    if len(args) > 1 and callable(args[1]):
        return args[1], True
    closure = kwargs.get("closure")
    return (closure, False) if callable(closure) else (None, False)


def _raise(err: Exception) -> None:
    """Re-raise `err` under a guard (which records it and switches its piece off)."""
    raise err
