"""Quickstart: watch a small training loop and read what gradscope says about it.

The model is fine; the optimizer is not: its learning rate is far too small, so the weights
barely move and the loss stays flat. gradscope's report names the sign (flat loss), the likely
cause (learning rate too low) and the numbers behind it (update/weight ratio per layer).

    python examples/quickstart.py           # 300 steps
    python examples/quickstart.py --fast    # a few seconds (also: GRADSCOPE_FAST=1)
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import gradscope


def make_data(n: int = 2048, features: int = 20, classes: int = 4, seed: int = 0):
    """A synthetic classification task that a small MLP can learn."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, classes, generator=gen)
    return x, (x @ w).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run (for tests)")
    parser.add_argument("--plot", default="quickstart.png", help="where to save the figure")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("GRADSCOPE_FAST") == "1"
    steps = 120 if fast else 300

    torch.manual_seed(0)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)  # the bug: ~1e-2 would learn
    loss_fn = nn.CrossEntropyLoss()

    scope = gradscope.watch(model, optimizer, every=5)       # 1. attach
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        scope.step(loss)                                     # 2. once per step
    scope.close()

    scope.report()                                           # what is wrong, what to check
    print(f"figure saved to {scope.plot(args.plot)}")


if __name__ == "__main__":
    main()
