"""Checkup: run the debugging checklist on a model before training it.

A small residual CNN with three bugs: its images arrive as raw 0..255 pixels, the output of
its stem is detached before the residual blocks (so the stem never learns), and the
learning rate is far too small. `gradscope.checkup()` finds all three in a few seconds, on
copies (the model, optimizer and random streams are untouched), then the fixed set-up passes.

    python examples/checkup_example.py            # full overfit and range tests
    python examples/checkup_example.py --fast     # quick mode (also: GRADSCOPE_FAST=1)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import gradscope


class Block(nn.Module):
    """conv-BN-ReLU(inplace)-conv-BN, `out += x`, ReLU(inplace)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x
        return F.relu(out, inplace=True)


class SmallResNet(nn.Module):
    def __init__(self, detach_stem: bool, classes: int = 10) -> None:
        super().__init__()
        self.detach_stem = detach_stem
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.detach_stem:
            x = x.detach()  # bug: nothing before this line gets a gradient
        x = self.blocks(x)
        return self.head(x.mean(dim=(2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="quick mode (for tests)")
    parser.add_argument("--plot", default="checkup.png", help="where to save the figure")
    args = parser.parse_args()
    quick = args.fast or os.environ.get("GRADSCOPE_FAST") == "1"

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (32, 3, 16, 16), generator=gen).float()  # raw 8-bit images
    labels = torch.randint(0, 10, (32,), generator=gen)

    torch.manual_seed(0)
    model = SmallResNet(detach_stem=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.9)
    ck = gradscope.checkup(model, (pixels, labels), F.cross_entropy, optimizer, quick=quick)
    ck.report()
    print(f"figure saved to {ck.plot(args.plot)}")

    # the fixes: normalised images, no detach, a learning rate from the range test
    mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
    std = pixels.std(dim=(0, 2, 3), keepdim=True)
    images = (pixels - mean) / std
    model = SmallResNet(detach_stem=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fixed = gradscope.checkup(model, (images, labels), F.cross_entropy, optimizer, quick=quick)
    problems = [d.sign for d in fixed.diagnoses if d.severity != "info"]
    print(f"after the fixes: {problems or 'no problems found'} "
          f"({fixed.seconds:.1f}s; {fixed['overfit'].summary})")


if __name__ == "__main__":
    main()
