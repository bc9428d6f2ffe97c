"""What checkup() is given: the batch, how to get a loss from it, and clear errors for bad input."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import GradscopeError

LossFn = Callable[[Any, Any], torch.Tensor]


def _clone(value: Any) -> Any:
    """A copy of every tensor in a nested batch (a model may write into its inputs in place)."""
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call `model` on `inputs`: a tensor as one argument, a tuple/list spread positionally,
    a dict spread as keywords.

    Example:
        >>> call_model(torch.nn.Identity(), {"input": torch.ones(1)})
        tensor([1.])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def model_loss(output: Any) -> torch.Tensor | None:
    """The loss a model returned itself (`output.loss`, `output["loss"]`), or None."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss if isinstance(loss, torch.Tensor) else None


def model_logits(output: Any) -> torch.Tensor | None:
    """The main output tensor: the output itself, `output.logits` or its first tensor item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else (
        value if isinstance(value, (tuple, list)) else ())
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


@dataclass
class Batch:
    """The checked batch: model inputs, targets and how the loss is computed from them.

    Example:
        >>> b = Batch.of((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)),
        ...              torch.nn.functional.cross_entropy)
        >>> b.self_loss, tuple(b.input.shape)
        (False, (2, 3))
    """

    inputs: Any
    targets: Any
    loss_fn: LossFn | None

    @classmethod
    def of(cls, batch: Any, loss_fn: LossFn | None) -> Batch:
        if loss_fn is not None and not callable(loss_fn):
            raise GradscopeError(
                f"checkup() got a {type(loss_fn).__name__} as loss_fn; pass a function "
                "loss_fn(outputs, targets) -> scalar tensor, or None for a model that returns "
                "its own loss.")
        if isinstance(batch, Mapping):
            if loss_fn is not None:
                raise GradscopeError(
                    "checkup() got a dict batch and a loss_fn; pass (inputs, targets) with a "
                    "loss_fn, or a dict batch with loss_fn=None for a model that returns its "
                    "loss (model(**batch).loss).")
            if not batch:
                raise GradscopeError("checkup() got an empty dict as batch; pass the keyword "
                                     "arguments of one training forward, labels included.")
            return cls(dict(batch), _labels(batch), None)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            if loss_fn is None:
                raise GradscopeError(
                    "checkup() got an (inputs, targets) batch but no loss_fn; pass "
                    "loss_fn(outputs, targets), e.g. torch.nn.functional.cross_entropy.")
            return cls(batch[0], batch[1], loss_fn)
        raise GradscopeError(
            f"checkup() needs the batch as a pair (inputs, targets) or, for a model that "
            f"returns its loss, a dict of keyword arguments; got "
            f"{_describe(batch)}.")

    @property
    def self_loss(self) -> bool:
        """True when the model computes the loss itself (dict batch, loss_fn=None)."""
        return self.loss_fn is None

    @property
    def input(self) -> torch.Tensor | None:
        """The first input tensor (the one the data checks look at)."""
        if self.self_loss:
            keys = [k for k in ("input_ids", "pixel_values", "inputs_embeds", "input_values")
                    if isinstance(self.inputs.get(k), torch.Tensor)]
            if keys:
                return self.inputs[keys[0]]
            return _first_tensor({k: v for k, v in self.inputs.items() if k != "labels"})
        return _first_tensor(self.inputs)

    @property
    def target(self) -> torch.Tensor | None:
        return self.targets if isinstance(self.targets, torch.Tensor) else None

    def forward(self, model: nn.Module, before_loss: Callable[[Any], None] | None = None
                ) -> tuple[Any, torch.Tensor]:
        """(model output, scalar loss) on fresh copies of the batch tensors; `before_loss`
        sees the output before loss_fn runs (where bad labels can still be caught)."""
        if self.self_loss:
            output = model(**_clone(self.inputs))
            loss = model_loss(output)
            if loss is None:
                raise GradscopeError(
                    f"the model returned {type(output).__name__} without a loss for the dict "
                    "batch; include the labels in the batch (e.g. labels=...) or pass "
                    "(inputs, targets) with a loss_fn.")
        else:
            output = call_model(model, _clone(self.inputs))
            if before_loss is not None:
                before_loss(output)
            assert self.loss_fn is not None
            loss = self.loss_fn(output, _clone(self.targets))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shown = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                     else type(loss).__name__)
            raise GradscopeError(
                f"the loss must be a scalar tensor, got {shown}; reduce it (e.g. .mean()) in "
                "loss_fn.")
        return output, loss.reshape(())


def _labels(batch: Mapping[str, Any]) -> torch.Tensor | None:
    for key in ("labels", "label", "targets", "target", "y"):
        if isinstance(batch.get(key), torch.Tensor):
            return batch[key]
    return None


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return "a single tensor (the targets are missing)"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"
