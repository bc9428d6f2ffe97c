"""Input batch statistics: the first tensor the root module receives (positional or keyword),
pooled over the training forwards of a step."""

import pytest
import torch
from models import CASES
from tolerance import mean_tol, std_tol
from torch import nn

import gradscope


def _reference(xs):
    x = torch.cat([t.reshape(-1) for t in xs]).double()
    finite = x[torch.isfinite(x)]
    return {"min": finite.min().item(), "max": finite.max().item(),
            "mean": finite.mean().item(), "std": finite.std(correction=0).item(),
            "nonfinite": int((~torch.isfinite(x)).sum())}


def _check(data, ref):
    # small batches are summed in float64: a few hundred roundings of 2**-53 each
    for key, value in ref.items():
        assert getattr(data, key) == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_float_batch_statistics_match_reference():
    model = nn.Sequential(nn.Linear(5, 3))
    scope = gradscope.watch(model, every=1)
    x = torch.randn(12, 5) * 30 + 7
    model(x).sum().backward()
    scope.step(0.0)
    scope.close()
    data = scope.history.last.data
    assert data.dtype == "float32" and data.is_float and data.shape == (12, 5)
    _check(data, _reference([x]))


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "with-nan-inf"])
def test_large_cpu_batch_takes_the_blocked_path_with_the_same_statistics(poisoned):
    # 300 x 200 values: blocked float32 sums and one aminmax pass (NaN/Inf excluded only
    # when the batch holds some); moments within float32 block-sum error of float64
    model = nn.Linear(200, 1)
    scope = gradscope.watch(model, every=1)
    x = torch.randn(300, 200) * 30 + 7
    if poisoned:
        x[3, 4], x[5, 5], x[7, 7] = float("nan"), float("inf"), -1e6
    model(x).nan_to_num().sum().backward()
    scope.step(0.0)
    scope.close()
    data, ref = scope.history.last.data, _reference([x])
    assert (data.min, data.max, data.nonfinite) == (ref["min"], ref["max"], ref["nonfinite"])
    finite = x[torch.isfinite(x)]
    assert data.mean == pytest.approx(ref["mean"], rel=0, abs=mean_tol(finite))
    assert data.std == pytest.approx(ref["std"], rel=0, abs=std_tol(finite))


def test_micro_batches_are_pooled_and_nonfinite_is_excluded_from_moments():
    model = nn.Linear(5, 1)
    scope = gradscope.watch(model, every=1)
    xs = [torch.randn(4, 5), torch.randn(4, 5) + 3]
    xs[1][2, 1] = float("inf")
    xs[0][0, 0] = float("nan")
    for x in xs:
        model(x).sum().backward()
    scope.step(0.0)
    scope.close()
    data = scope.history.last.data
    assert data.nonfinite == 2
    _check(data, _reference(xs))


def test_keyword_input_and_other_dtypes():
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1).double()

        def forward(self, *, features):
            return self.lin(features)

    model = KW()
    scope = gradscope.watch(model, every=1)
    x = torch.randn(6, 3, dtype=torch.float64)
    model(features=x).sum().backward()
    scope.step(0.0)
    scope.close()
    data = scope.history.last.data
    assert data.dtype == "float64"
    _check(data, _reference([x]))


def test_integer_token_ids_for_gpt2():
    case = CASES["gpt2"]
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=1)
    batch = case.batches(1)[0]
    loss = case.loss(model, batch)
    loss.backward()
    opt.step()
    scope.step(loss)
    scope.close()
    data = scope.history.last.data
    ids = batch["input_ids"]
    assert data.dtype == "int64" and not data.is_float
    assert data.shape == tuple(ids.shape)
    _check(data, _reference([ids]))
    assert data.max < model.config.vocab_size


def test_eval_forward_leaves_no_data_and_unrecorded_steps_none():
    model = nn.Linear(2, 1)
    scope = gradscope.watch(model, every=1)
    model.eval()
    model(torch.ones(3, 2))
    model.train()
    scope.step(0.0)
    scope.close()
    assert scope.history.last.data is None


def _pooled(xs, fast):
    from gradscope.signals import data as data_module
    from gradscope.signals.transfer import DeviceBatch

    collector = data_module.DataCollector()
    original = data_module._small_cpu_stats
    data_module._small_cpu_stats = original if fast else (lambda x: None)
    try:
        for x in xs:
            collector.observe(x)
    finally:
        data_module._small_cpu_stats = original
    batch = DeviceBatch()
    collector.put(batch)
    return collector.result(batch.fetch())


@pytest.mark.parametrize("poison", [[], [0], [1]], ids=["finite", "first-nan", "second-nan"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_small_batch_fast_path_is_bit_for_bit_the_general_path(poison, count):
    # the fast path keeps the L2 norm and squares it on the host; pooled with other
    # forwards (fast or general) it is squared first: every field identical to the general
    # path's, which squares on the device
    gen = torch.Generator().manual_seed(count)
    xs = [torch.randn(16, 7, generator=gen) * 1e3 + 5 for _ in range(count)]
    for i in poison:
        if i < count:
            xs[i][1, 2] = float("nan")
    fast, general = _pooled(xs, fast=True), _pooled(xs, fast=False)
    assert fast == general
    assert fast.std == pytest.approx(_reference(xs)["std"], rel=1e-12)
