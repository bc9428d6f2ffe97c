"""`gradscope demo checkup`: the checkup on a small model with three bugs."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import torch
from torch import nn

from ..demo import IN_FEATURES, DetachedBranch
from .result import Checkup
from .run import checkup


def run_checkup_demo(out: str | Path | None = None, quick: bool = False,
                     file: IO[str] | None = None, seed: int = 0) -> tuple[Checkup, Path]:
    """Check a two-branch regression model whose side branch is detached, whose features are
    not normalised and whose learning rate is far too small; print the report, save the plot.

    Example:
        >>> import io, tempfile
        >>> ck, path = run_checkup_demo(tempfile.mkdtemp() + "/c.png", quick=True,
        ...                             file=io.StringIO())
        >>> sorted({d.sign for d in ck.diagnoses} & {"grad-none", "data-suspect", "loss-flat"})
        ['data-suspect', 'grad-none', 'loss-flat']
    """
    torch.manual_seed(seed)
    model = DetachedBranch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-8)
    gen = torch.Generator().manual_seed(seed)
    x = 30.0 * torch.randn(64, IN_FEATURES, generator=gen)  # raw, unscaled features
    y = torch.tanh(x[:, :1] / 30.0)
    ck = checkup(model, (x, y), nn.functional.mse_loss, optimizer, quick=quick)
    ck.report(file=file)
    path = ck.plot(out if out is not None else "gradscope-demo-checkup.png")
    return ck, path
