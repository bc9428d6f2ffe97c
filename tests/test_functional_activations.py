"""Activations applied functionally (`F.relu`, `torch.tanh`, `torch.sigmoid` inside a
forward) are measured at the input of the next parameterised module: dead units and
saturation are seen, named after that module, and nothing is measured twice."""

import pytest
import torch
import torch.nn.functional as F
from test_signals_activations import _assert_matches, _reference
from test_sync import COPIES, _measure
from test_sync import counter as counter  # the fixture
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope


class Functional(nn.Module):
    """A VAE-like encoder/decoder written the way the PyTorch examples write it."""

    def __init__(self, act=F.relu, bias: float | None = None) -> None:
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(20, 40)
        self.fc2 = nn.Linear(40, 8)
        self.fc3 = nn.Linear(8, 20)
        if bias is not None:
            with torch.no_grad():
                self.fc1.bias.fill_(bias)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return torch.sigmoid(self.fc3(F.relu(self.fc2(h))))


class Inputs:
    """Test-side pre-hooks keeping a copy of each named module's input."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args):
            self.inputs[name].append(args[0].detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _train(model, steps: int, every: int = 10, batch: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scope = gradscope.watch(model, opt, every=every)
    for _ in range(steps):
        x = torch.rand(batch, 20)
        loss = F.binary_cross_entropy(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    return scope


def test_functional_relu_input_statistics_and_dead_units_match_reference():
    model = Functional()
    with torch.no_grad():
        model.fc1.bias[:10] = -100.0  # 10 of 40 units can never be positive
    inputs = Inputs(model, ["fc2", "fc3"])
    scope = gradscope.watch(model, every=1)
    model(torch.randn(32, 20)).sum().backward()
    scope.step()
    scope.close()
    inputs.remove()
    acts = scope.history.last.activations
    for name in ("fc2", "fc3"):
        stats = acts[f"{name}:input"]
        x = inputs.inputs[name][0]
        _assert_matches(stats, _reference([x]))
        dead = (x <= 0).all(dim=0)
        assert stats.dead_frac == pytest.approx(dead.double().mean().item())
        assert stats.saturated_frac is None and stats.calls == 1
    assert acts["fc2:input"].dead_frac >= 10 / 40
    assert "fc1:input" not in acts  # the data, not an activation's output
    assert acts["fc1"].dead_frac is None  # a Linear's own output has no units that die


@pytest.mark.parametrize("act, bounds", [(torch.tanh, (-1.0, 1.0)),
                                         (torch.sigmoid, (0.0, 1.0))], ids=["tanh", "sigmoid"])
def test_functional_bounded_activation_input_saturation_matches_reference(act, bounds):
    model = Functional(act=act)
    with torch.no_grad():
        model.fc1.weight.mul_(10)
    inputs = Inputs(model, ["fc2"])
    scope = gradscope.watch(model, every=1)
    model(torch.randn(32, 20)).sum().backward()
    scope.step()
    scope.close()
    inputs.remove()
    stats = scope.history.last.activations["fc2:input"]
    _assert_matches(stats, _reference(inputs.inputs["fc2"], bounds))
    assert 0.1 < stats.saturated_frac < 1.0 and stats.dead_frac is None


def test_activation_modules_and_plain_inputs_are_not_measured_again():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 2))
    scope = gradscope.watch(model, every=1)
    model(torch.randn(16, 6)).sum().backward()
    scope.step()
    scope.close()
    assert not [n for n in scope.history.last.activations if n.endswith(":input")]


def test_functional_input_counted_once_under_checkpointing_and_pooled_over_calls():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 6)
            self.fc2 = nn.Linear(6, 6)

        def block(self, x):
            return self.fc2(F.relu(self.fc1(x)))

        def forward(self, x):
            x = checkpoint(self.block, x, use_reentrant=False)
            return self.fc2(F.relu(x))  # fc2 called a second time

    model = Shared()
    scope = gradscope.watch(model, every=1)
    model(torch.randn(8, 6)).sum().backward()
    scope.step()
    scope.close()
    assert scope.history.last.activations["fc2:input"].calls == 2


def test_dead_functional_relu_is_reported_at_the_next_layers_input_within_40_steps():
    scope = _train(Functional(bias=-50.0), steps=40)
    dead = [d for d in scope.diagnose() if d.sign == "units-dead"]
    assert dead, [d.sign for d in scope.diagnose()]
    assert ("the input of 'fc2' (after a functional ReLU in the model's forward)"
            in dead[0].summary)
    assert dead[0].first_step <= 30


def test_healthy_functional_relu_model_raises_no_warning():
    scope = _train(Functional(), steps=60)
    assert [d.sign for d in scope.diagnose() if d.severity != "info"] == []


def test_relu_seen_through_max_pooling_counts_dead_channels():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3)
            self.conv2 = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))

    model = Net()
    with torch.no_grad():
        model.conv1.bias[2] = -100.0
    inputs = Inputs(model, ["conv2"])
    scope = gradscope.watch(model, every=1)
    model(torch.randn(8, 1, 12, 12)).sum().backward()
    scope.step()
    scope.close()
    inputs.remove()
    x = inputs.inputs["conv2"][0]
    dead = (x.amax(dim=(0, 2, 3)) <= 0)
    assert dead[2]
    stats = scope.history.last.activations["conv2:input"]
    assert stats.dead_frac == pytest.approx(dead.double().mean().item())


def test_one_activation_feeding_two_modules_is_measured_once():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.mu = nn.Linear(8, 2)
            self.logvar = nn.Linear(8, 2)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            return self.mu(h) + self.logvar(h)

    model = TwoHeads()
    scope = gradscope.watch(model, every=1)
    model(torch.randn(16, 6)).sum().backward()
    scope.step()
    scope.close()
    acts = scope.history.last.activations
    assert "mu:input" in acts and "logvar:input" not in acts


def test_functional_inputs_keep_one_transfer_per_recorded_step_and_none_otherwise(counter):
    model = Functional(bias=-50.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=3)
    per_step = []
    for _ in range(4):
        x = torch.rand(32, 20)

        def one_step(x=x):
            opt.zero_grad()
            loss = F.binary_cross_entropy(model(x), x)
            loss.backward()
            opt.step()
            scope.step(loss)
        per_step.append(sum(_measure(counter, one_step)[k] for k in COPIES))
    scope.close()
    assert "fc2:input" in scope.history.last.activations
    assert per_step == [1, 0, 0, 1]


def test_training_with_functional_inputs_measured_is_bit_identical():
    def train(watched: bool):
        torch.manual_seed(1)
        model = Functional(bias=-0.5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        scope = gradscope.watch(model, opt, every=1) if watched else None
        for _ in range(5):
            x = torch.rand(16, 20)
            loss = F.binary_cross_entropy(model(x), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if scope is not None:
                scope.step(loss)
        if scope is not None:
            assert "fc2:input" in scope.history.last.activations
            scope.close()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True), strict=True))


def test_functional_relu_before_a_dropout_module_is_measured_at_the_dropout():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.drop = nn.Dropout(0.5)
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(self.drop(F.relu(self.fc1(x))))

    model = Net()
    with torch.no_grad():
        model.fc1.bias[:6] = -100.0
    scope = gradscope.watch(model, every=1)
    model(torch.randn(32, 6)).sum().backward()
    scope.step()
    scope.close()
    acts = scope.history.last.activations
    assert acts["drop:input"].dead_frac >= 6 / 8
    assert "fc2:input" not in acts  # dropout's output: no activation's own
