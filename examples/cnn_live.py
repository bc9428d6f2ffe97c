"""A small CNN trained with gradscope's live view in the terminal.

The panel refreshes a few times a second: step, loss trend, the findings so far and a
per-layer table (gradient norm on a log bar, update/weight ratio, dead and saturated units).
The first block's ReLU follows a convolution whose bias is strongly negative for 12 of its 16
channels, so those never switch on: watch the "dead" column and the units-dead finding.

    python examples/cnn_live.py
    python examples/cnn_live.py --fast      # a few seconds (also: GRADSCOPE_FAST=1)
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import gradscope


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                  nn.Linear(64, classes))
        with torch.no_grad():  # the deliberate flaw: 12 of the 16 first-block channels start dead
            self.features[0].bias[:12].fill_(-20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def batches(steps: int, seed: int = 0):
    """Synthetic 16x16 images whose class is the position of a bright blob."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        y = torch.randint(0, 10, (32,), generator=gen)
        x = torch.randn(32, 1, 16, 16, generator=gen) * 0.3
        rows, cols = (y // 5) * 8 + 2, (y % 5) * 3 + 1
        for i in range(32):
            x[i, 0, rows[i]:rows[i] + 4, cols[i]:cols[i] + 2] += 2.0
        yield x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run (for tests)")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("GRADSCOPE_FAST") == "1"
    steps = 40 if fast else 400

    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    with gradscope.watch(model, optimizer, live=True, every=2) as scope:
        for x, y in batches(steps):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scope.step(loss)
    scope.report()


if __name__ == "__main__":
    main()
