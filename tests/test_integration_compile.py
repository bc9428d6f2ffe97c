"""torch.compile: gradient, update and loss signals stay exact; what cannot be seen is warned.

Compiled code runs no Python forward hooks, so per-module activation statistics are not
available inside a compiled model; gradscope says so once instead of losing them silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from tolerance import model_norm_rtol
from torch import nn

import gradscope

SAME_TRAINING = 1e-4
BACKEND = "aot_eager"  # compiles forward and backward graphs without needing a C++ toolchain


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def _run(mode: str, every: int = 1, steps: int = 6, fullgraph: bool = False):
    """Train a few steps; mode is eager, watch-then-compile or compile-then-watch."""
    torch._dynamo.reset()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(BACKEND)(gm, example_inputs)

    if mode == "compile-then-watch":
        run = torch.compile(model, backend=backend, fullgraph=fullgraph)
        scope = gradscope.watch(run, opt, every=every)
    else:
        scope = gradscope.watch(model, opt, every=every)
        run = (torch.compile(model, backend=backend, fullgraph=fullgraph)
               if mode == "watch-then-compile" else model)
    seen: list[dict] = []  # float64 norms of what the optimizer is about to use, per step
    handle = opt.register_step_pre_hook(lambda o, a, k: seen.append({
        "grad": [torch.linalg.vector_norm(p.grad.double()).item() for p in model.parameters()],
        "param": [torch.linalg.vector_norm(p.detach().double()).item()
                  for p in model.parameters()]}))
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            loss = run(torch.randn(32, 6, generator=g)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    scope.close()
    handle.remove()
    scope.seen = seen  # the test's reference, kept beside the run it describes
    messages = [str(w.message) for w in caught
                if issubclass(w.category, gradscope.GradscopeWarning)]
    return scope, messages, len(compiles)


@pytest.fixture(scope="module")
def eager():
    scope, messages, _ = _run("eager")
    assert not messages
    return scope


@pytest.mark.parametrize("mode", ["watch-then-compile", "compile-then-watch"])
def test_gradients_updates_and_loss_match_eager(eager, mode):
    scope, messages, _ = _run(mode)
    assert not scope.failures
    expected, got = eager.history.records(), scope.history.records()
    assert [r.step for r in got] == [r.step for r in expected]
    rtol = model_norm_rtol(_model())
    for e, c in zip(expected, got):
        # exact: the compiled run's own gradients and weights, as the optimizer saw them
        np.testing.assert_allclose(c.grad_norm, scope.seen[c.step]["grad"], rtol=rtol)
        np.testing.assert_allclose(c.param_norm, scope.seen[c.step]["param"], rtol=rtol)
        # the same training as eager: compiled graphs may reorder float32 additions (~1e-7);
        # a wrong gradient or a missed step is off by far more than SAME_TRAINING
        np.testing.assert_allclose(c.grad_norm, e.grad_norm, rtol=SAME_TRAINING)
        np.testing.assert_allclose(c.update_ratio, e.update_ratio, rtol=SAME_TRAINING)
        assert c.loss == pytest.approx(e.loss, rel=SAME_TRAINING)
        # compiled code runs no module hooks: no leaf module has statistics ...
        assert not [name for name, s in c.activations.items() if s.leaf]
    # ... and gradscope says so once, with what to do
    assert len([m for m in messages if "torch.compile" in m]) == 1
    if mode == "compile-then-watch":
        # the compiled wrapper's own hooks run eagerly: input statistics are kept
        assert all(r.data is not None and r.data.shape == (32, 6) for r in got)
        assert all(r.backward_count == 1 for r in got)


def test_fullgraph_compile_is_not_broken_and_hooks_cause_no_recompiles(eager):
    # every=3 attaches and removes gradscope's hooks between steps
    scope, messages, compiles = _run("watch-then-compile", every=3, steps=9, fullgraph=True)
    assert compiles <= 2
    assert [r.step for r in scope.history.records()] == [0, 3, 6]
    for r in scope.history.records():
        e = eager.history.records()[r.step] if r.step < len(eager.history.records()) else None
        if e is not None:
            np.testing.assert_allclose(r.grad_norm, scope.seen[r.step]["grad"],
                                       rtol=model_norm_rtol(_model()))
            np.testing.assert_allclose(r.grad_norm, e.grad_norm, rtol=SAME_TRAINING)
    assert any("torch.compile" in m for m in messages)


def test_eager_training_mode_off_does_not_warn():
    # gradients with the model in eval mode (e.g. frozen batch-norm statistics) reach the hooks
    model = _model().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradscope.GradscopeWarning)
        with gradscope.watch(model, opt, every=1) as scope:
            loss = model(torch.randn(8, 6)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
