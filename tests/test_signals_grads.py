"""Gradient signals: per-parameter norms, max |grad|, non-finite counts, parameter norms,
per-layer norms, None gradients, parameters missing from the optimizer, detached losses.

Every number is compared with plain torch computed in float64 on the same tensors.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import MLP
from tolerance import norm_rtol
from torch import nn

import gradscope


def _norm(t: torch.Tensor, ord: float = 2) -> float:
    return torch.linalg.vector_norm(t.detach().double(), ord).item()


def _step(model, opt, scope, x, y, before_step=None):
    """One plain iteration; returns reference stats taken just before optimizer.step()."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if before_step is not None:
        before_step(model)
    ref = {
        name: {
            "grad_norm": _norm(p.grad) if p.grad is not None else np.nan,
            "grad_max": _norm(p.grad, float("inf")) if p.grad is not None else np.nan,
            "nonfinite": int((~torch.isfinite(p.grad)).sum()) if p.grad is not None else 0,
            "param_norm": _norm(p),
            "numel": p.numel(),
        }
        for name, p in model.named_parameters()
    }
    opt.step()
    scope.step(loss)
    return ref


def _batch(n=16):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_grad_and_param_norms_match_reference(with_optimizer):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt if with_optimizer else None, every=1)
    x, y = _batch()
    refs = [_step(model, opt, scope, x, y) for _ in range(2)]
    scope.close()
    names = scope.layout.param_names
    assert names == [n for n, _ in model.named_parameters()]
    for record, ref in zip(scope.history.records(), refs):
        for i, name in enumerate(names):
            rtol = norm_rtol(ref[name]["numel"])
            assert record.grad_norm[i] == pytest.approx(ref[name]["grad_norm"], rel=rtol)
            assert record.grad_max[i] == ref[name]["grad_max"]  # a max does not round
            assert record.grad_nonfinite[i] == 0
            if with_optimizer:  # read in the optimizer's pre-hook: before the update
                assert record.param_norm[i] == pytest.approx(ref[name]["param_norm"], rel=rtol)
        assert record.nonfinite_grad_params == []
        assert record.stepped is with_optimizer and record.skipped is False


def test_layer_grad_norm_combines_its_parameters():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1)
    ref = _step(model, opt, scope, *_batch())
    scope.close()
    layout = scope.layout
    assert layout.layers == ["fc1", "fc2", "head"]
    per_layer = scope.history.last.layer_grad_norm(layout)
    for index, layer in enumerate(layout.layers):
        parts = [ref[f"{layer}.{kind}"] for kind in ("weight", "bias")]
        expected = np.sqrt(sum(part["grad_norm"] ** 2 for part in parts))
        rtol = norm_rtol(sum(part["numel"] for part in parts))
        assert per_layer[index] == pytest.approx(expected, rel=rtol)
    weights = scope.history.last.layer_param_norm(layout)
    fc1 = [ref["fc1.weight"], ref["fc1.bias"]]
    assert weights[0] == pytest.approx(np.hypot(*(part["param_norm"] for part in fc1)),
                                       rel=norm_rtol(sum(part["numel"] for part in fc1)))


def test_nonfinite_grads_are_counted_per_parameter():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1)

    def poison(m):
        m.fc2.weight.grad[0, 0] = float("inf")
        m.fc2.weight.grad[1, 2] = float("nan")
        m.head.bias.grad[0] = float("-inf")

    ref = _step(model, opt, scope, *_batch(), before_step=poison)
    scope.close()
    record = scope.history.last
    names = scope.layout.param_names
    counts = dict(zip(names, record.grad_nonfinite))
    assert counts == {name: ref[name]["nonfinite"] for name in names}
    assert counts["fc2.weight"] == 2 and counts["head.bias"] == 1
    assert sorted(record.nonfinite_grad_params) == ["fc2.weight", "head.bias"]
    fc1 = names.index("fc1.weight")
    assert record.grad_norm[fc1] == pytest.approx(ref["fc1.weight"]["grad_norm"],
                                                  rel=norm_rtol(ref["fc1.weight"]["numel"]))
    assert not np.isfinite(record.grad_norm[names.index("fc2.weight")])


class PartlyUsed(nn.Module):
    """`unused` never reaches the loss; `frozen` has requires_grad=False."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.used(x))


def _train_partly_used(opt_params, loss_transform=lambda loss: loss):
    model = PartlyUsed()
    opt = torch.optim.Adam(opt_params(model), lr=1e-2)
    scope = gradscope.watch(model, opt, every=1)
    for _ in range(2):
        opt.zero_grad()
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss_transform(loss))
    scope.close()
    return scope


def test_none_gradients_only_for_trainable_params_outside_the_graph():
    scope = _train_partly_used(lambda m: m.parameters())
    record = scope.history.last
    flagged = {n for n, none in zip(scope.layout.param_names, record.grad_none) if none}
    assert flagged == {"unused.weight", "unused.bias"}  # frozen.* (requires_grad=False) not
    assert not record.not_in_optimizer.any()
    assert record.loss_requires_grad is True
    unused = scope.layout.param_names.index("unused.weight")
    assert np.isnan(record.grad_norm[unused])


def test_not_in_optimizer_flags_trainable_params_left_out():
    scope = _train_partly_used(lambda m: [m.used.weight, m.unused.weight, m.unused.bias])
    record = scope.history.last
    missing = {n for n, flag in zip(scope.layout.param_names, record.not_in_optimizer) if flag}
    assert missing == {"used.bias"}  # frozen.* need no optimizer
    used_bias = scope.layout.param_names.index("used.bias")
    assert np.isfinite(record.grad_norm[used_bias])  # still read, at step()


def test_loss_requires_grad_false_for_detached_loss():
    scope = _train_partly_used(lambda m: m.parameters(), lambda loss: loss.detach())
    assert all(r.loss_requires_grad is False for r in scope.history.records())
    # a plain float gives no information either way
    model = nn.Linear(2, 1)
    with gradscope.watch(model, every=1) as floats:
        model(torch.ones(1, 2)).sum().backward()
        floats.step(1.5)
    assert floats.history.last.loss_requires_grad is None
    assert floats.history.last.loss == 1.5


def test_an_empty_parameter_does_not_switch_off_gradient_signals():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model.register_parameter("empty", nn.Parameter(torch.empty(0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, every=1) as scope:
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean() + model.empty.sum()
        loss.backward()
        opt.step()
        scope.step(loss)
    assert scope.failures == {}
    record = scope.history.last
    names = scope.layout.param_names
    real = [i for i, name in enumerate(names) if name != "empty"]
    assert np.isfinite(record.grad_norm[real]).all() and (record.grad_norm[real] > 0).all()


def test_layer_update_ratio_weights_parameters_by_their_norm():
    model = nn.Sequential(nn.Linear(64, 64))
    layout = gradscope.history.ModelLayout.of(model)
    from rulekit import record

    rec = record(layout, 0, update_ratio=np.array([1e-3, 10.0]), param_norm=np.array([8.0, 1e-3]))
    expected = np.sqrt((1e-3 * 8.0) ** 2 + (10.0 * 1e-3) ** 2) / np.sqrt(8.0 ** 2 + 1e-6)
    np.testing.assert_allclose(rec.layer_update_ratio(layout), [expected])


def test_plain_gradients_fast_path_gives_what_the_general_path_gives(monkeypatch):
    from gradscope.signals import grads as grads_module
    from gradscope.signals.transfer import DeviceBatch

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen))
              for s in [(4, 3), (3,), (4, 3), (70000,), (1,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[2].grad[0, 1] = float("nan")
    fields = {"grad_norm": len(params), "grad_max": len(params), "param_norm": len(params)}

    def measure():
        batch = DeviceBatch()
        grads_module.put_grad_stats(params, list(range(len(params))), batch)
        grads_module.put_param_norms(params, list(range(len(params))), batch, "param_norm")
        return batch.fetch(fields)

    assert grads_module._plain(params) and grads_module._plain([p.grad for p in params])
    fast = measure()
    monkeypatch.setattr(grads_module, "_plain", lambda tensors: False)
    general = measure()
    for name in fields:
        np.testing.assert_array_equal(fast[name], general[name])
    assert not grads_module._plain([params[0].grad, None])
    assert not grads_module._plain([params[0], params[1].double()])


def test_stale_gradient_norms_of_cleared_and_left_over_gradients():
    from gradscope.signals.grads import put_stale_grad_norms
    from gradscope.signals.transfer import DeviceBatch

    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]

    def stale(indices):
        batch = DeviceBatch()
        put_stale_grad_norms([params[i] for i in indices], indices, batch)
        return batch.fetch({"stale_grad": 3})["stale_grad"]

    # all cleared to None (the bulk path): 0 at each given index, NaN elsewhere
    assert stale([2, 0]).tolist()[::2] == [0.0, 0.0] and np.isnan(stale([2, 0])[1])
    # one zeroed, one left over, one None (the general path)
    params[0].grad = torch.zeros(3)
    params[1].grad = torch.full((3,), 2.0)
    got = stale([0, 1, 2])
    np.testing.assert_array_equal(got, [0.0, float(torch.linalg.vector_norm(params[1].grad)), 0.0])
