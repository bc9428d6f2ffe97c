"""gradscope signals in TensorBoard: per-layer gradient norms, update ratios, dead units.

A deep sigmoid MLP trains with gradscope watching; a TensorBoardExporter writes every recorded
step (grad_norm/<layer>, update_ratio/<layer>, saturated/<module>, ...) and each diagnosis as
text. Then open TensorBoard on the log directory.

    python examples/tensorboard_example.py --log-dir runs/sigmoid
    tensorboard --logdir runs
    python examples/tensorboard_example.py --fast   # a few seconds (also: GRADSCOPE_FAST=1)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

try:
    import tensorboard  # noqa: F401  (the exporter writes its event files)
except ModuleNotFoundError:
    sys.exit("This example needs tensorboard: pip install -e '.[tensorboard]'")

import gradscope
from gradscope.integrations.tensorboard import TensorBoardExporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run (for tests)")
    parser.add_argument("--log-dir", default="runs/gradscope", help="TensorBoard log directory")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("GRADSCOPE_FAST") == "1"

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(8):  # deep and sigmoid: gradients fade toward the first layers
        layers += [nn.Linear(32 if i else 16, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=gen)
    y = x[:, :4].sum(dim=1, keepdim=True)

    scope = gradscope.watch(model, optimizer, every=5)
    TensorBoardExporter(args.log_dir).attach(scope)      # written on every recorded step
    for _ in range(40 if fast else 1000):
        batch = torch.randint(0, len(x), (64,), generator=gen)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        scope.step(loss)
    scope.close()                                         # flushes and closes the writer
    scope.report()
    print(f"TensorBoard logs written to {args.log_dir}: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
