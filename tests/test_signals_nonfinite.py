"""Where NaN/Inf start: the first module whose output is non-finite from finite inputs
(StepRecord.nonfinite_origin), NaN in the input batch (no module origin), and parameters
whose gradients are non-finite."""

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope


class Log(nn.Module):
    """Invalid math on purpose: log of possibly negative numbers."""

    def forward(self, x):
        return torch.log(x)


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


class Net(nn.Module):
    def __init__(self, bad: nn.Module, reentrant: bool | None = None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.body = nn.Sequential(nn.Linear(8, 8), bad)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.enc(x)
        if self.reentrant is None:
            h = self.body(h)
        else:
            h = checkpoint(self.body, h, use_reentrant=self.reentrant)
        return self.head(h)


def _step(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    captured = []
    handle = model.body[1].register_forward_hook(
        lambda m, a, out: captured.append(out.detach().clone()))
    scope = gradscope.watch(model, opt, every=1)
    loss = model(x).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    scope.step(loss)
    scope.close()
    handle.remove()
    return scope, captured, grads


@pytest.mark.parametrize("bad", [Log, Sqrt])
@pytest.mark.parametrize("reentrant", [None, False, True], ids=["plain", "ckpt", "ckpt-reentrant"])
def test_module_producing_nan_from_finite_input_is_the_origin(bad, reentrant):
    scope, captured, grads = _step(Net(bad(), reentrant), torch.randn(16, 4))
    record = scope.history.last
    assert record.nonfinite_origin == "body.1"
    out = captured[0]
    stats = record.activations["body.1"]
    assert stats.nonfinite_frac == pytest.approx((~torch.isfinite(out)).double().mean().item())
    assert stats.nonfinite_frac > 0 and stats.input_nonfinite == 0
    assert record.activations["head"].input_nonfinite > 0
    assert record.data.nonfinite == 0
    # head.weight's gradient multiplies the NaN activations; upstream grads go non-finite
    # only when the bad op's derivative is (sqrt: yes, log: 1/x stays finite)
    expected = {n for n, g in grads.items() if not torch.isfinite(g).all()}
    assert "head.weight" in expected and "head.bias" not in expected
    assert ("body.0.weight" in expected) is (bad is Sqrt)
    assert set(record.nonfinite_grad_params) == expected
    counts = dict(zip(scope.layout.param_names, record.grad_nonfinite))
    assert counts == {n: int((~torch.isfinite(g)).sum()) for n, g in grads.items()}


def test_nan_in_the_input_batch_has_no_module_origin():
    x = torch.randn(16, 4)
    x[0, 0] = float("nan")
    x[3, 2] = float("inf")
    scope, _, _ = _step(Net(nn.Identity()), x)
    record = scope.history.last
    assert record.data.nonfinite == 2
    assert record.nonfinite_origin is None
    assert record.activations["enc.0"].input_nonfinite == 2
    assert record.activations["enc.0"].nonfinite_frac > 0


def test_healthy_step_has_no_origin_and_no_nonfinite_grads():
    scope, _, _ = _step(Net(nn.Identity()), torch.randn(16, 4))
    record = scope.history.last
    assert record.nonfinite_origin is None
    assert record.nonfinite_grad_params == []
    assert (record.grad_nonfinite == 0).all()
    assert all(s.nonfinite_frac == 0 for s in record.activations.values())


def test_nan_made_in_the_root_forward_itself_points_at_the_root():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 1)

        def forward(self, x):
            return self.b(torch.log(self.a(x)))  # invalid math outside any submodule

    model = Functional()
    scope = gradscope.watch(model, every=1)
    loss = model(torch.randn(16, 4)).mean()
    loss.backward()
    scope.step(loss)
    scope.close()
    assert scope.history.last.nonfinite_origin == ""  # the root module


def test_nonfinite_loss_on_a_recorded_step_records_the_next_step_too():
    model = nn.Linear(4, 1)
    scope = gradscope.watch(model, every=3)
    for i in range(7):
        loss = model(torch.randn(2, 4)).mean()
        loss.backward()
        scope.step(loss * float("nan") if i == 3 else loss)
    scope.close()
    steps, losses = scope.history.losses()
    assert steps.tolist() == list(range(7))
    assert [math.isnan(v) for v in losses] == [i == 3 for i in range(7)]
    # losses reach the host only on recorded steps, so the NaN is seen at step 3 itself
    assert [r.step for r in scope.history.records()] == [0, 3, 4, 6]
