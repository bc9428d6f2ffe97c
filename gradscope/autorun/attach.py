"""Find the model, optimizer(s) and loss of a running script and feed them to a Scope.

Nothing here changes what the script computes. While attached it holds:

- a wrapper around ``torch.optim.Optimizer.__init__`` that remembers each optimizer built;
- torch's global optimizer step pre/post hooks: one gradscope step per round of optimizer
  steps (every optimizer that steps the watched model has stepped once);
- torch's global module forward hooks, only until the model is found: the model is the
  outermost running module whose parameters an optimizer holds;
- a wrapper around ``torch.autograd.backward`` (``Tensor.backward`` calls it): the loss is the
  scalar tensor backward() runs from; a GradScaler's scaled loss is mapped back to the loss;
- a wrapper around ``GradScaler.update``: an iteration whose step the scaler skipped (inf
  gradients) still ends a gradscope step, marked as skipped, as with ``watch()``.

``detach()`` puts every wrapped attribute back and removes every hook.
"""

from __future__ import annotations

import functools
import gc
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import GradscopeError
from ..hooks import Guard, HookSet
from ..integrations._common import StepLoss
from ..scope import Scope, watch


class AutoWatch:
    """Watches whatever a script trains, with no change to the script.

    Example:
        >>> import torch
        >>> auto = AutoWatch({"every": 1}); auto.attach()
        >>> model = torch.nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
        >>> for _ in range(2):
        ...     opt.zero_grad(); model(torch.randn(4, 3)).pow(2).mean().backward(); opt.step()
        >>> auto.detach(); auto.scope.step_count
        2
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.scope: Scope | None = None
        self.models: dict[str, nn.Module] = {}
        self.notes: list[str] = []
        self.backward_calls = 0
        self.optimizer_steps = 0
        self._guard = Guard("piece")
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._hooks = HookSet()
        self._forward_hooks = HookSet()
        self._restore: list[tuple[Any, str, Any]] = []
        self._depth = 0
        self._loss = StepLoss()
        self._scaled: list[tuple[weakref.ref[torch.Tensor], torch.Tensor]] = []
        self._round: set[int] = set()       # optimizers stepped since the last gradscope step
        self._expected: set[int] = set()    # optimizers one round is made of
        self._active = False                # backward or optimizer step since the last step
        self._in_step: torch.optim.Optimizer | None = None
        self._outside_warned: set[int] = set()
        self._attached = False
        self.refused: str | None = None

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        """Install the hooks and wrappers (see the module docstring)."""
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._attached = True
        self._wrap(torch.optim.Optimizer, "__init__", self._wrap_optimizer_init)
        self._wrap(torch.autograd, "backward", self._wrap_backward)
        scaler = _grad_scaler()
        if scaler is not None:
            self._wrap(scaler, "scale", self._wrap_scale)
            self._wrap(scaler, "update", self._wrap_update)
        self._hooks.add(register_optimizer_step_pre_hook(self._on_step_pre))
        self._hooks.add(register_optimizer_step_post_hook(self._on_step_post))
        self._forward_hooks.add(register_module_forward_pre_hook(self._on_forward_pre))
        self._forward_hooks.add(register_module_forward_hook(self._on_forward, always_call=True))

    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Consider an optimizer built before attach() (those built after are seen anyway)."""
        self._optimizers.add(optimizer)

    def detach(self) -> None:
        """Remove every hook, put every wrapped attribute back and close the scope."""
        if not self._attached:
            return
        self._attached = False
        self._hooks.remove()
        self._forward_hooks.remove()
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()
        if self.scope is not None and not self.scope.closed:
            if self._active:  # the last, unfinished step (training stopped mid-iteration)
                self._guard.call("step", self._step)
            self._guard.call("close", self.scope.close)
        self._scaled.clear()

    def _wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, make(original))
        self._restore.append((owner, name, original))

    # ------------------------------------------------------------------ wrappers
    def _wrap_optimizer_init(self, original: Callable[..., None]) -> Callable[..., None]:
        auto = self

        @functools.wraps(original)
        def __init__(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            auto._guard.call("optimizer", auto._optimizers.add, self)

        return __init__

    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._attached:
                return original(tensors, *args, **kwargs)
            self._guard.call("loss", self._on_backward, tensors)
            result = original(tensors, *args, **kwargs)
            self._guard.call("gradients", self._after_backward)
            return result

        return backward

    def _wrap_scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def scale(scaler: Any, outputs: Any) -> Any:
            scaled = original(scaler, outputs)
            if self._attached and isinstance(outputs, torch.Tensor):
                self._guard.call("loss", self._remember_scaled, scaled, outputs)
            return scaled

        return scale

    def _wrap_update(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def update(scaler: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(scaler, *args, **kwargs)
            if self._attached and self.scope is not None and self._active:
                # an iteration ends at update(); a step the scaler skipped ends here
                self._guard.call("step", self._step)
            return result

        return update

    # ------------------------------------------------------------------ loss
    def _remember_scaled(self, scaled: Any, loss: torch.Tensor) -> None:
        if isinstance(scaled, torch.Tensor):
            self._scaled = [(r, v) for r, v in self._scaled[-7:] if r() is not None]
            self._scaled.append((weakref.ref(scaled), loss))

    def _on_backward(self, tensors: Any) -> None:
        self.backward_calls += 1
        loss = tensors if isinstance(tensors, torch.Tensor) else None
        if loss is None and isinstance(tensors, (list, tuple)) and len(tensors) == 1:
            loss = tensors[0] if isinstance(tensors[0], torch.Tensor) else None
        if loss is None or loss.numel() != 1:
            return
        for ref, unscaled in self._scaled:
            if ref() is loss:
                loss = unscaled
                break
        if self.scope is not None:
            self._active = True
            self._loss.add(loss)

    def _after_backward(self) -> None:
        # backward inside optimizer.step(closure) (Lightning, LBFGS): the step pre-hook ran
        # before the gradients existed, so read them now, before the update
        opt = self._in_step
        if opt is not None and self.scope is not None and not self.scope.closed:
            self.scope.read_gradients(opt)

    # ------------------------------------------------------------------ optimizer steps
    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._guard.call("optimizer", self._step_pre, optimizer)

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._guard.call("optimizer", self._step_post, optimizer)

    def _step_pre(self, optimizer: torch.optim.Optimizer) -> None:
        self._depth = 0  # no module forward is running around an optimizer step
        self._in_step = optimizer
        if self.scope is None or not self._watches(optimizer):
            return
        key = id(optimizer)
        if key in self._round:
            # it steps again before the others: a round is only the optimizers seen so far
            self._expected = set(self._round)
            self._step()
        self._active = True

    def _step_post(self, optimizer: torch.optim.Optimizer) -> None:
        self._in_step = None
        self.optimizer_steps += 1
        if self.scope is None or not self._watches(optimizer):
            return
        self._round.add(id(optimizer))
        if self._expected <= self._round:
            self._step()

    def _watches(self, optimizer: torch.optim.Optimizer) -> bool:
        assert self.scope is not None
        if any(optimizer is o for o in self.scope.optimizers):
            return True
        if id(optimizer) not in self._outside_warned:
            self._outside_warned.add(id(optimizer))
            self.notes.append(
                f"a {type(optimizer).__name__} steps parameters outside the watched model "
                "(built after the model was found); its steps are not recorded")
        return False

    def _step(self) -> None:
        assert self.scope is not None
        self._round = set()
        self._active = False
        loss = self._loss.value("sum")
        if not self.scope.closed:
            self.scope.step(loss)

    # ------------------------------------------------------------------ finding the model
    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        depth, self._depth = self._depth, self._depth + 1
        if (depth == 0 and self.scope is None and self.refused is None
                and torch.is_grad_enabled()):
            self._guard.call("model", self._maybe_watch, module, args)

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)

    def _maybe_watch(self, module: nn.Module, args: Any) -> None:
        optimizers = [o for o in self._optimizers if _owns_its_params(o)]
        held = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        if not held or not any(id(p) in held for p in module.parameters()):
            return
        models = _models_for(module, held)
        owned = {id(p) for m in models for p in m.parameters()}
        used = [o for o in optimizers
                if any(id(p) in owned for g in o.param_groups for p in g["params"])]
        names = _names_in_main(models)
        root: nn.Module = models[0] if len(models) == 1 else nn.ModuleDict(
            dict(zip(names, models)))
        before = set(module._forward_pre_hooks)
        self._forward_hooks.remove()  # found: the global forward hooks cost time, drop them
        self._depth = 0
        try:
            self.scope = watch(root, used, **self.options)
        except GradscopeError as err:  # e.g. the script watches its model itself
            self.refused = str(err)
            return
        self.models = dict(zip(names, models))
        self._expected = {id(o) for o in used}
        if root is module:
            # the hooks watch() put on the model missed this call, its first: replay them
            for key, hook in list(module._forward_pre_hooks.items()):
                if key not in before:
                    kwargs_hook = key in module._forward_pre_hooks_with_kwargs
                    hook(module, args, {}) if kwargs_hook else hook(module, args)

    # ------------------------------------------------------------------ end of the run
    def missing(self) -> str | None:
        """One sentence saying what could not be found, or None when the scope is watching."""
        if self.refused is not None:
            return (f"it could not watch the model ({self.refused.rstrip('.')}), so the script "
                    "ran untouched.")
        if self.scope is not None:
            if self.scope.step_count == 0:
                return ("it found the model but no optimizer step ended a training "
                        "step, so there is nothing to report.")
            return None
        if not any(True for _ in self._optimizers) and not self.optimizer_steps:
            return ("it found no torch optimizer in this script, so it watched nothing; "
                    "the script ran untouched.")
        return ("it found an optimizer but no module whose forward ran with "
                "parameters that optimizer holds, so it watched nothing; the script ran "
                "untouched.")


def _grad_scaler() -> type | None:
    try:
        from torch.amp.grad_scaler import GradScaler
    except ImportError:  # pragma: no cover - older torch
        return None
    return GradScaler


def _owns_its_params(optimizer: torch.optim.Optimizer) -> bool:
    """False for wrappers (accelerate, Lightning) around another optimizer: that one steps."""
    inner = getattr(optimizer, "optimizer", None)
    return not isinstance(inner, torch.optim.Optimizer) or inner is optimizer


def _models_for(first: nn.Module, held: set[int]) -> list[nn.Module]:
    """The module(s) to watch: `first` (the first outermost running module holding optimizer
    parameters), or, when optimizers also hold parameters outside it, the smallest module
    holding them all, or else `first` plus the outermost modules holding the rest."""
    covered = {id(p) for p in first.parameters()}
    if held <= covered:
        return [first]
    modules = [m for m in _live_modules() if m is not first]
    covers = [m for m in modules if held <= {id(p) for p in m.parameters()}]
    if covers:
        return [min(covers, key=lambda m: sum(1 for _ in m.parameters()))]
    rest = []
    for m in modules:
        ids = {id(p) for p in m.parameters()}
        if ids and ids & held and not ids & covered:
            rest.append(m)
    inner = {id(sub) for m in rest for sub in m.modules() if sub is not m}
    return [first] + [m for m in rest if id(m) not in inner]


def _live_modules() -> Iterable[nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, nn.Module)]


def _names_in_main(models: list[nn.Module]) -> list[str]:
    """The script's own names for the models (its global variables), else model0, model1, ..."""
    main = sys.modules.get("__main__")
    found = {id(v): k for k, v in vars(main).items()
             if isinstance(v, nn.Module) and not k.startswith("_")} if main else {}
    names: list[str] = []
    for i, m in enumerate(models):
        name = found.get(id(m), f"model{i}")
        names.append(name if name not in names else f"{name}{i}")
    return names


__all__ = ["AutoWatch"]
