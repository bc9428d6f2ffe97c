"""The model's parameters and layers in model order: the index every signal array uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class ParamInfo:
    """One watched parameter: its qualified name, the module that owns it, its shape."""

    name: str
    layer: str
    shape: tuple[int, ...]
    numel: int
    requires_grad: bool


@dataclass
class ModelLayout:
    """Parameters (deduplicated, tied ones once) and the layers that own them, in model order.

    Example:
        >>> layout = ModelLayout.of(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        >>> [p.name for p in layout.params], layout.layers
        (['0.weight', '0.bias'], ['0'])
    """

    params: list[ParamInfo]
    tensors: list[torch.Tensor]
    layers: list[str]
    param_layer: list[int]
    module_names: list[str]
    module_types: dict[str, str]
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def static(self, key: str, compute: Callable[[], T]) -> T:
        """A value derived from the layout once (layouts do not change)."""
        if key not in self.derived:
            self.derived[key] = compute()
        value: T = self.derived[key]
        return value

    @property
    def owners(self) -> np.ndarray:
        """Layer index of each parameter, as an array."""
        return self.static("owners", lambda: np.asarray(self.param_layer, dtype=np.int64))

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        owner: dict[int, str] = {}
        for module_name, module in model.named_modules():
            for param in module.parameters(recurse=False):
                owner.setdefault(id(param), module_name)
        params: list[ParamInfo] = []
        tensors: list[torch.Tensor] = []
        for name, param in model.named_parameters():
            layer = owner.get(id(param), "")
            params.append(
                ParamInfo(name, layer, tuple(param.shape), param.numel(), param.requires_grad)
            )
            tensors.append(param)
        layers: list[str] = []
        for info in params:
            if info.layer not in layers:
                layers.append(info.layer)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        layers.sort(key=lambda name: order.get(name, len(order)))
        layer_index = {name: i for i, name in enumerate(layers)}
        module_names = [name for name, _ in model.named_modules()]
        module_types = {name: type(m).__name__ for name, m in model.named_modules()}
        return cls(
            params=params,
            tensors=tensors,
            layers=layers,
            param_layer=[layer_index[p.layer] for p in params],
            module_names=module_names,
            module_types=module_types,
        )

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description of the layout (for the run log header)."""
        return {
            "params": [
                {"name": p.name, "layer": p.layer, "shape": list(p.shape),
                 "requires_grad": p.requires_grad}
                for p in self.params
            ],
            "layers": list(self.layers),
            "module_types": dict(self.module_types),
            # how many optimizers train the model (opposing objectives when several)
            "optimizers": int(self.derived.get("optimizers", 1)),
        }


def forward_roots(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward the training loop calls: the model itself, or, for a
    container without a forward of its own (an `nn.ModuleDict` holding a GAN's generator
    and discriminator), its parts that have one.

    Example:
        >>> gan = nn.ModuleDict({"G": nn.Linear(2, 2), "D": nn.Linear(2, 1)})
        >>> [type(m).__name__ for m in forward_roots(gan)]
        ['Linear', 'Linear']
        >>> forward_roots(nn.Linear(2, 2))[0].out_features
        2
    """
    # a forward of the class, or of the instance (torch.compile's wrapper sets its own)
    if type(model).forward is not nn.Module.forward or "forward" in vars(model):
        return [model]
    roots = [root for child in model.children() for root in forward_roots(child)]
    return roots or [model]
