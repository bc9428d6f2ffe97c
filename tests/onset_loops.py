"""Broken training loops whose first bad step is known: each one goes non-finite (or blows
up) for one cause, on a real architecture. Used by test_onset.py.

`first_bad_step(loop)` finds the ground truth with plain torch (no gradscope): the first step
whose input, model output, loss or gradients hold NaN/Inf, or whose optimizer step leaves a
weight NaN/Inf.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Loop:
    """A broken loop: build() gives (model, optimizer); batch(step) the step's batch;
    forward(model, batch) -> (model output, loss)."""

    name: str
    build: Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
    batch: Callable[[int], tuple]
    forward: Callable[[nn.Module, tuple], tuple[torch.Tensor, torch.Tensor]]
    steps: int
    cause: str  # the expected top cause
    place: str | None  # module name, "loss", "input"; None: not checked (a blow-up)
    gap: bool = False  # the place is a parent whose own code did the bad math
    nan: bool = True  # False: a blow-up without NaN/Inf


def _gen(step: int, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + step)


# ----------------------------------------------------------------------- models
class RowNorm(nn.Module):
    """Scales each row to unit length, with no epsilon: an all-zero row gives 0/0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True)


class LogAct(nn.Module):
    """log of its input, with no floor: log(0) = -inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class NormMLP(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = nn.ReLU()
        self.norm = RowNorm()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act(self.fc1(self.norm(x))))))


class LogMLP(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = nn.ReLU()
        self.log = LogAct()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.log(self.act(self.fc1(x))))


class Block(nn.Module):
    """ResNet basic block with in-place ReLUs and `out += identity`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out += x
        return self.relu2(out)


class Stem(nn.Module):
    """Conv, then a per-batch standardisation in its own forward code (no epsilon), then BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=0)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = (h - h.mean(dim=(0, 2, 3), keepdim=True)) / h.std(dim=(0, 2, 3), keepdim=True)
        return self.bn(h)


class ResCNN(nn.Module):
    def __init__(self, channels: int = 4, classes: int = 3, standardise: bool = False) -> None:
        super().__init__()
        self.stem = Stem(channels) if standardise else nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU(inplace=True)
        self.block = Block(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.relu(self.stem(x)))
        return self.head(self.pool(h).flatten(1))


class LSTMNet(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def deep_mlp(depth: int = 8, width: int = 64, gain: float = 2.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    sizes = [16] + [width] * depth
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=gain / m.in_features ** 0.5)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


W_TRUE = torch.linspace(-1.0, 1.0, 16)


def near_solution(scale: float = 1e-4) -> nn.Module:
    """A linear regressor started close to the exact solution of its data."""
    model = nn.Sequential(nn.Linear(16, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W_TRUE + scale * torch.randn(16))
    return model


def _exact(step: int) -> tuple:
    x = torch.randn(256, 16, generator=_gen(step))
    return x, (x @ W_TRUE).unsqueeze(1)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------- batches and losses
def _classes(x: torch.Tensor, classes: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, classes, (x.shape[0],), generator=gen)


def _ce(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch[0])
    return out, F.cross_entropy(out, batch[1])


def _mse(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch[0])
    return out, F.mse_loss(out, batch[1])


def _onehot_log(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A hand-written cross-entropy: -onehot * log(softmax) underflows to 0 * log 0 = NaN."""
    out = model(batch[0])
    onehot = F.one_hot(batch[1], out.shape[1]).float()
    return out, -(onehot * torch.log(torch.softmax(out, dim=1))).sum(1).mean()


def _lm(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    result = model(input_ids=batch[0], labels=batch[0])
    return result.logits, result.loss


def _tabular(bad_step: int | None = None, zero_row: bool = False, nan_at: tuple = ()):
    def make(step: int) -> tuple:
        gen = _gen(step)
        x = torch.randn(16, 8, generator=gen)
        if step == bad_step and zero_row:
            x[5] = 0.0  # an all-zero row: its norm is 0
        return x, _classes(x, 3, gen)
    return make


def _images(bad_step: int | None = None, constant: bool = False, nan_pixels: bool = False):
    def make(step: int) -> tuple:
        gen = _gen(step)
        x = torch.randn(8, 3, 10, 10, generator=gen)
        if step == bad_step and constant:
            x = torch.full_like(x, 0.5)  # one flat batch: every channel's std is 0
        if step == bad_step and nan_pixels:
            x[3, 1, 4, 2] = float("nan")
            x[6, 0, 0, 0] = float("inf")
        return x, _classes(x, 3, gen)
    return make


def _sequences(bad_step: int | None = None, scale: float = 1.0, inf_row: bool = False):
    def make(step: int) -> tuple:
        gen = _gen(step)
        x = torch.randn(8, 7, 6, generator=gen) * 0.05
        if step == bad_step:
            x = x * scale
            if inf_row:
                x[2, 4, 1] = float("inf")
        return x, _classes(x, 5, gen)
    return make


def _regression(step: int) -> tuple:
    gen = _gen(step)
    x = torch.randn(32, 16, generator=gen)
    return x, x[:, :1] * 2.0 - x[:, 1:2]


def _tokens(step: int) -> tuple:
    return (torch.randint(0, 64, (4, 16), generator=_gen(step)),)


def _seeded(build: Callable[[], nn.Module], opt: Callable, seed: int = 0):
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = build()
        return model, opt(model.parameters())
    return make


def _big_head_lstm() -> nn.Module:
    model = LSTMNet()
    nn.init.normal_(model.head.weight, std=60.0)
    return model


def _adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def _sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


LOOPS: dict[str, Loop] = {loop.name: loop for loop in (
    Loop("mlp-rownorm", _seeded(NormMLP, _adam(1e-3)), _tabular(23, zero_row=True), _ce,
         30, "invalid-math", "norm"),
    Loop("mlp-log-relu", _seeded(LogMLP, _adam(1e-3)), _tabular(), _ce, 12,
         "invalid-math", "log"),
    Loop("cnn-standardise", _seeded(lambda: ResCNN(standardise=True), _sgd(0.05)),
         _images(17, constant=True), _ce, 25, "invalid-math", "stem", gap=True),
    Loop("cnn-nan-pixels", _seeded(ResCNN, _sgd(0.05)), _images(14, nan_pixels=True), _ce,
         22, "data-nonfinite", "input"),
    Loop("lstm-inf-input", _seeded(LSTMNet, _adam(1e-2)), _sequences(12, inf_row=True), _ce,
         20, "data-nonfinite", "input"),
    Loop("lstm-onehot-log", _seeded(_big_head_lstm, _adam(1e-3)), _sequences(26, scale=400.0),
         _onehot_log, 32, "invalid-math", "loss"),
    Loop("mlp-sgd-lr-nan", _seeded(lambda: deep_mlp(depth=4, gain=1.4), _sgd(3.0)),
         _regression, _mse, 30, "lr-too-high", None),
    Loop("gpt2-sgd-lr-nan", _seeded(gpt2, _sgd(2000.0)), _tokens, _lm, 30, "lr-too-high", None),
    # each step multiplies the distance to the solution by |1 - lr * curvature| ~ 2:
    # gradients double step after step from a healthy start until they overflow
    Loop("linear-exploding", _seeded(near_solution, _sgd(1.5)), _exact, _mse, 75,
         "exploding-gradients", None),
    Loop("mlp-sgd-lr10", _seeded(lambda: nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3)), _sgd(10.0)),
         _tabular(), _ce, 30, "lr-too-high", None, nan=False),
)}


def _nonfinite(t: torch.Tensor | None) -> bool:
    return t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())


def run_plain(loop: Loop, steps: int | None = None, step_fn: Callable | None = None
              ) -> list[dict]:
    """Train the loop with plain torch; per step: loss, grad norm, bad input/output/loss/
    grads/weights flags. `step_fn(loss)` (e.g. scope.step) is called at the end of a step."""
    model, opt = loop.build()
    out_rows = []
    for step in range(loop.steps if steps is None else steps):
        batch = loop.batch(step)
        opt.zero_grad()
        out, loss = loop.forward(model, batch)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))
        row = {"step": step, "loss": float(loss), "grad_norm": norm,
               "input": _nonfinite(batch[0]), "output": _nonfinite(out),
               "loss_bad": not math.isfinite(float(loss)),
               "grads": any(_nonfinite(g) for g in grads)}
        opt.step()
        row["weights"] = any(_nonfinite(p.detach()) for p in model.parameters())
        if step_fn is not None:
            step_fn(loss)
        out_rows.append(row)
    return out_rows


def first_bad_step(rows: list[dict]) -> int | None:
    """The first step where anything went non-finite (None if nothing did)."""
    for row in rows:
        if any(row[k] for k in ("input", "output", "loss_bad", "grads", "weights")):
            return row["step"]
    return None


def first_blowup_step(rows: list[dict], factor: float = 1e3) -> int | None:
    """The first step whose loss is `factor` times the loss of step 0."""
    for row in rows[1:]:
        if row["loss"] >= factor * rows[0]["loss"]:
            return row["step"]
    return None
