"""Running the checkup from the training-framework callbacks, on their first batch."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .result import Checkup
from .run import checkup


class TrainingStep(nn.Module):
    """A LightningModule seen as a model that returns its loss: `forward(batch=...)` runs
    `training_step(batch, 0)` and returns `{"loss": ...}`.

    Example:
        >>> import torch
        >>> class Step(nn.Module):
        ...     def training_step(self, batch, index):
        ...         return batch.sum()
        >>> TrainingStep(Step())(batch=torch.ones(2))["loss"]
        tensor(2.)
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log() without a trainer warns and returns
            step: Any = self.module.training_step
            out = step(batch, 0)
        loss = out.get("loss") if isinstance(out, dict) else out
        return {"loss": loss}


def options_of(setting: bool | dict[str, Any]) -> dict[str, Any]:
    """Keyword options for checkup() from a callback's `checkup=` (True or a dict)."""
    return dict(setting) if isinstance(setting, dict) else {}


def lightning_checkup(pl_module: nn.Module, batch: Any, optimizer: Any,
                      setting: bool | dict[str, Any]) -> Checkup:
    """The checkup of a LightningModule on one batch, its loss from `training_step`."""
    return checkup(TrainingStep(pl_module), {"batch": batch}, None, optimizer,
                   **options_of(setting))


def transformers_checkup(model: nn.Module, inputs: dict[str, Any], optimizer: Any,
                         setting: bool | dict[str, Any]) -> Checkup:
    """The checkup of a transformers model on the keyword arguments of its first forward."""
    batch = {k: v for k, v in inputs.items() if k != "num_items_in_batch"}
    return checkup(model, batch, None, optimizer, **options_of(setting))
