"""Working on copies: the user's model, optimizer and random streams stay exactly as they were."""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import GradscopeError

#: Module attributes holding hooks; a copy starts without them (a scope watching the user's
#: model must not be copied along, nor fire on the copy).
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")
#: Module attributes that point back at a training framework (Lightning's trainer and fabric):
#: the copy gets None there instead of a copy of the whole trainer, data loaders included.
_BACK_REFERENCES = ("_trainer", "_fabric")


@contextlib.contextmanager
def preserved_rng(seed: int) -> Iterator[None]:
    """Run the block from `seed`, then put back the torch (CPU and CUDA), numpy and Python
    random states exactly as they were.

    Example:
        >>> before = torch.rand(1); state = torch.get_rng_state()
        >>> with preserved_rng(0):
        ...     _ = torch.rand(3)
        >>> bool(torch.equal(torch.get_rng_state(), state))
        True
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = (torch.cuda.get_rng_state_all()
                   if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # seeds every CUDA device too, when CUDA is initialised
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def model_copy(model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
    """A deep copy of `model` without its hooks or gradients, and the map from each original
    parameter's id to its copy.

    Example:
        >>> m = torch.nn.Linear(2, 2); c, params = model_copy(m)
        >>> params[id(m.weight)] is c.weight, torch.equal(c.weight, m.weight)
        (True, True)
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = module.__dict__.get(attr)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
        for attr in _BACK_REFERENCES:
            owner = module.__dict__.get(attr)
            if owner is not None:
                memo[id(owner)] = None
    try:
        duplicate = copy.deepcopy(model, memo)
    except Exception as err:
        raise GradscopeError(
            f"checkup() works on a copy of the model, and copy.deepcopy(model) failed "
            f"({type(err).__name__}: {err}); make the model deep-copyable (no open files, "
            "locks or generators as attributes).") from err
    params: dict[int, nn.Parameter] = {}
    originals = dict(model.named_parameters(remove_duplicate=False))
    copies = dict(duplicate.named_parameters(remove_duplicate=False))
    for name, param in originals.items():
        params[id(param)] = copies[name]
    for param in duplicate.parameters():
        param.grad = None
    duplicate.train()
    return duplicate, params


def optimizer_copy(optimizer: torch.optim.Optimizer | None,
                   params: dict[int, nn.Parameter], model: nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class and per-group settings over the copied parameters
    (no state: the copy starts from initialisation). Without an optimizer: Adam(lr=1e-3).

    Example:
        >>> m = torch.nn.Linear(2, 2); c, params = model_copy(m)
        >>> opt = optimizer_copy(torch.optim.SGD(m.parameters(), lr=0.5), params, c)
        >>> group = opt.param_groups[0]
        >>> type(opt).__name__, group["lr"], group["params"][0] is c.weight
        ('SGD', 0.5, True)
    """
    if optimizer is None:
        held = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
        if not held:
            raise GradscopeError("checkup() got a model without parameters; there is nothing "
                                 "to train, so pass the model that holds the weights.")
        return torch.optim.Adam(held, lr=1e-3)
    groups = []
    for group in optimizer.param_groups:
        held = [params[id(p)] for p in group["params"] if id(p) in params]
        if held:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": held})
    if not groups:
        raise GradscopeError(
            "the optimizer passed to checkup() holds none of the model's parameters; pass the "
            "optimizer built from this model's parameters (e.g. Adam(model.parameters())).")
    kind: Any = type(optimizer)
    try:
        return kind(groups, **optimizer.defaults)
    except TypeError:
        try:
            return kind(groups)
        except Exception as err:
            raise GradscopeError(
                f"checkup() could not build a fresh {kind.__name__} with the optimizer's "
                f"settings ({type(err).__name__}: {err}); pass a standard torch.optim "
                "optimizer, or optimizer=None to use Adam(lr=1e-3).") from err


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first param group, as a float."""
    lr = optimizer.param_groups[0].get("lr", float("nan"))
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def scale_lrs(optimizer: torch.optim.Optimizer, bases: list[float], factor: float) -> None:
    """Set every group's learning rate to its base times `factor` (groups keep their ratios)."""
    for group, lr in zip(optimizer.param_groups, bases):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr * factor)
        else:
            group["lr"] = lr * factor
