"""Scope lifecycle: which steps are recorded, the bounded history, every loss kept, the
context manager, reading the history after close(), silence with live=False."""

import gc
import math
import weakref

import numpy as np
import torch
from torch import nn

import gradscope
from gradscope import History


def _loop(model, opt, scope, steps, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(4, 3, generator=gen)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)
        losses.append(loss.item())
    return losses


def _model_opt():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def test_history_is_bounded_but_every_loss_is_kept():
    model, opt = _model_opt()
    scope = gradscope.watch(model, opt, every=1, history_size=5)
    losses = _loop(model, opt, scope, 50)
    scope.close()
    history = scope.history
    records = history.records()
    assert history.total_recorded == 50
    assert len(history) == 5 and len(records) <= 5 + History.KEEP_FIRST
    steps = [r.step for r in records]
    assert steps == list(range(History.KEEP_FIRST)) + list(range(45, 50))
    assert [r.step for r in history.recent(3)] == [47, 48, 49]
    assert history.last.step == 49 and [r.step for r in history.first] == steps[:10]
    loss_steps, values = history.losses()
    assert loss_steps.tolist() == list(range(50))
    np.testing.assert_allclose(values, losses, rtol=0)  # losses are kept as given: no arithmetic


def test_every_n_records_every_nth_step_and_losses_of_all():
    model, opt = _model_opt()
    scope = gradscope.watch(model, opt, every=4)
    losses = _loop(model, opt, scope, 10)
    assert scope.step_count == 10
    assert [r.step for r in scope.history.records()] == [0, 4, 8]
    # losses of steps 9 are still on the device until close()
    assert scope.history.losses()[0].tolist() == list(range(9))
    scope.close()
    # losses are kept as given: no arithmetic
    np.testing.assert_allclose(scope.history.losses()[1], losses, rtol=0)
    for record in scope.history.records():
        assert record.loss == losses[record.step]


def test_recording_hooks_are_attached_only_on_recorded_steps():
    model, opt = _model_opt()
    scope = gradscope.watch(model, opt, every=3)
    attached = []
    for step in range(6):
        attached.append(len(model[0]._forward_hooks) > 0)
        _loop(model, opt, scope, 1, gen_seed=step)
    scope.close()
    assert attached == [True, False, False, True, False, False]


def test_many_unrecorded_steps_keep_their_losses():
    model = nn.Linear(2, 1)
    scope = gradscope.watch(model, every=100_000)
    values = [float(v) for v in torch.linspace(0, 1, 1205)]
    for v in values:
        scope.step(torch.tensor(v))
    scope.close()
    steps, losses = scope.history.losses()
    assert steps.tolist() == list(range(1205))
    np.testing.assert_allclose(losses, values, rtol=0)  # losses are kept as given: no arithmetic
    assert not any(math.isnan(x) for x in losses)


def test_context_manager_closes_and_history_stays_readable():
    model, opt = _model_opt()
    with gradscope.watch(model, opt, every=1) as scope:
        _loop(model, opt, scope, 3)
        assert not scope.closed
    assert scope.closed
    assert all(not m._forward_hooks for m in model.modules())
    assert scope.history.total_recorded == 3
    assert isinstance(scope.diagnose(), list)
    assert "closed" in repr(scope) and "3 steps" in repr(scope)


def test_loss_may_be_none_or_a_number():
    model, opt = _model_opt()
    with gradscope.watch(model, opt, every=1) as scope:
        scope.step()
        scope.step(2)
        scope.step(torch.tensor([0.5]))
    steps, values = scope.history.losses()
    assert steps.tolist() == [1, 2] and values.tolist() == [2.0, 0.5]  # no loss, no entry
    assert math.isnan(scope.history.records()[0].loss)


def test_live_false_prints_nothing(capsys):
    model, opt = _model_opt()
    scope = gradscope.watch(model, opt, live=False, every=1)
    _loop(model, opt, scope, 5)
    scope.close()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_unclosed_scope_does_not_keep_the_model_alive():
    model, opt = _model_opt()
    ref = weakref.ref(model)
    scope = gradscope.watch(model, opt, every=1)
    _loop(model, opt, scope, 2)
    del model, opt, scope
    gc.collect()
    assert ref() is None


def test_an_unclosed_scope_lives_as_long_as_the_hooks_on_its_model():
    # the hooks left on a model in use must belong to a scope that can still close them
    model, opt = _model_opt()
    scope = gradscope.watch(model, opt, every=1)
    ref = weakref.ref(scope)
    del scope
    gc.collect()
    assert ref() is not None and ref().recorder.owner is ref()
    ref().close()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_unrecorded_step_leaves_the_step_state_as_a_reset_does():
    # finish_step() resets the per-step state only after recorded steps: an unrecorded step
    # must not change any of it (it would leak into the next recorded step otherwise)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=3)
    recorder = scope.recorder
    names = ("_read", "_read_early", "_held_grads", "_stepping", "_orphans", "_backward_count",
             "_backward_tasks", "_stale_roots", "_in_closure", "_closure_calls",
             "_closure_checked", "_loss_requires_grad", "_activation_before_loss")

    def state():
        out = {name: getattr(recorder, name) for name in names}
        out["_grad_none"] = recorder._grad_none.tolist()
        return out

    for step in range(7):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)
        after = state()
        recorder._reset_step_state()
        assert after == state(), step
    scope.close()
