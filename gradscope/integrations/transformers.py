"""Hugging Face transformers: a TrainerCallback that watches the model for the whole train().

Example:
    >>> from transformers import Trainer
    >>> from gradscope.integrations.transformers import GradscopeCallback
    >>> callback = GradscopeCallback(every=10)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data,
    ...                   callbacks=[callback])                    # doctest: +SKIP
    >>> trainer.train(); callback.scope.diagnose()                 # doctest: +SKIP

Where gradients are read: in the torch optimizer's step pre-hook, which runs right after the
Trainer's `on_pre_optimizer_step` event. The Trainer clips gradients (`max_grad_norm`, 1.0 by
default) *before* that event, so gradscope sees clipped gradients: the profile across layers is
kept, but a gradient explosion shows up capped. Train with `max_grad_norm=0` while diagnosing
to see the raw norms (the Trainer also logs the pre-clip total as `grad_norm`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as err:
    raise ImportError(
        "gradscope.integrations.transformers needs Hugging Face transformers; install it with "
        "`pip install transformers`."
    ) from err

from ..checklist import Checkup
from ..guard import Guard
from ..hooks import HookSet
from ..scope import Scope, watch
from ..signals.distributed import is_rank_zero
from ._common import StepLoss, guarded, torch_optimizer


class GradscopeCallback(TrainerCallback):
    """Watch the model during `Trainer.train()` and explain what goes wrong.

    - `on_train_begin`: `gradscope.watch(model, optimizer, **watch_options)` (the torch optimizer
      inside accelerate's wrapper, so its step hooks see the real steps);
    - gradients are read in that optimizer's step pre-hook: after all micro-batches of
      `gradient_accumulation_steps`, after AMP unscale, and after the Trainer's clipping;
    - `on_step_end` (once per optimizer step): `scope.step(loss)`, the loss of that step's
      micro-batches taken from the model outputs (`outputs.loss`), or no loss if the model
      returns none;
    - `on_train_end`: removes every hook and prints the report on the main process
      (`report=False` turns it off). `callback.scope` stays readable afterwards.
    - `checkup=True` (or a dict of `gradscope.checkup` options, e.g. `{"quick": True}`): on the
      first training forward, before any update, runs `gradscope.checkup()` on copies of the
      model with that batch and prints its report; the result is `callback.checkup`.

    Example:
        >>> cb = GradscopeCallback(every=5, report=False)
        >>> cb.scope is None
        True
    """

    def __init__(self, report: bool = True, checkup: bool | dict[str, Any] = False,
                 **watch_options: Any) -> None:
        self.report = report
        self.watch_options = watch_options
        self.scope: Scope | None = None
        self.checkup_setting = checkup
        self.checkup: Checkup | None = None
        self._checkup_pending = False
        self._optimizer: torch.optim.Optimizer | None = None
        self._loss = StepLoss()
        self._loss_hooks = HookSet()
        self._loss_is_global = False
        self._read_at_event = False
        self._once = Guard("callback step")
        self._guard = Guard()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        if self.scope is not None and not self.scope.closed:
            self.scope.close()
        inner = torch_optimizer(optimizer)
        # without a torch optimizer (e.g. DeepSpeed's) the gradients are read at the
        # on_pre_optimizer_step event instead of in the optimizer's pre-hook
        self._read_at_event = inner is None
        self.scope = watch(model, inner, **self.watch_options)
        self._optimizer = inner
        self._checkup_pending = bool(self.checkup_setting)
        self._loss.clear()
        self._once.call("loss", self._attach_loss_hooks, model)

    def _attach_loss_hooks(self, model: nn.Module) -> None:
        self._loss_hooks.add(model.register_forward_pre_hook(
            self._guard.wrap("loss", self._on_input), with_kwargs=True))
        self._loss_hooks.add(model.register_forward_hook(self._guard.wrap("loss", self._on_output)))

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # With `num_items_in_batch` the model divides by the token count of the whole
        # accumulated batch, so the step's loss is the sum over micro-batches, not the mean.
        self._loss_is_global = kwargs.get("num_items_in_batch") is not None
        if self._checkup_pending and module.training and torch.is_grad_enabled():
            self._checkup_pending = False  # the first training batch, before any update
            self._once.call("checkup", self._run_checkup, module, kwargs)

    def _run_checkup(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        from ..checklist.frameworks import transformers_checkup

        self.checkup = transformers_checkup(model, inputs, self._optimizer,
                                            self.checkup_setting)
        if self.report and is_rank_zero():
            self.checkup.report()

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        self._loss.add(loss)

    @guarded("gradients")
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._read_at_event and self.scope is not None and not self.scope.closed:
            self.scope.read_gradients()

    @guarded("step")
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.scope is None or self.scope.closed:
            return
        self.scope.step(self._loss.value("sum" if self._loss_is_global else "mean"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._loss_hooks.remove()
        if self.scope is None:
            return
        self._once.call("close", self.scope.close)
        if self.report and getattr(state, "is_world_process_zero", True):
            self._once.call("report", self.scope.report)


__all__ = ["GradscopeCallback"]
