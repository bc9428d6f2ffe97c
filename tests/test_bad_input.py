"""Bad input to watch()/step(): one GradscopeError with one sentence saying what is wrong and
what to do, and nothing left attached after a watch() that failed."""

import re
import warnings

import pytest
import torch
from torch import nn

import gradscope
from gradscope.report import sinks


def _one_sentence(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message.endswith("."), message
    plain = message.replace("e.g.", "eg").replace("i.e.", "ie")
    assert not re.search(r"[.!?]\s+[A-Z]", plain), message  # no second sentence
    assert len(message) < 300
    return message


def _no_hooks(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> bool:
    modules = all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
                  for m in model.modules())
    optimizer = opt is None or (not opt._optimizer_step_pre_hooks
                                and not opt._optimizer_step_post_hooks)
    return modules and optimizer


def _model_opt():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_watch_needs_a_module():
    with pytest.raises(gradscope.GradscopeError) as err:
        gradscope.watch(lambda x: x)
    assert "nn.Module" in _one_sentence(err)


def test_optimizer_must_be_an_optimizer():
    model, _ = _model_opt()
    with pytest.raises(gradscope.GradscopeError) as err:
        gradscope.watch(model, {"lr": 0.1})
    assert "Optimizer" in _one_sentence(err)
    assert _no_hooks(model)


def test_optimizer_holding_none_of_the_models_params():
    model, _ = _model_opt()
    other = torch.optim.Adam(nn.Linear(2, 2).parameters())
    with pytest.raises(gradscope.GradscopeError) as err:
        gradscope.watch(model, other)
    assert "none of the model's parameters" in _one_sentence(err)
    assert _no_hooks(model, other)
    gradscope.watch(model).close()  # nothing half-attached: watching works afterwards


def test_model_without_trainable_params_warns_and_still_records():
    model, _ = _model_opt()
    model.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(gradscope.GradscopeWarning, match="requires_grad"):
        scope = gradscope.watch(model, opt, every=1)
    x = torch.randn(5, 3)
    loss = model(x).pow(2).mean()
    opt.step()
    scope.step(loss)
    scope.close()
    record = scope.history.last
    assert record.loss == loss.item()  # kept as given
    assert not record.grad_none.any() and not record.not_in_optimizer.any()
    assert record.loss_requires_grad is False
    assert record.data.shape == (5, 3) and record.activations


def test_non_scalar_loss():
    model, opt = _model_opt()
    with gradscope.watch(model, opt) as scope:
        out = model(torch.randn(5, 3))
        with pytest.raises(gradscope.GradscopeError) as err:
            scope.step(out)
        assert "(5, 1)" in _one_sentence(err)
        with pytest.raises(gradscope.GradscopeError) as err:
            scope.step("0.3")
        _one_sentence(err)
        scope.step(out.mean())  # the scope is still usable
    assert scope.step_count == 1


def test_watching_the_same_model_twice():
    model, opt = _model_opt()
    first = gradscope.watch(model, opt)
    hooks = {id(m): len(m._forward_hooks) for m in model.modules()}
    with pytest.raises(gradscope.GradscopeError) as err:
        gradscope.watch(model, opt)
    assert "already watched" in _one_sentence(err)
    assert {id(m): len(m._forward_hooks) for m in model.modules()} == hooks
    first.close()
    gradscope.watch(model, opt).close()  # fine once the first scope is closed
    assert _no_hooks(model, opt)


def test_step_after_close():
    model, opt = _model_opt()
    scope = gradscope.watch(model, opt)
    scope.close()
    with pytest.raises(gradscope.GradscopeError) as err:
        scope.step(torch.tensor(1.0))
    assert "close()" in _one_sentence(err)
    assert scope.diagnose() == []  # reading the history still works


@pytest.mark.parametrize("options, word", [
    ({"evrey": 5}, "evrey"),
    ({"every": 0}, "every"),
    ({"live": "yes"}, "live"),
    ({"history_size": -1}, "history_size"),
])
def test_bad_watch_options(options, word):
    model, opt = _model_opt()
    with pytest.raises(gradscope.GradscopeError) as err:
        gradscope.watch(model, opt, **options)
    assert word in _one_sentence(err)
    assert _no_hooks(model, opt)


def test_failure_half_way_through_watch_leaves_nothing_attached(monkeypatch):
    model, opt = _model_opt()

    def broken_sinks(*args):
        raise gradscope.GradscopeError("log_dir is not writable; pass a writable folder.")

    monkeypatch.setattr(sinks, "make_sinks", broken_sinks)
    with pytest.raises(gradscope.GradscopeError):
        gradscope.watch(model, opt)
    assert _no_hooks(model, opt)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradscope.watch(model, opt).close()
