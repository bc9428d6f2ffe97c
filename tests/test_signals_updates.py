"""Update size: ||w_after - w_before|| / ||w_before|| from a fixed element sample, and the
`changed` flag (did the optimizer step alter the values at all)."""

import numpy as np
import pytest
import torch
from torch import nn

import gradscope

# the sampled values are copied exactly to float64 and the ratio is computed there: a few
# hundred float64 roundings (~1e-14); any real mistake (no sqrt, wrong norm) is orders larger
F64_SAMPLE_RTOL = 1e-12


def _ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    before, after = before.double(), after.double()
    return (torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before)).item()


def _one_step(model, opt, scope, x):
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    scope.step(loss)
    return {n: _ratio(before[n], p.detach()) for n, p in model.named_parameters()}


def test_small_tensors_give_the_exact_ratio():
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))  # every tensor <= 256
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scope = gradscope.watch(model, opt, every=1, update_sample=256)
    refs = [_one_step(model, opt, scope, torch.randn(8, 6)) for _ in range(3)]
    scope.close()
    for record, ref in zip(scope.history.records(), refs):
        expected = [ref[n] for n in scope.layout.param_names]
        np.testing.assert_allclose(record.update_ratio, expected, rtol=F64_SAMPLE_RTOL)
        assert record.changed.tolist() == [1.0] * 4


def test_large_tensors_give_a_close_sampled_ratio():
    # 256 of 65536 weights are sampled. For roughly i.i.d. elements the relative standard error
    # of a sampled sum of squares is about sqrt(Var(x^2) / E(x^2)^2 / 256) <= sqrt(2 / 256), i.e.
    # under 9% for numerator and denominator each; 30% leaves more than two standard errors for
    # their quotient, while any real mistake (wrong norm, missing sqrt, no sampling) is >2x off.
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scope = gradscope.watch(model, opt, every=1, update_sample=256)
    refs = [_one_step(model, opt, scope, torch.randn(32, 256)) for _ in range(3)]
    scope.close()
    big = scope.layout.param_names.index("0.weight")
    for record, ref in zip(scope.history.records(), refs):
        assert record.update_ratio[big] == pytest.approx(ref["0.weight"], rel=0.3)
        assert record.changed[big] == 1.0


def test_zero_learning_rate_is_not_a_change_even_though_the_version_moves():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scope = gradscope.watch(model, opt, every=1)
    version = model.weight._version
    _one_step(model, opt, scope, torch.randn(5, 4))
    scope.close()
    assert model.weight._version > version  # SGD wrote to the tensor, with the same values
    record = scope.history.last
    assert record.changed.tolist() == [0.0, 0.0]
    assert record.update_ratio.tolist() == [0.0, 0.0]


def test_params_without_grad_are_untouched_by_adam():
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scope = gradscope.watch(model, opt, every=1)
    for _ in range(2):
        opt.zero_grad()
        loss = model["used"](torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    record = scope.history.last
    changed = dict(zip(scope.layout.param_names, record.changed))
    assert changed == {"used.weight": 1.0, "used.bias": 1.0,
                       "unused.weight": 0.0, "unused.bias": 0.0}
    ratio = dict(zip(scope.layout.param_names, record.update_ratio))
    assert ratio["unused.weight"] == 0.0 and ratio["used.weight"] > 0


def test_zero_initialised_tensor_has_no_ratio_but_is_changed():
    model = nn.Linear(4, 3)
    nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1)
    _one_step(model, opt, scope, torch.randn(5, 4))
    scope.close()
    record = scope.history.last
    assert record.changed.tolist() == [1.0, 1.0]
    assert np.isfinite(record.update_ratio[0])
    assert np.isnan(record.update_ratio[1])  # ||w_before|| = 0: the ratio is undefined


def test_update_ratio_is_only_measured_on_recorded_steps():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=3)
    refs = [_one_step(model, opt, scope, torch.randn(5, 4)) for _ in range(7)]
    scope.close()
    records = scope.history.records()
    assert [r.step for r in records] == [0, 3, 6]
    for record in records:
        expected = [refs[record.step][n] for n in scope.layout.param_names]
        np.testing.assert_allclose(record.update_ratio, expected, rtol=F64_SAMPLE_RTOL)


class _TouchOne(torch.optim.Optimizer):
    """Changes element 0 of each parameter (sampled) at its first step, then only element 1
    (outside the 256-element sample)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.calls = 0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.view(-1)[0 if self.calls == 0 else 1] += 1e-3
        self.calls += 1


def test_change_outside_the_sample_is_checked_whole_unless_the_sample_moved_last_time():
    # element 1 of a 65536-value weight is not sampled. The whole-tensor check runs for a
    # tensor whose sample did not move at its last measurement: the first step (sample
    # moved: 1), the second (its sample moved last time and is still now: unknown, NaN),
    # then exact again: 1, 1. A tensor the optimizer leaves alone reads 0 throughout.
    model = nn.Linear(256, 256, bias=False)
    frozen = nn.Linear(256, 256, bias=False)
    opt = _TouchOne(model.parameters())
    still = torch.optim.SGD(frozen.parameters(), lr=0.0)  # steps, changes nothing
    both = nn.ModuleDict({"moved": model, "still": frozen})
    scope = gradscope.watch(both, [opt, still], every=1, live=False)
    for _ in range(4):
        opt.zero_grad()
        still.zero_grad()
        loss = (model(torch.randn(2, 256)) + frozen(torch.randn(2, 256))).pow(2).mean()
        loss.backward()
        opt.step()
        still.step()
        scope.step(loss)
    scope.close()
    names = scope.layout.param_names
    moved = [r.changed[names.index("moved.weight")] for r in scope.history.records()]
    kept = [r.changed[names.index("still.weight")] for r in scope.history.records()]
    np.testing.assert_array_equal(moved, [1.0, np.nan, 1.0, 1.0])
    assert kept == [0.0] * 4


def test_ratio_follows_a_parameter_whose_storage_is_replaced_between_steps():
    # the tracker keeps a view of each parameter between recorded steps; `p.data = ...`
    # (a new storage, as a dtype/device move or a weight reload does) must not be read
    # through the old view
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-1)
    scope = gradscope.watch(model, opt, every=1, update_sample=256)
    _one_step(model, opt, scope, torch.randn(8, 6))
    with torch.no_grad():
        model[0].weight.data = torch.randn(10, 6) * 5  # new storage, same shape
    refs = [_one_step(model, opt, scope, torch.randn(8, 6)) for _ in range(2)]
    scope.close()
    for record, ref in zip(scope.history.records()[1:], refs):
        expected = [ref[n] for n in scope.layout.param_names]
        np.testing.assert_allclose(record.update_ratio, expected, rtol=F64_SAMPLE_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_batched_samples_and_bit_sums_match_the_per_tensor_ones(dtype):
    # the sampled values come from one gather over a concatenation, and the whole-tensor
    # bit sums of same-size tensors from one row sum over it: both must be what reading
    # each tensor on its own gives, in any order of the rows asked for
    from gradscope.signals.updates import GATHER_WHOLE, UpdateTracker, bit_sum

    gen = torch.Generator().manual_seed(0)
    shapes = [(300,), (5,), (20, 30), (300,), (GATHER_WHOLE + 7,), (20, 30), (300,), (1,)]
    params = [torch.randn(*s, generator=gen).to(dtype) for s in shapes]
    params[1][2] = float("nan")
    params[3][0] = -0.0
    tracker = UpdateTracker(params, 256)
    (bucket,) = tracker._plan(range(len(params)))
    for _ in range(2):  # a fresh concatenation, then the kept views
        values, source = tracker._values(bucket)
        assert source is not None
        for row, i in enumerate(bucket.indices):
            sample = tracker._sample[i]
            flat = params[i].reshape(-1)
            expected = flat if sample is None else flat[sample]
            got = values[row, : expected.numel()]
            torch.testing.assert_close(got, expected.to(torch.float64), rtol=0, atol=0,
                                       equal_nan=True)
        rows = bucket.full_check
        for order in (rows, rows[::-1], rows[1:3], [rows[-1], rows[0]]):
            expected = torch.stack([bit_sum(params[bucket.indices[r]]) for r in order])
            assert torch.equal(tracker._bit_sums(bucket, order, source), expected)
            assert torch.equal(tracker._bit_sums(bucket, order), expected)
        params[0].add_(1)  # in place: the kept views see it


def _param_norms(params, rows=None):
    from gradscope.signals.grads import put_param_norms
    from gradscope.signals.transfer import DeviceBatch

    batch = DeviceBatch()
    put_param_norms(params, list(range(len(params))), batch, "n", rows)
    return batch.fetch({"n": len(params)})["n"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weight_norms_read_from_the_tracker_copy_equal_the_stacked_ones(dtype):
    from gradscope.signals.updates import UpdateTracker

    # sizes that put the same-shape runs at odd offsets of the concatenation, values with a
    # NaN, an infinity and a negative zero; samples smaller than the tensors (sampled runs)
    # and whole ones
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (7, 5), (7, 5), (7, 5), (3,), (4, 9), (7, 5), (4, 9)]
    params = [nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in shapes]
    with torch.no_grad():
        params[2][1, 1] = float("nan")
        params[5][0, 0] = float("inf")
        params[3][0, 0] = -0.0
    stacked = _param_norms(params)
    for sample in (8, 256):
        tracker = UpdateTracker(params, sample)
        tracker.before(list(range(len(params))))
        used = []

        def rows(indices, numel, tracker=tracker, used=used):
            found = tracker.current_rows(indices, numel)
            used.append(found is not None)
            return found

        read = _param_norms(params, rows)
        assert read.tobytes() == stacked.tobytes()  # bit for bit, NaN included
        # sampled tensors lie in the concatenation by size, whole ones in parameter order
        # (where these shapes alternate): then every norm comes from a stack
        assert any(used) == (sample == 8)
        tracker.drop_current()
        assert tracker.current_rows([1, 2, 3], 35) is None


def test_weight_rows_are_given_only_when_they_lie_together_in_order():
    from gradscope.signals.updates import UpdateTracker

    params = [nn.Parameter(torch.randn(4, 4)) for _ in range(4)]
    tracker = UpdateTracker(params, 8)
    tracker.before([0, 1, 2, 3])
    got = tracker.current_rows([1, 2], 16)
    assert got is not None and torch.equal(got, torch.stack([params[1], params[2]]).view(2, -1))
    assert tracker.current_rows([2, 1], 16) is None  # not in that order
    assert tracker.current_rows([0, 2], 16) is None  # not one after another
    assert tracker.current_rows([1, 2], 8) is None  # not that size
    with torch.no_grad():
        params[1].add_(1.0)  # a copy: what before() read, not the values now
    assert not torch.equal(tracker.current_rows([1, 2], 16)[0], params[1].view(-1))
