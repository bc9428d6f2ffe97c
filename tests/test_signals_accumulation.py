"""Accumulation: gradients left over from the previous optimizer step (StepRecord.stale_grad)
versus intentional micro-batch accumulation (several backward passes per optimizer step)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import MLP
from tolerance import model_norm_rtol
from torch import nn

import gradscope


def _norms(model):
    return np.array([torch.linalg.vector_norm(p.grad.double()).item() if p.grad is not None
                     else 0.0 for p in model.parameters()])


def _run(clear, steps=3, micro=1, eval_mode=False):
    """Train with `clear(opt)` called once per optimizer step (or never, if None)."""
    model = MLP()
    if eval_mode:
        model.eval()  # fine-tuning with dropout off: still training
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, opt, every=1)
    gen = torch.Generator().manual_seed(3)
    leftovers = []
    for _ in range(steps):
        if clear is not None:
            clear(opt)
        leftovers.append(_norms(model))
        for _ in range(micro):
            x, y = torch.randn(8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = F.cross_entropy(model(x), y) / micro
            loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    return scope, leftovers


@pytest.mark.parametrize("eval_mode", [False, True])
def test_forgotten_zero_grad_shows_the_leftover_gradient(eval_mode):
    scope, leftovers = _run(clear=None, eval_mode=eval_mode)
    records = scope.history.records()
    assert np.isnan(records[0].stale_grad).all()  # nothing stepped before the first step
    for record, before in zip(records[1:], leftovers[1:]):
        assert (record.stale_grad > 0).all()
        np.testing.assert_allclose(record.stale_grad, before, rtol=model_norm_rtol(MLP()))
        assert record.backward_count == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_gives_no_stale_gradient(set_to_none):
    scope, _ = _run(clear=lambda opt: opt.zero_grad(set_to_none=set_to_none))
    for record in scope.history.records()[1:]:
        assert (record.stale_grad == 0).all()
        assert record.backward_count == 1


def test_intentional_micro_batch_accumulation_is_not_stale():
    scope, _ = _run(clear=lambda opt: opt.zero_grad(), micro=4)
    records = scope.history.records()
    assert [r.backward_count for r in records] == [4, 4, 4]
    for record in records[1:]:
        assert (record.stale_grad == 0).all()
    # the gradient read is the accumulated one (the optimizer's pre-hook, after all 4 passes)
    assert np.isfinite(records[-1].grad_norm).all()


def test_accumulated_gradient_is_read_after_the_last_micro_batch():
    model = MLP(dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scope = gradscope.watch(model, opt, every=1)
    xs = torch.randn(4, 8, 8)
    ys = torch.randint(0, 3, (4, 8))
    opt.zero_grad()
    for x, y in zip(xs, ys):
        (F.cross_entropy(model(x), y) / 4).backward()
    expected = _norms(model)
    opt.step()
    scope.step(torch.tensor(0.0))
    scope.close()
    np.testing.assert_allclose(scope.history.last.grad_norm, expected,
                               rtol=model_norm_rtol(model))
    assert scope.history.last.backward_count == 4


class TwoHeads(nn.Module):
    """Returns (aux, main): a loss may use either or both outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 1)
        self.main = nn.Linear(4, 2)

    def forward(self, x):
        h = self.body(x)
        return self.aux(h), self.main(h)


@pytest.mark.parametrize("uses", ["main", "both"])
def test_backward_passes_are_counted_whichever_outputs_the_loss_uses(uses):
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=1)
    for _ in range(3):  # zero_grad forgotten on purpose
        aux, main = model(torch.randn(5, 4))
        loss = main.pow(2).mean() + (aux.mean() if uses == "both" else 0)
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    records = scope.history.records()
    assert [r.backward_count for r in records] == [1, 1, 1]
    body = scope.layout.param_names.index("body.weight")
    assert all(r.stale_grad[body] > 0 for r in records[1:])
