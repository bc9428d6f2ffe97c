"""Benchmark workloads: a model, a few fixed synthetic batches and a loss function each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Workload:
    """One model to train: `build()` makes a fresh model, `loss(model, batch)` its loss.

    Example:
        >>> w = make_workload("deep10", torch.device("cpu"))
        >>> model = w.build(); float(w.loss(model, w.batches[0])) > 0
        True
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    batches: list[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    modules: int


def leaf_modules(model: nn.Module) -> int:
    """How many modules of `model` have no children (the ones doing the work)."""
    return sum(1 for m in model.modules() if not any(True for _ in m.children()))


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _lm(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def mlp(width: int = 1024, depth: int = 8) -> nn.Module:
    """`depth` Linear layers of `width` units with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU(inplace)-conv-BN, `out += identity`, ReLU(inplace)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def small_cnn(classes: int = 10) -> nn.Module:
    """A small ResNet for 32x32 images: stem, four basic blocks, pooling, linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        BasicBlock(32, 32), BasicBlock(32, 64, 2), BasicBlock(64, 64), BasicBlock(64, 128, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )


def deep(modules: int, width: int = 32) -> nn.Module:
    """`modules` small leaf modules: Linear(width, width) and Tanh, alternating.

    The Linear layers start near the identity so that gradients reach the first layers even
    at 1000 modules (with the default init most of them underflow to zero or to float32
    denormals, whose slow arithmetic would distort the timings).
    """
    layers: list[nn.Module] = []
    for _ in range(modules // 2):
        linear = nn.Linear(width, width)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(width) + 0.01 * torch.randn(width, width))
            linear.bias.zero_()
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers)


def gpt2(cuda: bool) -> tuple[Callable[[], nn.Module], int]:
    """A randomly initialised GPT-2 (small on CPU, ~125M parameters on CUDA) and its vocab."""
    import transformers

    transformers.logging.set_verbosity_error()
    if cuda:
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12)
    else:
        config = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=8192,
                                         n_positions=128, bos_token_id=0, eos_token_id=0)
    return (lambda: transformers.GPT2LMHeadModel(config)), config.vocab_size


WORKLOADS = ("mlp", "gpt2", "cnn", "deep10", "deep100", "deep1000")


def make_workload(name: str, device: torch.device, n_batches: int = 2) -> Workload:
    """Build workload `name` (one of WORKLOADS) with synthetic batches on `device`."""
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    if name == "mlp":
        batches = [(randn(256, 1024), randn(256, 1024)) for _ in range(n_batches)]
        return Workload(name, "8x Linear(1024), ReLU, batch 256", mlp, batches, _mse,
                        leaf_modules(mlp()))
    if name == "cnn":
        batch = 128 if cuda else 32
        batches = [(randn(batch, 3, 32, 32),
                    torch.randint(0, 10, (batch,), generator=gen).to(device))
                   for _ in range(n_batches)]
        return Workload(name, f"ResNet-style CNN, BatchNorm, inplace ReLU, batch {batch}x3x32x32",
                        small_cnn, batches, _cross_entropy, leaf_modules(small_cnn()))
    if name == "gpt2":
        build, vocab = gpt2(cuda)
        seq = 512 if cuda else 128
        batches = [torch.randint(0, vocab, (8, seq), generator=gen).to(device)
                   for _ in range(n_batches)]
        desc = ("GPT-2 12x768 (124M params), batch 8x512" if cuda
                else f"GPT-2 6x256, vocab {vocab}, batch 8x128")
        return Workload(name, desc, build, batches, _lm, leaf_modules(build()))
    if name.startswith("deep") and name[4:].isdigit():
        count = int(name[4:])
        batches = [(randn(64, 32), randn(64, 32)) for _ in range(n_batches)]
        return Workload(name, f"{count} modules: Linear(32)/Tanh pairs, batch 64",
                        lambda: deep(count), batches, _mse, count)
    raise ValueError(f"unknown workload {name!r}; use one of {', '.join(WORKLOADS)} or deepN.")
