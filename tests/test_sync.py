"""Host transfers: none on steps that are not recorded, exactly one on a recorded step of a
healthy model. Every Tensor method that brings a value to the host is counted."""

import warnings

import pytest
import torch
from models import CASES

import gradscope

TRANSFERS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
COPIES = ("item", "tolist", "cpu", "numpy")  # the ways a batch of values leaves the device


@pytest.fixture
def counter(monkeypatch):
    """Counts calls of each host-transfer method on torch.Tensor while `counter["on"]`."""
    counts = {name: 0 for name in TRANSFERS}
    state = {"on": False, "counts": counts}
    for name in TRANSFERS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if state["on"]:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return state


def _measure(state, fn):
    for name in state["counts"]:
        state["counts"][name] = 0
    state["on"] = True
    try:
        fn()
    finally:
        state["on"] = False
    return dict(state["counts"])


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2", "wide_mlp", "wide_cnn"])
def test_transfers_per_step(counter, name):
    case = CASES[name]
    model = case.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = case.batches(6)
    losses = [None]  # each training step is measured without gradscope's step() first

    def train_step(batch):
        opt.zero_grad()
        loss = case.loss(model, batch)
        loss.backward()
        opt.step()
        losses[0] = loss

    # the same training step without gradscope: its own transfers (Adam reads its step count
    # with .item() per parameter, transformers may too) are the baseline, stable step to step
    baseline = _measure(counter, lambda: train_step(batches[0]))
    assert _measure(counter, lambda: train_step(batches[1])) == baseline
    scope = gradscope.watch(model, opt, every=5)
    per_step = []
    for batch in batches:
        def one_step(batch=batch):
            train_step(batch)
            scope.step(losses[0])
        counts = _measure(counter, one_step)
        per_step.append({k: counts[k] - baseline[k] for k in counts})
    scope.close()
    assert [r.step for r in scope.history.records()] == [0, 5]
    for step in (1, 2, 3, 4):
        assert all(v == 0 for v in per_step[step].values()), (step, per_step[step])
    for step in (0, 5):
        copies = sum(per_step[step][k] for k in COPIES)
        assert copies == 1, (step, per_step[step])
        assert all(per_step[step][k] == 0 for k in ("__float__", "__int__", "__bool__"))
    assert scope.failures == {}


def test_step_with_nonfinite_grads_takes_a_second_transfer(counter):
    # the exact non-finite counts are computed only when a norm came back non-finite, so a
    # healthy step pays nothing for them and an unhealthy one pays one more transfer
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1)

    def step():
        opt.zero_grad()
        loss = model(torch.randn(3, 4)).sum()
        loss.backward()
        model.weight.grad[0, 0] = float("nan")
        opt.step()
        scope.step(loss)

    counts = _measure(counter, step)
    scope.close()
    assert sum(counts[k] for k in COPIES) == 2, counts
    assert scope.history.last.grad_nonfinite.tolist() == [1, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mlp", "cnn", "wide_cnn"])
def test_unrecorded_steps_never_synchronise_with_a_cuda_device(name):
    # torch raises on any host synchronisation while the debug mode is "error"; inside
    # gradscope that error would switch a piece off with a warning, so both are checked
    case = CASES[name]
    model = case.build().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # step counts stay on the host
    batches = [{k: v.cuda() for k, v in batch.items()} for batch in case.batches(10)]

    def train_step(batch):
        opt.zero_grad()
        loss = case.loss(model, batch)
        loss.backward()
        opt.step()
        return loss

    scope = gradscope.watch(model, opt, every=5, live=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate(batches):
            recorded = step % 5 == 0
            torch.cuda.set_sync_debug_mode(0 if recorded else "error")
            try:
                scope.step(train_step(batch))
            finally:
                torch.cuda.set_sync_debug_mode(0)
    scope.close()
    assert not [str(w.message) for w in caught
                if issubclass(w.category, gradscope.GradscopeWarning)]
    assert scope.failures == {}
    assert [r.step for r in scope.history.records()] == [0, 5]
