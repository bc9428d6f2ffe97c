"""Scope: the object watch() returns; wires a StepRecorder, a Diagnoser and the sinks."""

from __future__ import annotations

import atexit
import contextlib
import sys
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .diagnoser import Diagnoser
from .diagnosis import Diagnosis
from .errors import GradscopeError, GradscopeWarning
from .guard import Guard
from .history import History, StepRecord
from .layout import ModelLayout
from .losses import LossBuffer, scalar_loss
from .options import WatchOptions
from .recorder import StepRecorder
from .report.sinks import DiagnosisSink, Sink
from .signals.distributed import is_rank_zero

#: What watch() takes as `optimizer`: one torch optimizer, several, or none.
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None

# model -> its open scope, both held weakly: a model nobody uses any more can be collected
_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Scope]] = weakref.WeakKeyDictionary()


def _as_optimizers(model: nn.Module, optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    given: list[Any] = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    model_params = {id(p) for p in model.parameters()}
    for opt in given:
        if not isinstance(opt, torch.optim.Optimizer):
            raise GradscopeError(
                f"watch() expected a torch.optim.Optimizer (or a list of them) as optimizer, got "
                f"{type(opt).__name__}; pass the optimizer that steps this model, or leave it out."
            )
    optimizers: list[torch.optim.Optimizer] = given
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

    Made by :func:`gradscope.watch`; see there for an example. The work is done by a
    StepRecorder (hooks, one StepRecord per recorded step), a LossBuffer (the losses of
    unrecorded steps), a Diagnoser (the rules at their cadence) and the sinks (live view,
    run log, exporters); the Scope validates, wires them together and answers the user.
    """

    def __init__(
        self, model: nn.Module, optimizer: Optimizers = None, options: WatchOptions | None = None
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
        # several optimizers may train opposing objectives (a GAN): rules read this
        self.layout.static("optimizers", lambda: len(self.optimizers))
        if not any(p.requires_grad for p in self.layout.params):
            warnings.warn(
                "gradscope: the model has no parameter with requires_grad=True, so there are no "
                "gradients to watch; only the loss, activations and inputs are recorded.",
                GradscopeWarning,
                stacklevel=3,
            )
        self.history = History(self.layout, capacity=self.options.history_size)
        self._guard = Guard()
        self._closed = False
        self.losses = LossBuffer(self.history)
        self.recorder = StepRecorder(model, self.layout, self.optimizers, self.options,
                                     self.losses, self._guard)
        from .rules.engine import RuleEngine

        self.engine = RuleEngine.from_options(self.options, self.layout)
        self.diagnoser = Diagnoser(self.engine, self.history, self.options.every)
        self._sinks: list[Sink] = []
        try:
            self.recorder.attach()
            self._sinks = self._make_sinks()
        except BaseException:
            self.recorder.detach()
            raise
        _WATCHED[model] = weakref.ref(self)
        # the hooks on the model hold the recorder; the recorder holds this scope, so a scope
        # whose model is still in use is not collected with its hooks left behind
        self.recorder.owner = self
        # a run that ends without close() still gets its end (losses, rules, the log's end entry)
        self._at_exit = _CloseAtExit(self)
        atexit.register(self._at_exit)

    def _make_sinks(self) -> list[Sink]:
        from .report import sinks

        if not self._reports_here():
            return []  # under torch.distributed only rank 0 shows and writes, by default
        return sinks.make_sinks(self.options, self.history, self.layout,
                                self.diagnoser.diagnoses)

    def _reports_here(self) -> bool:
        return self.options.all_ranks or is_rank_zero()

    # ----------------------------------------------------------------- step lifecycle
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
        value, requires_grad = scalar_loss(loss)
        if self.recorder.recording:  # the loss graph is read on recorded steps only
            self._guard.call("loss graph", self.recorder.observe_loss, loss)
        record = self._guard.call("step", self.recorder.finish_step, value, requires_grad)
        if record is not None:
            self._guard.call("record", self._publish, record)

    def _publish(self, record: StepRecord) -> None:
        """Store a new record, run the rules if they are due, and hand both to the sinks."""
        self.history.append(record)
        changed = self.diagnoser.feed(record)
        for sink in self._sinks:
            self._guard.call(type(sink).__name__, sink.on_record, record, changed)

    def _bring_up_to_date(self) -> None:
        """Move waiting losses into the history and run the rules on unseen records, telling
        the sinks what changed (before diagnose(), report(), plot() and close() answer)."""
        moved = self.recorder.flush_losses()
        # the flight recorder's steps after the last record (their first NaN/Inf, if any)
        tail = self.recorder.peek_flight()
        if tail is not None and self.history.last is not None:
            self.history.flight_tail = tail
        changed = self.diagnoser.catch_up(new_losses=moved or tail is not None)
        if not changed:
            return
        step = self.history.last.step if self.history.last is not None else self.step_count
        for sink in self._sinks:
            if isinstance(sink, DiagnosisSink):
                self._guard.call(type(sink).__name__, sink.on_diagnoses, step, changed)

    def add_sink(self, sink: Sink) -> None:
        """Feed `sink` every recorded step: `sink.on_record(record, new_diagnoses)`, and
        `sink.on_close()` at close (e.g. gradscope.integrations.tensorboard's exporter).
        An optional `sink.on_diagnoses(step, new_diagnoses)` also gets the diagnoses that
        the rules find when they catch up on unseen records (at close, or in diagnose()).
        A sink must not run the rules (no `scope.diagnose()` inside it): the diagnoses as of
        the rules' last run are `scope.diagnoser.diagnoses()`.

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
        if not isinstance(sink, Sink):
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
        self.recorder.read_gradients(optimizer)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def step_count(self) -> int:
        """How many times step() has been called."""
        return self.recorder.step

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
        self.recorder.detach()
        atexit.unregister(self._at_exit)
        ref = _WATCHED.get(self.model)
        if ref is not None and ref() is self:
            del _WATCHED[self.model]
        self._guard.call("record", self._bring_up_to_date)
        for sink in self._sinks:
            self._guard.call(type(sink).__name__, sink.on_close)

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def diagnose(self) -> list[Diagnosis]:
        """Current diagnoses, most severe first, covering every step so far (closed or not).

        Example:
            >>> import torch, gradscope
            >>> scope = gradscope.watch(torch.nn.Linear(2, 2)); scope.close()
            >>> scope.diagnose()
            []
        """
        self._guard.call("record", self._bring_up_to_date)
        return self.diagnoser.diagnoses()

    def report(self, file: IO[str] | None = None, width: int | None = None) -> str:
        """Print the report of every step so far and return its plain text.

        On a terminal it is printed in colour, in Jupyter displayed once (the returned text
        does not echo it again), to `file` (or a pipe) written as plain text. The returned
        value is a `str` subclass: `str()`, `print()`, comparisons and writes see the text.

        Example:
            >>> import io, torch, gradscope
            >>> scope = gradscope.watch(torch.nn.Linear(2, 2)); scope.close()
            >>> scope.report(file=io.StringIO()).splitlines()[0]
            'gradscope report'
        """
        from .report.summary import emit_report

        if file is None and not self._reports_here():
            import io  # under torch.distributed only rank 0 prints, by default

            file = io.StringIO()
        return emit_report(self.history, self.diagnose(), file=file, width=width,
                           rules_checked=len(self.engine.rules))

    def plot(self, path: str | Path | None = None, step: int | None = None) -> Any:
        """Draw the gradient-norm figure: save it to `path` (.png, .svg or .pdf) and return the
        path, or return the matplotlib figure when no path is given. In Jupyter the figure is
        shown inline either way (once per call).
        """
        from .report.plots import plot

        return plot(self.history, self.diagnose(), path, step=step)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<gradscope.Scope {state}: {len(self.layout.params)} parameters, "
                f"{self.step_count} steps, {self.history.total_recorded} recorded>")


class _CloseAtExit:
    """Closes a scope still open at interpreter exit, unless an uncaught exception ended the
    program (then the run log keeps no end entry: the run did not finish). Holds the scope
    weakly, so an unused scope can still be collected."""

    def __init__(self, scope: Scope) -> None:
        self._scope = weakref.ref(scope)
        self._crash_before = getattr(sys, "last_value", None)  # an earlier one is not ours

    def __call__(self) -> None:
        scope = self._scope()
        if scope is None or scope.closed:
            return
        if getattr(sys, "last_value", None) is not self._crash_before:
            return
        with contextlib.suppress(Exception):
            scope.close()


def watch(model: nn.Module, optimizer: Optimizers = None, **options: Any) -> Scope:
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
