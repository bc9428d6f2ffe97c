"""Demo scenarios: small models broken on purpose (and one healthy), trained on synthetic data.

Each builder returns ``(model, optimizer, batch_fn, loss_fn, loop_kind)``:
``batch_fn(step) -> (x, y)``, ``loss_fn(output, y) -> loss`` and ``loop_kind`` is
``"standard"`` or ``"no-zero-grad"`` (the loop forgets ``optimizer.zero_grad()``).

Example:
    >>> model, opt, batch_fn, loss_fn, kind = build("detached")
    >>> kind
    'standard'
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .errors import GradscopeError

Built = tuple[nn.Module, torch.optim.Optimizer, Callable[[int], tuple[torch.Tensor, torch.Tensor]],
              Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]

IN_FEATURES = 16
BATCH = 64


def _regression_data(seed: int, out_features: int = 1
                     ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A fixed smooth target: y = tanh(x @ A) @ B, with fresh inputs every step."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(IN_FEATURES, 8, generator=gen) / IN_FEATURES ** 0.5
    b = torch.randn(8, out_features, generator=gen)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randn(BATCH, IN_FEATURES, generator=g)
        return x, torch.tanh(x @ a) @ b

    return batch


def _mlp(widths: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def vanishing(seed: int = 0) -> Built:
    """12 sigmoid layers with a small init: the backward signal shrinks at every layer."""
    torch.manual_seed(seed)
    model = _mlp([IN_FEATURES] + [32] * 11 + [1], nn.Sigmoid)
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
            nn.init.zeros_(module.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, _regression_data(seed), nn.functional.mse_loss, "standard"


def exploding(seed: int = 0) -> Built:
    """A linear regressor started next to the exact fit, with a learning rate just past the
    stability limit: each step overshoots the fit further, so the gradients grow a few times
    per step, from a healthy start, for dozens of steps until the loss overflows."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(1, IN_FEATURES, generator=gen) / IN_FEATURES ** 0.5
    layer = nn.Linear(IN_FEATURES, 1)
    with torch.no_grad():
        layer.weight.copy_(target + 3e-4 * torch.randn(1, IN_FEATURES, generator=gen))
        layer.bias.zero_()
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=1.6)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randn(BATCH, IN_FEATURES, generator=g)
        return x, x @ target.T

    return model, opt, batch, nn.functional.mse_loss, "standard"


def dead_relu(seed: int = 0) -> Built:
    """ReLU layers with large negative biases: most hidden units never switch on."""
    torch.manual_seed(seed)
    model = _mlp([IN_FEATURES, 64, 64, 64, 1], nn.ReLU)
    for module in list(model)[:-1]:
        if isinstance(module, nn.Linear):
            nn.init.constant_(module.bias, -4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, _regression_data(seed), nn.functional.mse_loss, "standard"


def forgot_zero_grad(seed: int = 0) -> Built:
    """A sound MLP trained by a loop that never clears the gradients."""
    torch.manual_seed(seed)
    model = _mlp([IN_FEATURES, 64, 64, 1], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, _regression_data(seed), nn.functional.mse_loss, "no-zero-grad"


class DetachedBranch(nn.Module):
    """Two branches joined by a head; the side branch's output is detached by mistake."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(IN_FEATURES, 32), nn.ReLU())
        self.side = nn.Sequential(nn.Linear(IN_FEATURES, 32), nn.ReLU())
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side(x).detach()  # the mistake: this cuts the side branch off the graph
        return self.head(torch.cat([self.trunk(x), side], dim=-1))


def detached(seed: int = 0) -> Built:
    """A branch whose output goes through .detach(): its parameters never get a gradient."""
    torch.manual_seed(seed)
    model = DetachedBranch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, _regression_data(seed), nn.functional.mse_loss, "standard"


def healthy(seed: int = 0) -> Built:
    """A small ReLU MLP with a sensible init and learning rate: nothing to report."""
    torch.manual_seed(seed)
    model = _mlp([IN_FEATURES, 64, 64, 1], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return model, opt, _regression_data(seed), nn.functional.mse_loss, "standard"


@dataclass(frozen=True)
class Scenario:
    """A demo: its builder, what it shows and the signs gradscope should find."""

    name: str
    build: Callable[[int], Built]
    expects: tuple[str, ...]
    steps: int = 120


SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (
        Scenario("vanishing", vanishing, ("grad-vanishing",), steps=80),
        Scenario("exploding", exploding, ("grad-exploding", "loss-nonfinite"), steps=60),
        Scenario("dead-relu", dead_relu, ("units-dead",)),
        Scenario("forgot-zero-grad", forgot_zero_grad, ("grad-accumulating",)),
        Scenario("detached", detached, ("grad-none",)),
        Scenario("healthy", healthy, ()),
    )
}
DEFAULT = "vanishing"


def build(name: str, seed: int = 0) -> Built:
    """Build one scenario by name (see SCENARIOS)."""
    if name not in SCENARIOS:
        raise GradscopeError(f"unknown demo scenario {name!r}; pick one of: "
                             f"{', '.join(SCENARIOS)}.")
    return SCENARIOS[name].build(seed)


def train(model: nn.Module, optimizer: torch.optim.Optimizer,
          batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loop_kind: str,
          steps: int, scope: Any = None, delay: float = 0.0) -> list[float]:
    """Run the scenario's training loop (calling scope.step(loss) when given); return losses."""
    losses = []
    for step in range(steps):
        x, y = batch_fn(step)
        if loop_kind != "no-zero-grad":
            optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if scope is not None:
            scope.step(loss)
        losses.append(float(loss.detach()))
        if delay:
            time.sleep(delay)
    return losses


def run_demo(name: str = DEFAULT, steps: int | None = None, out: str | Path | None = None,
             live: bool | str = True, log_dir: str | Path | None = None,
             file: IO[str] | None = None, seed: int = 0) -> tuple[Any, Path]:
    """Train one scenario under gradscope, print the report, save the plot; (scope, plot path).

    Example:
        >>> import io, tempfile
        >>> scope, path = run_demo("healthy", steps=5, out=tempfile.mkdtemp() + "/h.png",
        ...                        live=False, file=io.StringIO())
        >>> path.exists()
        True
    """
    from . import watch

    scenario = SCENARIOS.get(name)
    if scenario is None:
        raise GradscopeError(f"unknown demo scenario {name!r}; pick one of: "
                             f"{', '.join(SCENARIOS)}.")
    steps = scenario.steps if steps is None else steps
    if steps < 1:
        raise GradscopeError(f"steps={steps} must be at least 1.")
    model, optimizer, batch_fn, loss_fn, kind = scenario.build(seed)
    torch.manual_seed(seed)
    with watch(model, optimizer, every=1, live=live, log_dir=log_dir) as scope:
        train(model, optimizer, batch_fn, loss_fn, kind, steps, scope)
    scope.report(file=file)
    path = Path(out) if out is not None else Path(f"gradscope-demo-{name}.png")
    scope.plot(path)
    return scope, path
