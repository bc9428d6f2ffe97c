"""What is attached to the measured model: gradscope settings and the tools compared with it."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class Method:
    """A way of watching training. Subclasses override the hooks they need.

    `period` is how many steps one full cycle of the method's work spans (gradscope's default
    records one step in ten); the benchmark weighs recorded and other steps accordingly.
    """

    name = "plain"
    label = "plain (unwatched copy)"
    period = 1
    baseline: str | None = None  # a method attached to the reference copy instead of nothing

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start watching `model` (called once, before warm-up)."""

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        yield

    def after_backward(self, model: nn.Module) -> None:
        """Runs between backward() and optimizer.step()."""

    def after_step(self, loss: torch.Tensor) -> None:
        """Runs after optimizer.step()."""

    def recorded(self, step: int) -> bool:
        """Whether the step with this 0-based index does the method's heavy work."""
        return step % self.period == 0

    def close(self) -> None:
        """Stop watching."""


class Gradscope(Method):
    """gradscope.watch(model, optimizer, **options)."""

    def __init__(self, name: str, label: str, baseline: str | None = None, **options: Any):
        self.name = name
        self.label = label
        self.baseline = baseline
        self.options = {"live": False, **options}
        self.period = int(self.options.get("every", 10))
        self.scope: Any = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import gradscope

        self.scope = gradscope.watch(model, optimizer, **self.options)

    def after_step(self, loss: torch.Tensor) -> None:
        self.scope.step(loss)

    def close(self) -> None:
        if self.scope is not None:
            self.scope.close()


class GradscopeRun(Method):
    """What `gradscope run` attaches: global optimizer/forward hooks and the backward wrapper
    find the model and step the scope, with no call in the loop. Its global hooks also see
    the reference copy's steps (they return at once there: that optimizer is not tracked)."""

    name = "run"
    label = "gradscope run (default, every=10)"
    period = 10

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from gradscope.autorun import AutoWatch

        self.auto = AutoWatch({"live": False})
        self.auto.attach()
        self.auto.track(optimizer)  # built before attach(), as the benchmark's trainer does

    def close(self) -> None:
        self.auto.detach()


class NaiveLogging(Method):
    """`p.grad.norm().item()` for every parameter, every step (a common hand-written logger)."""

    name = "naive"
    label = "naive per-parameter .item() logging"

    def __init__(self) -> None:
        self.log: dict[str, float] = {}

    def after_backward(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.grad is not None:
                self.log[name] = p.grad.norm().item()


class LightningGradNorm(Method):
    """`lightning.pytorch.utilities.grad_norm(model, 2)` every step (what Lightning logs)."""

    name = "lightning"
    label = "Lightning grad_norm (every step)"

    def __init__(self) -> None:
        from lightning.pytorch.utilities import grad_norm

        self._grad_norm = grad_norm
        self.log: dict[str, torch.Tensor] = {}

    def after_backward(self, model: nn.Module) -> None:
        self.log = self._grad_norm(model, norm_type=2)


class HFDebugUnderflowOverflow(Method):
    """`transformers.debug_utils.DebugUnderflowOverflow(model)`: forward values and weights only."""

    name = "hf_debug"
    label = "HF DebugUnderflowOverflow"

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from transformers.debug_utils import DebugUnderflowOverflow

        self.debug = DebugUnderflowOverflow(model)  # its hooks cannot be removed; copy is dropped


class DetectAnomaly(Method):
    """`torch.autograd.detect_anomaly(check_nan=True)` around forward and backward."""

    name = "anomaly"
    label = "torch detect_anomaly(check_nan=True)"

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=True):
                yield


def make_method(name: str) -> Method:
    """A fresh instance of method `name` (one of METHODS)."""
    if name == "plain":
        return Method()
    if name == "default":
        return Gradscope("default", "gradscope default (every=10)")
    if name == "every1":
        return Gradscope("every1", "gradscope every=1, all signals", every=1)
    if name == "every1_no_origin":
        return Gradscope("every1_no_origin", "gradscope every=1, nonfinite_origin=False",
                         every=1, nonfinite_origin=False)
    if name == "origin":
        return Gradscope("origin", "NaN origin tracking (vs every=1 without it)",
                         baseline="every1_no_origin", every=1, nonfinite_origin=True)
    if name == "run":
        return GradscopeRun()
    if name == "naive":
        return NaiveLogging()
    if name == "lightning":
        return LightningGradNorm()
    if name == "hf_debug":
        return HFDebugUnderflowOverflow()
    if name == "anomaly":
        return DetectAnomaly()
    raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}.")


METHODS = ("plain", "default", "run", "every1", "origin", "naive", "lightning", "hf_debug",
           "anomaly")
