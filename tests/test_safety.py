"""gradscope only observes: training with it gives bit-identical losses and weights, every
hook it adds is gone after close() (also when leaving `with` through an exception), and an
error inside gradscope switches that piece off without touching training."""

import warnings

import pytest
import torch
import torch.optim.optimizer as optim_module
from models import CASES, train
from torch.nn.modules import module as module_module

import gradscope
from gradscope import recorder as recorder_module
from gradscope.signals.activations import ActivationCollector
from gradscope.signals.data import DataCollector
from gradscope.signals.staging import RowStage
from gradscope.signals.updates import UpdateTracker


def _identical(a, b) -> None:
    assert len(a["losses"]) == len(b["losses"])
    for x, y in zip(a["losses"], b["losses"]):
        assert torch.equal(x, y)
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key


@pytest.mark.parametrize("name", list(CASES))
def test_training_is_bit_identical_with_and_without_gradscope(name):
    case = CASES[name]
    plain = train(case, steps=3)
    watched = train(case, steps=3, watch={"every": 1, "activations": True,
                                           "nonfinite_origin": True})
    _identical(plain, watched)
    scope = watched["scope"]
    assert scope.failures == {}
    assert scope.history.total_recorded == 3
    last = scope.history.last
    assert last.activations and last.data is not None
    assert last.backward_count == 1 and (last.stale_grad == 0).all()
    assert (last.changed == 1).all() and not last.grad_none.any()
    assert _hooks(watched["model"]) == {}


# ------------------------------------------------------------------ hooks left behind
def _hooks(model, optimizer=None) -> dict[str, int]:
    """Every non-empty hook container on the model, its parameters, the optimizer and the
    global registries, by owner and attribute name."""
    found: dict[str, int] = {}

    def scan(owner: str, obj) -> None:
        for attr, value in vars(obj).items():
            if "hook" in attr and isinstance(value, dict) and value:
                found[f"{owner}.{attr}"] = len(value)

    for name, module in model.named_modules():
        scan(f"module[{name}]", module)
    for name, param in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            value = getattr(param, attr, None)
            if value:
                found[f"param[{name}].{attr}"] = len(value)
    if optimizer is not None:
        scan("optimizer", optimizer)
    for mod in (module_module, optim_module):
        for attr, value in vars(mod).items():
            if attr.startswith("_global") and "hook" in attr and isinstance(value, dict) \
                    and value:
                found[f"{mod.__name__}.{attr}"] = len(value)
    return found


def _model_and_opt():
    case = CASES["cnn"]
    model = case.build()
    return case, model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_close_removes_every_hook():
    case, model, opt = _model_and_opt()
    before = _hooks(model, opt)
    scope = gradscope.watch(model, opt, every=1)
    during = _hooks(model, opt)
    assert during != before  # the scan does see gradscope's hooks while it is attached
    for batch in case.batches(2):
        opt.zero_grad()
        loss = case.loss(model, batch)
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    assert _hooks(model, opt) == before
    scope.close()  # closing twice is harmless
    assert scope.closed


def test_exception_inside_with_removes_every_hook():
    case, model, opt = _model_and_opt()
    before = _hooks(model, opt)
    with pytest.raises(KeyError), gradscope.watch(model, opt, every=1) as scope:
        batch = case.batches(1)[0]
        loss = case.loss(model, batch)  # forward ran, output hooks are registered
        loss.backward()
        raise KeyError("user code failed mid-step")
    assert scope.closed
    assert _hooks(model, opt) == before
    # the model can be watched again right away
    gradscope.watch(model, opt).close()


# ------------------------------------------------------------------ failures inside gradscope
def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("target, piece", [
    ((ActivationCollector, "_record"), "activations"),
    ((RowStage, "add"), "activations"),  # the inline path of a plain leaf's hook
    ((recorder_module, "put_grad_stats"), "gradients"),
    ((recorder_module, "put_stale_grad_norms"), "accumulation"),
    ((UpdateTracker, "after"), "updates"),
    ((DataCollector, "observe"), "data"),
], ids=["activations", "activations-inline", "gradients", "accumulation", "updates", "data"])
def test_error_in_a_hook_is_warned_once_and_training_is_unchanged(monkeypatch, target, piece):
    case = CASES["mlp"]
    plain = train(case, steps=4)
    monkeypatch.setattr(*target, _boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = train(case, steps=4, watch={"every": 1})
    _identical(plain, watched)
    ours = [w for w in caught if issubclass(w.category, gradscope.GradscopeWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "injected failure" in str(ours[0].message)
    scope = watched["scope"]
    assert list(scope.failures) == [piece]
    # the other signals carry on: every step is recorded with its loss
    assert scope.history.total_recorded == 4
    assert all(r.stepped and not r.skipped for r in scope.history.records())
    steps, losses = scope.history.losses()
    assert steps.tolist() == [0, 1, 2, 3]
    assert losses.tolist() == [x.item() for x in plain["losses"]]
    assert _hooks(watched["model"]) == {}


def test_activation_hook_error_is_warned_from_the_hooks_caller(monkeypatch):
    # the activation hooks guard themselves (no wrapper call per module): their warning
    # points where a wrapped hook's does, at the module call that ran the hook
    monkeypatch.setattr(RowStage, "add", _boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(CASES["mlp"], steps=2, watch={"every": 1})
    ours = [w for w in caught if issubclass(w.category, gradscope.GradscopeWarning)]
    assert len(ours) == 1 and ours[0].filename == module_module.__file__


def test_recording_switched_off_by_an_error_takes_its_hooks_off():
    # if building a record fails, that piece is switched off: the per-module hooks come
    # off at the end of the step and nothing keeps being staged on later steps
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1, live=False)

    def broken():
        raise RuntimeError("boom")

    scope.recorder._record_step = broken
    with pytest.warns(gradscope.GradscopeWarning, match="'record'"):
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(5, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    assert "record" in scope.failures
    assert not scope.recorder.activations.attached
    assert len(scope.recorder.activations._stage) == 0
    assert all(not m._forward_hooks for m in model.children())
    scope.close()
