"""Unusual but legitimate set-ups: no loss passed, sparse/empty/complex parameters, batch size
one, a saturated output layer, an embedding trained with plain SGD."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from rulekit import act, deep_layout, history, record
from test_rules import run, signs
from tolerance import norm_rtol
from torch import nn

import gradscope


def _loop(model, opt, batch, steps, **watch):
    with gradscope.watch(model, opt, **watch) as scope:
        for _ in range(steps):
            x, y = batch()
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            scope.step(loss)
    return scope


def test_step_without_a_loss_is_not_a_nan_loss():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, opt, every=10) as scope:
        for _ in range(50):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            scope.step()
    assert scope.history.total_recorded == 5  # no extra recording forced by a "NaN" loss
    assert len(scope.history.losses()[1]) == 0
    assert scope.diagnose() == []


def test_sparse_empty_and_complex_parameters_are_measured_or_skipped_quietly():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8, sparse=True)
            self.lin = nn.Linear(8, 1)
            self.empty = nn.Parameter(torch.empty(0))
            self.phase = nn.Parameter(torch.randn(4, dtype=torch.complex64))

        def forward(self, ids):
            return self.lin(self.emb(ids).mean(1)) + self.phase.abs().sum() + self.empty.sum()

    model = Model()
    sparse_opt = torch.optim.SGD([model.emb.weight], lr=0.1)
    dense_opt = torch.optim.Adam([p for n, p in model.named_parameters() if n != "emb.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a torch casting warning may leak out
        with gradscope.watch(model, [sparse_opt, dense_opt], every=1) as scope:
            for _ in range(3):
                sparse_opt.zero_grad()
                dense_opt.zero_grad()
                ids = torch.randint(0, 50, (4, 3))
                loss = model(ids).pow(2).mean()
                loss.backward()
                dense = model.emb.weight.grad.to_dense()
                reference = torch.linalg.vector_norm(dense.double()).item()
                sparse_opt.step()
                dense_opt.step()
                scope.step(loss)
    assert scope.failures == {}
    norms = dict(zip(scope.layout.param_names, scope.history.last.grad_norm))
    np.testing.assert_allclose(norms["emb.weight"], reference, rtol=norm_rtol(dense.numel()))
    assert np.isnan(norms["empty"]) and np.isfinite(norms["phase"])
    assert np.isfinite(scope.history.last.total_grad_norm())


def test_batch_of_one_does_not_count_sparse_relu_units_as_dead():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = _loop(model, opt, lambda: (torch.randn(1, 8), torch.randn(1, 1)), 3, every=1)
    assert scope.history.last.activations["1"].dead_frac is None
    scope = _loop(model, opt, lambda: (torch.randn(32, 8), torch.randn(32, 1)), 3, every=1)
    assert scope.history.last.activations["1"].dead_frac is not None


def test_a_saturated_output_activation_is_not_a_warning_but_a_hidden_one_is():
    layout = deep_layout(2)

    def acts(hidden, output):
        return {"0": act(saturated=hidden, order=0), "1": act(saturated=output, order=1)}

    healthy = [record(layout, s, activations=acts(0.1, 0.9)) for s in range(30)]
    assert "activations-saturated" not in signs(run(history(layout, healthy)))
    broken = [record(layout, s, activations=acts(0.9, 0.1)) for s in range(30)]
    assert "activations-saturated" in signs(run(history(layout, broken)))


def test_embedding_rows_moving_slowly_is_not_a_stalled_layer():
    model = nn.Sequential(nn.Embedding(1000, 16), nn.Flatten(), nn.Linear(64, 1))
    layout = gradscope.history.ModelLayout.of(model)
    n = len(layout.params)
    ratios = np.array([3e-6, 1e-2, 1e-2])[:n]  # only the batch's rows of the table move
    records = [record(layout, s, update_ratio=ratios, loss=1.0 / (s + 1)) for s in range(40)]
    assert "layers-stalled" not in signs(run(history(layout, records)))
