"""Tied parameters (counted once) and mixed precision: autocast runs, and with a GradScaler
gradients are read after unscaling; an overflow step is recorded as skipped."""

import numpy as np
import pytest
import torch
from models import CASES, MLP
from tolerance import mean_tol, model_norm_rtol, std_tol
from torch import nn

import gradscope


def _ref_norms(model):
    return [torch.linalg.vector_norm(p.grad.double()).item() for p in model.parameters()]


def test_gpt2_tied_embedding_is_counted_once():
    case = CASES["gpt2"]
    model = case.build()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scope = gradscope.watch(model, opt, every=1)
    opt.zero_grad()
    loss = case.loss(model, case.batches(1)[0])
    loss.backward()
    expected = _ref_norms(model)  # parameters() yields the tied tensor once
    opt.step()
    scope.step(loss)
    scope.close()
    names = scope.layout.param_names
    assert names.count("transformer.wte.weight") == 1 and "lm_head.weight" not in names
    assert len(names) == len({id(p) for p in model.parameters()})
    np.testing.assert_allclose(scope.history.last.grad_norm, expected, rtol=model_norm_rtol(model))
    assert not scope.history.last.grad_none.any()


def test_shared_module_parameters_are_counted_once():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    scope = gradscope.watch(model, every=1)
    model(torch.randn(4, 3)).sum().backward()
    expected = _ref_norms(model)
    scope.step(0.0)
    scope.close()
    assert scope.layout.param_names == ["0.weight", "0.bias"]
    np.testing.assert_allclose(scope.history.last.grad_norm, expected, rtol=model_norm_rtol(model))
    assert scope.history.last.activations["0"].calls == 2


def test_autocast_bfloat16_run_reads_gradients():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    captured = []
    model.fc1.register_forward_hook(lambda m, a, out: captured.append(out.detach().clone()))
    scope = gradscope.watch(model, opt, every=1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        expected = _ref_norms(model)
        opt.step()
        scope.step(loss)
    scope.close()
    record = scope.history.last
    np.testing.assert_allclose(record.grad_norm, expected, rtol=model_norm_rtol(model))
    assert record.changed.all() and record.stepped
    out = captured[-1].double()
    assert captured[-1].dtype == torch.bfloat16
    # bfloat16 values are staged exactly as float32 and summed in float32
    assert record.activations["fc1"].mean == pytest.approx(out.mean().item(), abs=mean_tol(out))
    assert record.activations["fc1"].std == pytest.approx(out.std(correction=0).item(),
                                                          abs=std_tol(out))
    assert record.loss == loss.item()  # kept as given


def test_grad_scaler_grads_are_read_unscaled_and_overflow_is_a_skipped_step():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scope = gradscope.watch(model, opt, every=1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    expected = []
    for step in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == 1:
            model.fc2.weight.grad[0, 0] = float("inf")  # what a float16 overflow looks like
            scale = scaler.get_scale()
        scaler.step(opt)  # unscales, then steps only when every gradient is finite
        expected.append(_ref_norms(model))  # p.grad holds the unscaled gradients now
        scaler.update()
        scope.step(loss)
        if step == 1:
            assert scaler.get_scale() < scale  # the scaler saw the overflow
    scope.close()
    records = scope.history.records()
    assert [r.skipped for r in records] == [False, True, False]
    assert [r.overflow for r in records] == [False, True, False]
    assert [r.stepped for r in records] == [True, False, True]
    for record, ref in zip(records, expected):
        finite = np.isfinite(ref)
        np.testing.assert_allclose(record.grad_norm[finite], np.asarray(ref)[finite],
                                   rtol=model_norm_rtol(model))
    fc2 = scope.layout.param_names.index("fc2.weight")
    assert records[1].grad_nonfinite[fc2] == 1
    assert records[1].nonfinite_grad_params == ["fc2.weight"]
    # no optimizer step ran: no update measured (a skipped step must not look like frozen params)
    assert np.isnan(records[1].changed).all() and np.isnan(records[1].update_ratio).all()
    assert (records[2].changed == 1).all()
