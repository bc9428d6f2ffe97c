"""Regenerate the figures used by docs/plots.md (deterministic: fixed seeds, synthetic data).

    python docs/make_images.py
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

import gradscope
from gradscope.demo import run_demo
from gradscope.report.plots import save_plot

HERE = Path(__file__).parent / "images"


def demo_figures() -> None:
    for name in ("vanishing", "dead-relu"):
        scope, _ = run_demo(name, out=HERE / f"demo-{name}.png", live=False, file=io.StringIO())
        save_plot(scope.history, scope.diagnose(), HERE / f"demo-{name}.png", dpi=72)


def deep_figure() -> None:
    """A 201-layer model: the heat map and folded layer labels."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for i in range(100):
        blocks += [nn.Linear(32, 32), nn.LayerNorm(32), nn.ReLU() if i % 2 else nn.Tanh()]
    model = nn.Sequential(*blocks, nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    with gradscope.watch(model, opt, every=4) as scope:
        for _ in range(60):
            x = torch.randn(32, 32, generator=gen)
            opt.zero_grad()
            loss = (model(x) - x[:, :1]).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    save_plot(scope.history, scope.diagnose(), HERE / "deep-201-layers.png", dpi=72)


if __name__ == "__main__":
    torch.set_num_threads(1)
    HERE.mkdir(exist_ok=True)
    demo_figures()
    deep_figure()
    for path in sorted(HERE.glob("*.png")):
        print(f"{path} ({path.stat().st_size // 1024} KiB)")
