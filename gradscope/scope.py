"""Scope: attaches gradscope to a model and optimizer(s) and runs the per-step lifecycle."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import GradscopeError, GradscopeWarning
from .history import History, StepRecord
from .hooks import Guard, HookSet
from .layout import ModelLayout
from .options import WatchOptions
from .signals.activations import (
    ActivationCollector,
    ActivationStats,
    ActivationTable,
    _float_leaves,
    compiling,
    in_backward,
)
from .signals.data import DataCollector, first_tensor
from .signals.distributed import is_rank_zero, is_sharded
from .signals.grads import (
    measurable,
    put_grad_stats,
    put_nonfinite_counts,
    put_param_norms,
    put_stale_grad_norms,
)
from .signals.transfer import DeviceBatch
from .signals.updates import UpdateTracker

# model -> its open scope, both held weakly: a model nobody uses any more can be collected
_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Scope]] = weakref.WeakKeyDictionary()


def _as_optimizers(model: nn.Module, optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    model_params = {id(p) for p in model.parameters()}
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise GradscopeError(
                f"watch() expected a torch.optim.Optimizer (or a list of them) as optimizer, got "
                f"{type(opt).__name__}; pass the optimizer that steps this model, or leave it out."
            )
    held = [
        any(id(p) in model_params for g in opt.param_groups for p in g["params"])
        for opt in optimizers
    ]
    if not any(held):
        raise GradscopeError(
            "the optimizer passed to watch() holds none of the model's parameters; pass the "
            "optimizer built from this model's parameters (e.g. Adam(model.parameters()))."
        )
    return optimizers


class Scope:
    """A watched model: collects signals every step and diagnoses them on demand.

    Made by :func:`gradscope.watch`; see there for an example.
    """

    def __init__(
        self, model: nn.Module, optimizer: Any = None, options: WatchOptions | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradscopeError(
                f"watch() needs a torch.nn.Module as its first argument, got "
                f"{type(model).__name__}; pass your model, e.g. gradscope.watch(model, optimizer)."
            )
        open_scope = _WATCHED[model]() if model in _WATCHED else None
        if open_scope is not None and not open_scope.closed:
            raise GradscopeError(
                "this model is already watched by an open scope; call close() on that scope "
                "first, or keep using it instead of calling watch() again."
            )
        self.options = options or WatchOptions()
        self.model = model
        self.optimizers = _as_optimizers(model, optimizer)
        self.layout = ModelLayout.of(model)
        if not any(p.requires_grad for p in self.layout.params):
            warnings.warn(
                "gradscope: the model has no parameter with requires_grad=True, so there are no "
                "gradients to watch; only the loss, activations and inputs are recorded.",
                GradscopeWarning,
                stacklevel=3,
            )
        self.history = History(self.layout, capacity=self.options.history_size)
        self._guard = Guard()
        self._hooks = HookSet()
        self._recording_hooks = HookSet()
        self._tensor_hooks = HookSet()
        self._batch = DeviceBatch()
        self._index = {id(t): i for i, t in enumerate(self.layout.tensors)}
        self._updates = UpdateTracker(self.layout.tensors, self.options.update_sample)
        self._activations = (
            ActivationCollector(model, self._guard, self.options.nonfinite_origin)
            if self.options.activations
            else None
        )
        self._data = DataCollector()
        # sharded (FSDP2) gradients are combined by a collective on recorded steps, so every
        # rank must record the same steps: no extra recording triggered by this rank's loss
        self._sharded = any(is_sharded(t) for t in self.layout.tensors)
        self._warned_no_forward = False
        self._step = 0
        self._closed = False
        self._pending_losses: list[tuple[int, torch.Tensor | float]] = []
        self._force_record = False
        self._stepped = False
        self._prev_stepped = False
        self._backward_count = 0
        self._stale_checked = False
        self._loss_requires_grad: bool | None = None
        self._reset_step_state()
        from .rules.engine import RuleCadence, RuleEngine

        self.engine = RuleEngine.from_options(self.options, self.layout)
        self._cadence = RuleCadence(self.options.every)
        self._sinks: list[Any] = []
        try:
            self._attach()
            self._sinks = self._make_sinks()
        except BaseException:
            self._detach()
            raise
        _WATCHED[model] = weakref.ref(self)
        self._recording = True
        self._begin_step()

    # ----------------------------------------------------------------- attach / detach
    def _attach(self) -> None:
        for opt in self.optimizers:
            # each signal inside is guarded on its own: one failing never stops the others
            self._hooks.add(opt.register_step_pre_hook(
                self._guard.wrap("optimizer", self._on_optimizer_pre)))
            self._hooks.add(opt.register_step_post_hook(
                self._guard.wrap("optimizer", self._on_optimizer_post)))

    def _make_sinks(self) -> list[Any]:
        from .report.sinks import make_sinks

        if not self._reports_here():
            return []  # under torch.distributed only rank 0 shows and writes, by default
        return make_sinks(self)

    def _reports_here(self) -> bool:
        return self.options.all_ranks or is_rank_zero()

    def _detach(self) -> None:
        self._hooks.remove()
        self._recording_hooks.remove()
        self._tensor_hooks.remove()
        if self._activations is not None:
            self._activations.detach()

    def _attach_recording_hooks(self) -> None:
        root = self.model
        self._recording_hooks.add(root.register_forward_pre_hook(
            self._guard.wrap("data", self._on_root_input), with_kwargs=True))
        self._recording_hooks.add(root.register_forward_hook(
            self._guard.wrap("accumulation", self._on_root_output)))
        if self._activations is not None:
            self._activations.attach()

    def _detach_recording_hooks(self) -> None:
        self._recording_hooks.remove()
        self._tensor_hooks.remove()
        if self._activations is not None:
            self._activations.detach()

    # ----------------------------------------------------------------- hooks
    def _training_forward(self, module: nn.Module) -> bool:
        return (not compiling() and module.training and torch.is_grad_enabled()
                and not in_backward())

    def _on_root_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._closed or not self._training_forward(module):
            return
        tensor = first_tensor(args, kwargs)
        if tensor is not None:
            self._data.observe(tensor)

    def _on_root_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Any forward whose output is later backpropagated counts, eval mode included
        # (fine-tuning with dropout off); outputs that never get a backward cost nothing.
        if self._closed or compiling() or not torch.is_grad_enabled() or in_backward():
            return
        # every output that needs grad: the loss may come from any of them
        for leaf in _float_leaves(output):
            if leaf.requires_grad:
                self._tensor_hooks.add(
                    leaf.register_hook(self._guard.wrap("accumulation", self._on_backward_start)))

    def _on_backward_start(self, grad: torch.Tensor) -> None:
        if self._closed:
            return
        task = torch._C._current_graph_task_id()  # one id per backward() call
        if task in self._backward_tasks:
            return
        self._backward_tasks.add(task)
        self._backward_count += 1
        if self._backward_count == 1 and self._prev_stepped and not self._stale_checked:
            self._stale_checked = True
            # Parameters outside every optimizer are never cleared by optimizer.zero_grad()
            # and never stepped, so leftover gradient there is harmless: check the others.
            held = {id(p) for opt in self.optimizers for g in opt.param_groups
                    for p in g["params"]}
            indices = [i for i, p in enumerate(self.layout.tensors)
                       if p.requires_grad and (not held or id(p) in held)]
            put_stale_grad_norms([self.layout.tensors[i] for i in indices], indices, self._batch)

    def _optimizer_indices(self, optimizer: torch.optim.Optimizer) -> list[int]:
        seen: list[int] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                i = self._index.get(id(p))
                if i is not None and i not in self._read:
                    seen.append(i)
        return seen

    def _on_optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed or not self._recording:
            return
        indices = self._optimizer_indices(optimizer)
        self._guard.call("gradients", self._read_grads, indices)
        # gradients read earlier by read_gradients() still get their update measured
        early = [i for g in optimizer.param_groups for p in g["params"]
                 if (i := self._index.get(id(p))) in self._read_early]
        self._read_early.difference_update(early)
        indices = indices + early
        self._guard.call("updates", self._updates.before, indices, self._step)
        self._stepping[id(optimizer)] = indices
        if self._orphans is None:
            self._orphans = self._params_outside_optimizers()
            self._guard.call("updates", self._updates.before, self._orphans, self._step)

    def _params_outside_optimizers(self) -> list[int]:
        """Trainable parameters in no optimizer: their change is measured over the whole step."""
        held = {id(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        return [i for i, p in enumerate(self.layout.tensors)
                if p.requires_grad and id(p) not in held]

    def _on_optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        self._stepped = True
        if not self._recording:
            return
        indices = self._stepping.pop(id(optimizer), [])
        self._guard.call("updates", self._updates.after, indices, self._batch, self._step,
                         self._keeps_snapshots())

    def _keeps_snapshots(self) -> bool:
        """Whether the next step is recorded too: then its before-step bit sums are this
        step's after-step ones (the update tracker keeps them)."""
        return self._should_record(self._step + 1)

    def _read_grads(self, indices: list[int]) -> None:
        if not indices:
            return
        tensors = [self.layout.tensors[i] for i in indices]
        grads = put_grad_stats(tensors, indices, self._batch)
        put_param_norms(tensors, indices, self._batch, "param_norm")
        for i, p, g in zip(indices, tensors, grads):
            self._read.add(i)
            self._grad_none[i] = p.requires_grad and g is None
            if g is not None:
                self._held_grads[i] = g

    # ----------------------------------------------------------------- step lifecycle
    def _reset_step_state(self) -> None:
        n = len(self.layout.params)
        self._read: set[int] = set()
        self._read_early: set[int] = set()
        self._held_grads: dict[int, torch.Tensor] = {}
        self._grad_none = np.zeros(n, dtype=bool)
        self._stepping: dict[int, list[int]] = {}
        self._orphans: list[int] | None = None
        self._backward_count = 0
        self._backward_tasks: set[int] = set()
        self._stale_checked = False
        self._loss_requires_grad = None

    def _should_record(self, step: int) -> bool:
        if self._guard.is_off("record"):  # switched off by an error: hooks come off too
            return False
        forced = self._force_record and not self._sharded
        return forced or step % self.options.every == 0

    def _begin_step(self) -> None:
        if self._recording:
            self._guard.call("activations", self._attach_recording_hooks)

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Mark the end of one training iteration; call it once per optimizer step.

        Example:
            >>> import torch, gradscope
            >>> model = torch.nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
            >>> scope = gradscope.watch(model, opt)
            >>> loss = model(torch.randn(4, 3)).pow(2).mean(); loss.backward(); opt.step()
            >>> scope.step(loss); scope.close()
        """
        if self._closed:
            raise GradscopeError(
                "step() was called after close(); call gradscope.watch(model, optimizer) again "
                "to watch a new run (diagnose(), report() and plot() still work on this one)."
            )
        value = self._check_loss(loss)
        self._guard.call("step", self._finish_step, value)

    def _check_loss(self, loss: Any) -> torch.Tensor | float | None:
        if loss is None:
            return None  # no loss this step: nothing is recorded for it (not a NaN loss)
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise GradscopeError(
                    f"step() needs the scalar training loss, got a tensor of shape "
                    f"{tuple(loss.shape)}; reduce it first (e.g. loss.mean()) or pass the value "
                    "you called backward() on."
                )
            self._loss_requires_grad = loss.requires_grad
            return loss.detach().reshape(())
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return float(loss)
        raise GradscopeError(
            f"step() needs the loss as a tensor or a number, got {type(loss).__name__}; "
            "pass the value you called backward() on."
        )

    def _finish_step(self, loss: torch.Tensor | float | None) -> None:
        if loss is not None:
            self._pending_losses.append((self._step, loss))
        if self._recording and not self._guard.is_off("record"):
            self._guard.call("record", self._record_step)
            self._batch = DeviceBatch()  # nothing a failed recording queued may leak onward
        elif len(self._pending_losses) >= 1000:
            self._guard.call("loss", self._close_losses)
        self._tensor_hooks.remove()  # this step's output-gradient hooks have done their job
        self._prev_stepped = self._stepped or not self.optimizers
        self._stepped = False
        self._reset_step_state()
        self._step += 1
        was_recording = self._recording
        self._recording = self._should_record(self._step)
        self._force_record = False
        if self._recording and not was_recording:
            self._begin_step()
        elif was_recording and not self._recording:
            self._detach_recording_hooks()

    def _put_losses(self) -> None:
        tensors = [v for _, v in self._pending_losses if isinstance(v, torch.Tensor)]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        for group in by_device.values():
            self._batch.put("loss", torch.stack(group))

    def _flush_losses(self, host: dict[str, np.ndarray]) -> list[float]:
        tensor_values = iter(host.get("loss", np.array([])).tolist())
        # tensors were grouped by device; rebuild values in step order
        by_device: dict[torch.device, list[int]] = {}
        for pos, (_, v) in enumerate(self._pending_losses):
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(pos)
        values = [v if not isinstance(v, torch.Tensor) else math.nan
                  for _, v in self._pending_losses]
        for positions in by_device.values():
            for pos in positions:
                values[pos] = float(next(tensor_values))
        steps = [s for s, _ in self._pending_losses]
        self.history.add_losses(steps, values)
        self._pending_losses.clear()
        if any(not math.isfinite(v) for v in values):
            self._force_record = True
        return values

    def _record_step(self) -> None:
        n = len(self.layout.params)
        remaining = [i for i in range(n) if i not in self._read]
        self._guard.call("gradients", self._read_grads, remaining)
        if self._orphans:
            self._guard.call("updates", self._updates.after, self._orphans, self._batch,
                             self._step, self._keeps_snapshots())
        self._put_losses()
        act_names: list[str] = []
        if self._activations is not None:
            act_names = self._guard.call("activations", self._activations.put, self._batch) or []
        self._guard.call("data", self._data.put, self._batch)
        self._check_forward_seen(act_names)
        sizes = {f: n for f in ("grad_norm", "grad_max", "param_norm", "update_diff",
                                "update_base", "update_bits_moved", "stale_grad",
                                "grad_nonfinite")}
        host = self._batch.fetch(sizes)
        steps = [step for step, _ in self._pending_losses]
        losses = dict(zip(steps, self._flush_losses(host)))
        record = self._build_record(host, losses.get(self._step, math.nan))
        if act_names and self._activations is not None:
            record.activations = self._guard.call(
                "activations", self._activations.results, host) or {}
            record.nonfinite_origin = _nonfinite_origin(record.activations)
        record.data = self._guard.call("data", self._data.result, host)
        self._guard.call("gradients", self._count_nonfinite_grads, record)
        self._held_grads = {}
        self.history.append(record)
        diagnoses: list = []
        if self._cadence.due(record):
            diagnoses = self._evaluate_rules()
        for sink in self._sinks:
            self._guard.call(type(sink).__name__, sink.on_record, record, diagnoses)

    def _evaluate_rules(self) -> list:
        unseen = self._cadence.unevaluated
        self._cadence.ran()
        return self.engine.update(self.history, unseen)

    def _catch_up_rules(self) -> None:
        """Run the rules on records they have not seen yet (see RuleCadence), telling the
        sinks what changed."""
        if not self._cadence.unevaluated:
            return
        diagnoses = self._evaluate_rules()
        step = self.history.last.step if self.history.last is not None else self._step
        for sink in self._sinks:
            tell = getattr(sink, "on_diagnoses", None)
            if tell is not None and diagnoses:
                self._guard.call(type(sink).__name__, tell, step, diagnoses)

    def _build_record(self, host: dict[str, np.ndarray], loss: float) -> StepRecord:
        n = len(self.layout.params)
        nan = np.full(n, np.nan)
        update_ratio, changed = (self._guard.call("updates", self._updates.results, host, n)
                                 or (nan.copy(), nan.copy()))
        in_optimizer = {id(p) for opt in self.optimizers
                        for g in opt.param_groups for p in g["params"]}
        not_in_optimizer = np.array(
            [bool(self.optimizers) and p.requires_grad and id(p) not in in_optimizer
             for p in self.layout.tensors], dtype=bool)
        lrs = [float(g["lr"]) if isinstance(g.get("lr"), (int, float)) else math.nan
               for opt in self.optimizers for g in opt.param_groups]
        return StepRecord(
            step=self._step,
            loss=loss,
            stepped=self._stepped,
            skipped=bool(self.optimizers) and not self._stepped,
            lrs=lrs,
            grad_norm=host.get("grad_norm", nan.copy()),
            grad_max=host.get("grad_max", nan.copy()),
            grad_nonfinite=np.zeros(n),
            grad_none=self._grad_none.copy(),
            param_norm=host.get("param_norm", nan.copy()),
            update_ratio=update_ratio,
            changed=changed,
            stale_grad=host.get("stale_grad", nan.copy()),
            not_in_optimizer=not_in_optimizer,
            requires_grad=np.array([p.requires_grad for p in self.layout.tensors], dtype=bool),
            backward_count=self._backward_count,
            loss_requires_grad=self._loss_requires_grad,
        )

    def _count_nonfinite_grads(self, record: StepRecord) -> None:
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

    def _check_forward_seen(self, act_names: list[str]) -> None:
        """Warn once when gradients were computed but no leaf module's forward hook ran."""
        if self._activations is None:
            return
        calls, self._activations.hook_calls = self._activations.hook_calls, 0
        if (self._warned_no_forward or calls or not self._held_grads
                or self._guard.is_off("activations")):
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
            stacklevel=4,
        )

    def add_sink(self, sink: Any) -> None:
        """Feed `sink` every recorded step: `sink.on_record(record, new_diagnoses)`, and
        `sink.on_close()` at close (e.g. gradscope.integrations.tensorboard's exporter).
        An optional `sink.on_diagnoses(step, new_diagnoses)` also gets the diagnoses that
        the rules find when they catch up on unseen records (at close, or in diagnose()).

        Example:
            >>> import torch, gradscope
            >>> class Count:
            ...     n = 0
            ...     def on_record(self, record, diagnoses): self.n += 1
            ...     def on_close(self): pass
            >>> model = torch.nn.Linear(2, 1); scope = gradscope.watch(model, every=1)
            >>> sink = Count(); scope.add_sink(sink)
            >>> model(torch.ones(1, 2)).sum().backward(); scope.step(); scope.close(); sink.n
            1
        """
        if not (callable(getattr(sink, "on_record", None))
                and callable(getattr(sink, "on_close", None))):
            raise GradscopeError(
                f"add_sink() needs an object with on_record(record, diagnoses) and on_close() "
                f"methods, got {type(sink).__name__}."
            )
        self._sinks.append(sink)

    # ----------------------------------------------------------------- public API
    def read_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Read gradients now, replacing what the optimizer's pre-hook read this step.

        For loops where backward runs inside `optimizer.step(closure)` (Lightning, LBFGS):
        call it after backward and before the update (e.g. in `on_before_optimizer_step`).

        Example:
            >>> import torch, gradscope
            >>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
            >>> scope = gradscope.watch(model, opt)
            >>> model(torch.ones(1, 2)).sum().backward(); scope.read_gradients(opt)
            >>> scope.close()
        """
        if self._closed or not self._recording:
            return
        if optimizer is None:
            indices = list(range(len(self.layout.params)))
        else:
            indices = [self._index[id(p)] for g in optimizer.param_groups for p in g["params"]
                       if id(p) in self._index]
        self._read_early.update(indices)
        self._guard.call("gradients", self._read_grads, indices)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def step_count(self) -> int:
        """How many times step() has been called."""
        return self._step

    @property
    def failures(self) -> dict[str, str]:
        """Signals switched off after an internal error, with the error (empty when healthy)."""
        return self._guard.failures

    def close(self) -> None:
        """Remove every hook; the model and optimizer are left exactly as before watch().

        Example:
            >>> import torch, gradscope
            >>> model = torch.nn.Linear(2, 2)
            >>> scope = gradscope.watch(model); scope.close(); len(model._forward_hooks)
            0
        """
        if self._closed:
            return
        self._closed = True
        self._detach()
        self._held_grads = {}
        self._updates.reset()
        ref = _WATCHED.get(self.model)
        if ref is not None and ref() is self:
            del _WATCHED[self.model]
        if self._pending_losses:
            self._guard.call("step", self._close_losses)
        self._guard.call("record", self._catch_up_rules)
        for sink in self._sinks:
            self._guard.call(type(sink).__name__, sink.on_close)

    def _close_losses(self) -> None:
        self._batch = DeviceBatch()
        self._put_losses()
        self._flush_losses(self._batch.fetch())

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def diagnose(self) -> list:
        """Current diagnoses, most severe first (works after close() too).

        Example:
            >>> import torch, gradscope
            >>> scope = gradscope.watch(torch.nn.Linear(2, 2)); scope.close()
            >>> scope.diagnose()
            []
        """
        self._guard.call("record", self._catch_up_rules)
        return self.engine.diagnoses()

    def report(self, file: Any = None, width: int | None = None) -> str:
        """Print the final report (rich on a terminal, plain text to `file`); return its text."""
        from .report.summary import print_report

        if file is None and not self._reports_here():
            import io  # under torch.distributed only rank 0 prints, by default

            file = io.StringIO()
        return print_report(self, file=file, width=width)

    def plot(self, path: str | Path, step: int | None = None) -> Path:
        """Save the gradient-norm figure to `path` (.png, .svg or .pdf) and return the path."""
        from .report.plots import save_plot

        return save_plot(self.history, self.diagnose(), path, step=step)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<gradscope.Scope {state}: {len(self.layout.params)} parameters, "
                f"{self._step} steps, {self.history.total_recorded} recorded>")


def _nonfinite_origin(activations: Mapping[str, ActivationStats]) -> str | None:
    """The first module (in completion order) whose output went non-finite from finite inputs.

    A container is a candidate only when none of its submodules is one (its NaN came from
    its own code, not from a child), so the innermost origin wins whatever the hook order.
    """
    if isinstance(activations, ActivationTable):  # by columns, no object per module
        hit = np.flatnonzero((activations.column("nonfinite_frac") > 0)
                             & (activations.input_nonfinite == 0)).tolist()
        names = activations.names
        found = {names[i]: int(activations.orders[i]) for i in hit}
    else:
        found = {name: s.order for name, s in activations.items()
                 if s.nonfinite_frac > 0 and s.input_nonfinite == 0}
    inner = [(order, name) for name, order in found.items()
             if not any(other != name and (name == "" or other.startswith(name + "."))
                        for other in found)]
    return min(inner)[1] if inner else None


def watch(model: nn.Module, optimizer: Any = None, **options: Any) -> Scope:
    """Attach gradscope to `model` (and the optimizer(s) that step it) and return a Scope.

    Options: live, every, log_dir, rules, disable_rules, thresholds, history_size,
    update_sample, activations, nonfinite_origin, refresh_per_second, all_ranks (under
    torch.distributed only rank 0 prints and writes the run log unless all_ranks=True).

    Example:
        >>> import torch, gradscope
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradscope.watch(model, opt, every=1) as scope:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         loss.backward(); opt.step(); scope.step(loss)
        >>> scope.history.total_recorded
        3
    """
    return Scope(model, optimizer, WatchOptions.from_kwargs(options))


__all__ = ["Scope", "watch"]
