"""Small real training loops, broken on purpose (and healthy ones), for the rule scenario suite.

Each scenario trains on synthetic data on the CPU with gradscope attached and returns the Scope.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradscope

Loop = Callable[[], gradscope.Scope]

NEEDS_TRANSFORMERS = "needs transformers: pip install -e '.[test]'"


def _teacher_regression(n_in: int = 16, n_out: int = 1, seed: int = 0):
    """Batches of a learnable regression task: y = tanh(x W1) W2 with a fixed random teacher."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(n_in, 32, generator=g) / math.sqrt(n_in), torch.randn(32, n_out,
                                                                               generator=g)

    def batch(size: int = 64):
        x = torch.randn(size, n_in, generator=g)
        return x, torch.tanh(x @ w1) @ w2

    return batch


def _teacher_classes(n_in: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_in, classes, generator=g)

    def batch(size: int = 64):
        x = torch.randn(size, n_in, generator=g)
        return x, (x @ w).argmax(dim=1)

    return batch


def mlp(widths: list[int], act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def train(model: nn.Module, opt: torch.optim.Optimizer | None, batch, loss_fn, steps: int,
          *, zero_grad: bool = True, transform=None, step_hook=None, **watch) -> gradscope.Scope:
    """A plain training loop with gradscope attached (every=1 unless told otherwise)."""
    watch.setdefault("every", 1)
    scope = gradscope.watch(model, opt, **watch)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        if step_hook is not None:
            step_hook(step, model)
        x, y = batch()
        if transform is not None:
            x = transform(step, x)
        if zero_grad:
            if opt is not None:
                opt.zero_grad()
            else:
                for p in params:
                    p.grad = None
        loss = loss_fn(model(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
        scope.step(loss)
    scope.close()
    return scope


mse = nn.functional.mse_loss
xent = nn.functional.cross_entropy


# ----------------------------------------------------------------------------- loss-flat
def flat_lr_too_low() -> gradscope.Scope:
    model = mlp([16, 64, 64, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-8)
    return train(model, opt, _teacher_regression(), mse, 110)


def flat_broken_gradient_flow() -> gradscope.Scope:
    """A wrong scale factor on the output: every gradient is ~1e-9 of what it should be."""
    model = mlp([16, 64, 64, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return train(model, opt, _teacher_regression(), lambda out, y: mse(out * 1e-9, y), 110)


def flat_saturated() -> gradscope.Scope:
    """Sigmoid layers with weights 100x too large and MSE on a sigmoid output: outputs are
    pinned at 0 and 1, where the sigmoid passes back almost no gradient."""
    model = nn.Sequential(nn.Linear(16, 64), nn.Sigmoid(), nn.Linear(64, 1), nn.Sigmoid())
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = _teacher_regression()

    def batch():
        x, y = teacher()
        return x, (y > 0).float()

    return train(model, opt, batch, mse, 110)


# ----------------------------------------------------------------------------- loss-nonfinite
class LogFeatures(nn.Module):
    """A feature transform with a bug: log of values that can be negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def nonfinite_invalid_math() -> gradscope.Scope:
    model = nn.Sequential(nn.Linear(16, 32), LogFeatures(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return train(model, opt, _teacher_regression(), mse, 10)


def nonfinite_data() -> gradscope.Scope:
    model = mlp([16, 32, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def poison(step, x):
        if step >= 30:
            x = x.clone()
            x[0, 0] = float("nan")
        return x

    return train(model, opt, _teacher_regression(), mse, 35, transform=poison)


def nonfinite_exploding() -> gradscope.Scope:
    """SGD far above the stable learning rate on a linear model: geometric divergence."""
    model = mlp([16, 32, 1], act=nn.Identity)
    opt = torch.optim.SGD(model.parameters(), lr=0.6)
    return train(model, opt, _teacher_regression(), mse, 120)


# ----------------------------------------------------------------------------- grad-none
class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(16, 1)
        self.side = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.side(x).detach()  # the bug: .detach() cuts the side branch


def none_detached() -> gradscope.Scope:
    model = TwoBranch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train(model, opt, _teacher_regression(), mse, 30)


def none_requires_grad_off() -> gradscope.Scope:
    """Freezing code that runs after watching started, on the wrong layer."""
    model = mlp([16, 32, 32, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def freeze(step, m):
        if step == 5:
            m[2].weight.requires_grad_(False)
            m[2].bias.requires_grad_(False)

    return train(model, opt, _teacher_regression(), mse, 30, step_hook=freeze)


def none_loss_detached() -> gradscope.Scope:
    """The loss rebuilt from a Python float: nothing upstream gets a gradient."""
    model = mlp([16, 32, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return train(model, opt, _teacher_regression(),
                 lambda out, y: torch.tensor(mse(out, y).item(), requires_grad=True), 30)


# ----------------------------------------------------------------------------- layers-stalled
def stalled_missing_from_optimizer() -> gradscope.Scope:
    model = mlp([16, 64, 64, 1])
    head = model[4]
    params = [p for p in model.parameters() if all(p is not q for q in head.parameters())]
    opt = torch.optim.SGD(params, lr=0.05)
    return train(model, opt, _teacher_regression(), mse, 40)


def stalled_dead_layer() -> gradscope.Scope:
    """A middle ReLU layer whose bias starts very negative: nothing reaches the layers before."""
    model = mlp([16, 64, 64, 64, 1])
    with torch.no_grad():
        model[2].bias.fill_(-20.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return train(model, opt, _teacher_regression(), mse, 40)


# ----------------------------------------------------------------------------- training-unstable
def unstable_lr_too_high() -> gradscope.Scope:
    """SGD with momentum at a learning rate just under divergence: the loss keeps bouncing."""
    model = mlp([16, 64, 64, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train(model, opt, _teacher_regression(), mse, 150)


def unstable_outlier_batches() -> gradscope.Scope:
    """Every 10th batch has a corrupt, 20x scaled input (a unit bug in part of the data)."""
    model = mlp([16, 64, 1], act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def outliers(step, x):
        return x * 20 if step % 10 == 0 and step > 0 else x

    return train(model, opt, _teacher_regression(), mse, 150, transform=outliers)


# ----------------------------------------------------------------------------- other signs
def vanishing_deep_sigmoid() -> gradscope.Scope:
    """Twelve sigmoid layers: each passes back at most a quarter of the gradient."""
    model = mlp([16] + [64] * 12 + [1], act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return train(model, opt, _teacher_regression(), mse, 40)


def vanishing_tiny_init() -> gradscope.Scope:
    """A deep linear stack initialised 20x too small: each layer shrinks the signal."""
    model = mlp([16] + [64] * 8 + [1], act=nn.Identity)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return train(model, opt, _teacher_regression(), mse, 40)


def exploding_lr() -> gradscope.Scope:
    """A linear regression stepped just past its stability limit: each step overshoots more."""
    model = nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.1)
    return train(model, opt, _teacher_regression(), mse, 60)


def accumulating_no_zero_grad() -> gradscope.Scope:
    model = mlp([16, 32, 1])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return train(model, opt, _teacher_regression(), mse, 30, zero_grad=False)


def frozen_missing_from_optimizer() -> gradscope.Scope:
    """A head added after the optimizer was built."""
    model = mlp([16, 32, 8])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.append(nn.ReLU())
    model.append(nn.Linear(8, 1))
    return train(model, opt, _teacher_regression(), mse, 30)


def dead_relu_bias() -> gradscope.Scope:
    model = mlp([16, 64, 64, 1])
    with torch.no_grad():
        model[0].bias[:48].fill_(-30.0)  # 75% of the first layer's units start dead
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train(model, opt, _teacher_regression(), mse, 40)


def saturated_raw_inputs() -> gradscope.Scope:
    """Unnormalised inputs (thousands) into a tanh layer."""
    model = mlp([16, 64, 1], act=nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train(model, opt, _teacher_regression(), mse, 40,
                 transform=lambda step, x: x * 2000 + 5000)


class MaskedSqrt(nn.Module):
    """sqrt of signed features, with the NaNs it makes hidden from the loss by nan_to_num."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def nonfinite_hidden_by_mask() -> gradscope.Scope:
    model = nn.Sequential(nn.Linear(16, 32), MaskedSqrt(), nn.Linear(32, 1))

    def loss_fn(out, y):
        return mse(torch.nan_to_num(out), y)

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return train(model, opt, _teacher_regression(), loss_fn, 10)


def data_unscaled() -> gradscope.Scope:
    """Raw features in the tens of thousands fed straight into a ReLU MLP."""
    model = mlp([16, 32, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return train(model, opt, _teacher_regression(), lambda out, y: mse(out * 1e-4, y), 30,
                 transform=lambda step, x: x * 1e4)


# ----------------------------------------------------------------------------- healthy runs
def healthy_mlp(**watch) -> gradscope.Scope:
    model = mlp([16, 64, 64, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train(model, opt, _teacher_regression(), mse, 120, **watch)


class BasicBlock(nn.Module):
    """A ResNet block: conv-BN-ReLU(inplace)-conv-BN, `out += identity`, ReLU(inplace)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def small_resnet(classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        BasicBlock(16), BasicBlock(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def _teacher_images(classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(classes, 3, 8, 8, generator=g)

    def batch(size: int = 32):
        y = torch.randint(0, classes, (size,), generator=g)
        return proto[y] + 0.8 * torch.randn(size, 3, 8, 8, generator=g), y

    return batch


def healthy_cnn(**watch) -> gradscope.Scope:
    model = small_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train(model, opt, _teacher_images(), xent, 60, **watch)


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 32, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _teacher_sequences(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def batch(size: int = 32):
        x = torch.randn(size, 12, 4, generator=g)
        return x, (x[:, :, 0].sum(dim=1) > 0).long()

    return batch


def healthy_lstm(**watch) -> gradscope.Scope:
    model = LSTMClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return train(model, opt, _teacher_sequences(), xent, 100, **watch)


def _pattern_tokens(vocab: int = 64, length: int = 16, seed: int = 0):
    """Token sequences counting up from a random start (mod vocab): learnable next-token task."""
    g = torch.Generator().manual_seed(seed)

    def batch(size: int = 8):
        start = torch.randint(0, vocab, (size, 1), generator=g)
        ids = (start + torch.arange(length)) % vocab
        return ids, ids

    return batch


def healthy_gpt2(**watch) -> gradscope.Scope:
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return _train_lm(model, opt, 60, **watch)


def _train_lm(model, opt, steps: int, **watch) -> gradscope.Scope:
    watch.setdefault("every", 1)
    batch = _pattern_tokens()
    scope = gradscope.watch(model, opt, **watch)
    for _ in range(steps):
        ids, _ = batch()
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    return scope


def healthy_bert(**watch) -> gradscope.Scope:
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        num_labels=2)
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    watch.setdefault("every", 1)
    scope = gradscope.watch(model, opt, **watch)
    for _ in range(60):
        ids = torch.randint(1, 64, (16, 12), generator=g)
        labels = (ids[:, 0] < 32).long()  # the label is readable from the first token
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    return scope


def healthy_micro_batches(**watch) -> gradscope.Scope:
    """Intentional gradient accumulation: 4 micro-batches per optimizer step."""
    model = mlp([16, 64, 64, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = _teacher_regression()
    watch.setdefault("every", 1)
    scope = gradscope.watch(model, opt, **watch)
    for _ in range(80):
        opt.zero_grad()
        total = 0.0
        for _ in range(4):
            x, y = batch(16)
            loss = mse(model(x), y) / 4
            loss.backward()
            total += loss.detach()
        opt.step()
        scope.step(total)
    scope.close()
    return scope


def healthy_bf16(**watch) -> gradscope.Scope:
    """bf16 autocast on the CPU (the CNN with BatchNorm and in-place residuals)."""
    model = small_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = _teacher_images()
    watch.setdefault("every", 1)
    scope = gradscope.watch(model, opt, **watch)
    for _ in range(60):
        x, y = batch()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = xent(model(x), y)
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    return scope
