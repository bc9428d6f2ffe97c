"""Activation signals per module: mean/std/zero and non-finite fractions, saturation of
bounded activations, dead ReLU units; which forwards count (train mode with grad only, each
call of a shared module, checkpoint recomputation once)."""

import numpy as np
import pytest
import torch
from tolerance import mean_tol, near_threshold_frac, std_tol
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope
from gradscope.signals.activations import SATURATION_MARGIN, ActivationTable
from gradscope.signals.staging import SAMPLE, RowStage, RowStat
from gradscope.signals.transfer import DeviceBatch


class Capture:
    """Test-side forward hooks that keep a copy of each named module's output."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            self.outputs[name].append(output.detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _reference(outputs: list[torch.Tensor], bounds=None) -> dict[str, tuple[float, float]]:
    """Float64 reference of each statistic of float32 `outputs`, with the error bound that
    float32 arithmetic allows for it (tests/tolerance.py)."""
    x = torch.cat([o.double().reshape(-1) for o in outputs])
    exact = 0.0  # counts of exact zeros and NaN/Inf do not round
    ref = {
        "mean": (x.mean().item(), mean_tol(x)),
        "std": (x.std(correction=0).item(), std_tol(x)),
        "zero_frac": ((x == 0).double().mean().item(), exact),
        "nonfinite_frac": ((~torch.isfinite(x)).double().mean().item(), exact),
    }
    if bounds is not None:
        low, high = bounds
        margin = SATURATION_MARGIN * (high - low)
        edges = (low + margin, high - margin)
        saturated = ((x <= edges[0]) | (x >= edges[1])).double().mean().item()
        ref["saturated_frac"] = (saturated, near_threshold_frac(x, edges))
    return ref


def _assert_matches(stats, ref):
    for key, (value, tol) in ref.items():
        assert getattr(stats, key) == pytest.approx(value, rel=0, abs=tol + 1e-300), key


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 12)
        self.sig = nn.Sigmoid()
        self.lin2 = nn.Linear(12, 12)
        self.tanh = nn.Tanh()
        self.lin3 = nn.Linear(12, 10)
        self.relu = nn.ReLU()
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        x = self.tanh(self.lin2(self.sig(self.lin1(x))))
        return self.head(self.relu(self.lin3(x)))


def _train_step(model, scope, x):
    loss = model(x).pow(2).mean()
    loss.backward()
    scope.step(loss)


def test_leaf_statistics_saturation_and_dead_units_match_reference():
    model = Mixed()
    with torch.no_grad():
        model.lin1.weight.mul_(8)  # push the sigmoid into its flat ends
        model.lin2.weight.mul_(8)
        model.lin3.bias[:3] = -100.0  # units 0..2 of the ReLU can never be positive
    names = ["lin1", "sig", "lin2", "tanh", "lin3", "relu", "head"]
    capture = Capture(model, names)
    scope = gradscope.watch(model, every=1)
    _train_step(model, scope, torch.randn(32, 6))
    scope.close()
    capture.remove()
    acts = scope.history.last.activations
    for name in names:
        bounds = {"sig": (0.0, 1.0), "tanh": (-1.0, 1.0)}.get(name)
        ref = _reference(capture.outputs[name], bounds)
        _assert_matches(acts[name], ref)
        assert acts[name].calls == 1 and acts[name].leaf
        if bounds is None:
            assert acts[name].saturated_frac is None
    assert 0.1 < acts["sig"].saturated_frac < 1.0
    assert 0.1 < acts["tanh"].saturated_frac < 1.0
    relu_out = capture.outputs["relu"][0]
    dead = (relu_out <= 0).all(dim=0)
    assert dead[:3].all()
    assert acts["relu"].dead_frac == pytest.approx(dead.double().mean().item())
    assert acts["lin3"].dead_frac is None  # only the ReLU family has units that die
    root = acts[""]
    assert not root.leaf and root.calls == 1


@pytest.mark.parametrize("shape, dims", [((6, 5, 7, 7), (0, 2, 3)), ((6, 9, 5), (0, 1))],
                         ids=["conv-map-channels", "sequence-last-dim"])
def test_dead_units_per_channel_or_feature(shape, dims):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if len(shape) == 4:
                self.pre = nn.Conv2d(shape[1], 4, 3, padding=1)
            else:
                self.pre = nn.Linear(shape[-1], 4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.pre(x))

    model = Net()
    with torch.no_grad():
        model.pre.bias[1] = -100.0
    capture = Capture(model, ["relu"])
    scope = gradscope.watch(model, every=1)
    _train_step(model, scope, torch.randn(shape))
    scope.close()
    out = capture.outputs["relu"][0]
    units_dead = (out.amax(dim=dims) <= 0)
    assert units_dead.shape == (4,) and units_dead[1]
    stats = scope.history.last.activations["relu"]
    assert stats.dead_frac == pytest.approx(units_dead.double().mean().item())
    _assert_matches(stats, _reference([out]))


def test_eval_mode_and_no_grad_forwards_do_not_count():
    model = Mixed()
    capture = Capture(model, ["lin1", "relu"])
    scope = gradscope.watch(model, every=1)
    model.eval()
    model(torch.randn(4, 6) * 100)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 6) * 100)
    train_x = torch.randn(16, 6)
    _train_step(model, scope, train_x)
    scope.close()
    capture.remove()
    acts = scope.history.last.activations
    for name in ("lin1", "relu"):
        assert acts[name].calls == 1
        _assert_matches(acts[name], _reference(capture.outputs[name][-1:]))
    data = scope.history.last.data
    assert data.shape == (16, 6) and data.max == pytest.approx(train_x.max().item())


def test_module_called_twice_pools_both_calls():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(5, 5)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.shared(self.act(self.shared(x))))

    model = Twice()
    capture = Capture(model, ["shared", "act"])
    scope = gradscope.watch(model, every=1)
    _train_step(model, scope, torch.randn(8, 5))
    scope.close()
    acts = scope.history.last.activations
    for name in ("shared", "act"):
        assert len(capture.outputs[name]) == 2
        assert acts[name].calls == 2
        _assert_matches(acts[name], _reference(capture.outputs[name],
                                               (-1.0, 1.0) if name == "act" else None))


class Checkpointed(nn.Module):
    def __init__(self, mode: bool | None) -> None:
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        if self.mode is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_counts_each_module_once(reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    x = torch.randn(10, 6)
    names = ["inp", "block.0", "block.1", "block.2", "block.3", "head"]
    model.mode = None  # the reference: the same weights and input, no checkpoint
    capture = Capture(model, names)
    model(x)
    capture.remove()
    model.mode = reentrant
    scope = gradscope.watch(model, every=1)
    for _ in range(2):  # the second step must not carry anything over from the first
        model.zero_grad()
        _train_step(model, scope, x)
    scope.close()
    acts = scope.history.last.activations
    for name in names:
        assert acts[name].calls == 1, name
        _assert_matches(acts[name], _reference(capture.outputs[name],
                                               (-1.0, 1.0) if name == "block.1" else None))
    assert acts["block"].calls == 1


def test_activations_reset_between_recorded_steps():
    model = Mixed()
    scope = gradscope.watch(model, every=2)
    xs = [torch.randn(4, 6) for _ in range(5)]
    for x in xs:
        _train_step(model, scope, x)
    scope.close()
    records = scope.history.records()
    assert [r.step for r in records] == [0, 2, 4]
    assert all(r.activations["lin1"].calls == 1 for r in records)


def test_activations_can_be_switched_off():
    model = Mixed()
    scope = gradscope.watch(model, every=1, activations=False)
    _train_step(model, scope, torch.randn(4, 6))
    scope.close()
    assert scope.history.last.activations == {}
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


class Poison(nn.Module):
    """Writes NaN and +inf into a few fixed positions of its input (out of place)."""

    def forward(self, x):
        x = x.clone()
        x[3, 7] = float("nan")
        x[40, 500] = float("inf")
        x[63, 1023] = float("nan")
        return x


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(8, 1024)
        self.tanh = nn.Tanh()
        self.lin2 = nn.Linear(1024, 1024)
        self.poison = Poison()
        self.relu = nn.ReLU()
        self.head = nn.Linear(1024, 1)

    def forward(self, x):
        return self.head(self.relu(self.poison(self.lin2(self.tanh(self.lin1(x))))))


def test_large_outputs_are_sampled_for_moments_and_counted_whole_for_nan_and_dead_units():
    # 64 x 1024 = 65536 values per output: moments come from 32768 spread over the tensor,
    # so they match the whole-tensor reference within sampling error (the second half of
    # the batch is 10x larger: a sample of the first half only would miss it by far);
    # NaN/Inf counts and dead units are exact.
    torch.manual_seed(0)
    model = Wide()
    with torch.no_grad():
        model.lin1.weight.mul_(3)  # tanh partly saturated
        model.lin2.bias[:100] = -100.0  # 100 of 1024 ReLU units can never be positive
    names = ["lin1", "tanh", "lin2", "poison", "relu"]
    capture = Capture(model, names)
    scope = gradscope.watch(model, every=1)
    x = torch.randn(64, 8)
    x[32:] *= 10
    loss = model(x).nan_to_num().pow(2).mean()
    loss.backward()
    scope.step(loss)
    scope.close()
    capture.remove()
    acts = scope.history.last.activations
    for name in names:
        out = capture.outputs[name][0].double()
        assert out.numel() == 65536
        finite = out[torch.isfinite(out)]
        stats = acts[name]
        assert stats.nonfinite_frac == (out.numel() - finite.numel()) / out.numel()  # exact
        if name in ("poison", "relu"):
            continue  # NaN in the sample or not: the moments of these are not compared
        assert stats.mean == pytest.approx(finite.mean().item(), abs=0.03 * finite.std().item())
        assert stats.std == pytest.approx(finite.std(correction=0).item(), rel=0.03)
        assert stats.zero_frac == pytest.approx((finite == 0).double().mean().item(), abs=0.01)
    sat = (capture.outputs["tanh"][0].abs() >= 1 - 2 * SATURATION_MARGIN).double().mean()
    assert 0.05 < sat < 0.95
    assert acts["tanh"].saturated_frac == pytest.approx(sat.item(), abs=0.02)
    relu = capture.outputs["relu"][0]
    assert acts["relu"].nonfinite_frac == 3 / 65536
    dead = (relu <= 0).all(dim=0)  # a unit that saw NaN (unit 7) is not called dead
    assert dead[:100].sum() == 99 and not dead[7]
    assert acts["relu"].dead_frac == pytest.approx(dead.double().mean().item())
    assert acts["relu"].input_nonfinite == 3
    assert scope.history.last.nonfinite_origin == "poison"


def test_activation_table_reads_like_a_dict_of_stats():
    # a recorded step keeps its statistics as columns; reading them gives the same
    # ActivationStats a dict would hold (None where a module has no such fraction)
    model = Mixed()
    scope = gradscope.watch(model, every=1)
    _train_step(model, scope, torch.randn(32, 6))
    scope.close()
    table = scope.history.last.activations
    assert isinstance(table, ActivationTable)
    as_dict = dict(table.items())
    assert list(as_dict) == list(table) and len(table) == len(as_dict) == 8
    assert "relu" in table and "nope" not in table and table.get("nope") is None
    assert [repr(s) for s in table.values()] == [repr(table[n]) for n in table]
    assert as_dict["relu"].saturated_frac is None and as_dict["sig"].dead_frac is None
    assert as_dict["tanh"].saturated_frac is not None and as_dict["relu"].dead_frac is not None
    column = table.column("nonfinite_frac")
    assert column.tolist() == [s.nonfinite_frac for s in as_dict.values()]


def test_many_calls_per_step_are_reduced_early_with_the_same_statistics(monkeypatch):
    # a module called many times per step (an unrolled cell) fills its staging buffer; at
    # the cap the full rows are reduced at once and the buffer refilled, so memory stays
    # bounded and the pooled statistics still match the reference
    from gradscope.signals import staging

    monkeypatch.setattr(staging, "GROUP_VALUES", 4 * 64)  # four rows of 64 values
    cell = nn.Linear(8, 8)
    model = nn.Sequential(cell, nn.Tanh())
    capture = Capture(model, ["0", "1"])
    scope = gradscope.watch(model, every=1)
    h = torch.randn(8, 8)
    loss = 0
    for _ in range(11):  # 11 calls of each module in one step
        h = model(h)
        loss = loss + h.pow(2).mean()
    loss.backward()
    scope.step(loss)
    stage = scope.recorder.activations._stage
    scope.close()
    capture.remove()
    acts = scope.history.last.activations
    for name, bounds in (("0", None), ("1", (-1.0, 1.0))):
        assert acts[name].calls == 11
        _assert_matches(acts[name], _reference(capture.outputs[name], bounds))
    assert all(group.chunk is None for group in stage._list)  # nothing held after the step


def test_staged_counts_exact_at_full_sample_width():
    # counts per row are summed in int16: exact up to SAMPLE (16,384) values per row
    stage = RowStage()
    full = stage.add(torch.full((SAMPLE,), 0.999), bounds=(-1.0, 1.0))
    empty = stage.add(torch.zeros(SAMPLE), bounds=(-1.0, 1.0))
    sampled = stage.add(torch.ones(3 * SAMPLE))  # sampled down to SAMPLE values
    batch = DeviceBatch()
    stage.put(batch, "s")
    stats = stage.results(batch.fetch())
    assert stats[full][RowStat.NONZERO] == SAMPLE and stats[full][RowStat.SATURATED] == SAMPLE
    assert stats[empty][RowStat.NONZERO] == 0 and stats[empty][RowStat.SATURATED] == 0
    assert stats[sampled][RowStat.NONZERO] == SAMPLE


def test_hooks_are_added_after_the_users_and_removed_without_a_trace():
    from gradscope.guard import Guard
    from gradscope.signals.activations import ActivationCollector

    calls = []

    class Own(nn.Linear):  # a module with its own registration: used as it is
        def register_forward_hook(self, hook, **kwargs):
            calls.append("own")
            return super().register_forward_hook(hook, **kwargs)

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Own(4, 2))
    order = []
    model[0].register_forward_hook(lambda *a: order.append("user"))
    before = {name: (list(m._forward_hooks), list(m._forward_pre_hooks))
              for name, m in model.named_modules()}
    collector = ActivationCollector(model, Guard())
    for _ in range(2):
        collector.attach()
        assert collector.attached and calls
        first = list(model[0]._forward_hooks.values())
        assert len(first) == 2 and first[1] is not first[0]  # after the user's hook
        model(torch.randn(2, 3))
        assert order == ["user"]
        collector.detach()
        order.clear()
        calls.clear()
        assert not collector.attached
        assert {name: (list(m._forward_hooks), list(m._forward_pre_hooks))
                for name, m in model.named_modules()} == before
    handle = model[1].register_forward_hook(lambda *a: None)  # torch's ids stay unique
    assert handle.id not in before["0"][0]


def test_inlined_leaf_calls_give_what_the_general_path_gives(monkeypatch):
    from gradscope.guard import Guard
    from gradscope.signals import activations
    from gradscope.signals.activations import ActivationCollector

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = nn.Sigmoid()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))  # a module called twice

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(10, 8), nn.Flatten(), nn.Linear(32, 8), nn.Tanh(), nn.Identity(),
        Twice(), nn.Linear(8, 8), nn.Dropout(0.5, inplace=True), nn.Linear(8, 300 * 64),
        nn.Tanh(), nn.Linear(300 * 64, 8), nn.Hardtanh(-0.5, 0.5))
    ids = torch.randint(0, 10, (3, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # NaN/Inf counts too
    tables = []
    for inline in (True, False):
        monkeypatch.setattr(activations, "INLINE_LEAF_CALLS", inline)
        collector = ActivationCollector(model, Guard())
        collector.attach()
        torch.manual_seed(1)  # the same dropout mask
        model(ids)
        batch = DeviceBatch()
        collector.put(batch)
        tables.append(collector.results(batch.fetch()))
        collector.detach()
    fast, general = tables
    assert fast._names == general._names and len(fast._names) > 12
    np.testing.assert_array_equal(fast._floats, general._floats)
    np.testing.assert_array_equal(fast._ints, general._ints)
    np.testing.assert_array_equal(fast._flags, general._flags)
    assert np.nansum(fast._floats[:, 3]) > 0  # NaN/Inf fractions were counted


def test_cached_step_layouts_give_what_a_fresh_collector_gives():
    """A collector keeps its index plans per step layout; steps whose layout changes (a
    module called once or twice, a branch skipped, NaN in one step, a bounded functional
    input appearing) must read exactly what a collector seeing that step alone reads."""
    from gradscope.guard import Guard
    from gradscope.signals.activations import ActivationCollector

    class Varying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.act = nn.Tanh()
            self.relu = nn.ReLU()
            self.side = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x, calls: int, branch: bool, functional: bool):
            for _ in range(calls):
                x = self.act(self.fc(x))
            if branch:
                x = self.relu(self.side(x))
            if functional:
                x = torch.sigmoid(x)
            return self.head(x)

    torch.manual_seed(0)
    model = Varying()
    layouts = [(1, False, False, False), (2, False, False, False), (1, True, False, True),
               (3, True, True, False), (1, False, False, False), (2, True, True, True),
               (1, True, False, False)]
    reused = ActivationCollector(model, Guard())
    for i, (calls, branch, nan, functional) in enumerate(layouts):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(i))
        if nan:
            x[0, 0] = float("nan")
        tables = []
        for collector in (reused, ActivationCollector(model, Guard())):
            collector.attach()
            model(x, calls, branch, functional)
            batch = DeviceBatch()
            collector.put(batch)
            tables.append(collector.results(batch.fetch()))
            collector.detach()
        cached, fresh = tables
        assert cached._names == fresh._names
        np.testing.assert_array_equal(cached._floats, fresh._floats)
        np.testing.assert_array_equal(cached._ints, fresh._ints)
        np.testing.assert_array_equal(cached._flags, fresh._flags)
    assert len(reused._plans) >= 4  # several layouts were planned, then reused
