"""Which parameters the loss reaches through autograd, and where the path is cut for the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..hooks import HookSet


def reached_nodes(loss: torch.Tensor) -> tuple[set[int], set[int]]:
    """(ids of the autograd nodes behind `loss`, ids of the leaf tensors they accumulate into).

    Example:
        >>> w = torch.ones(2, requires_grad=True); v = torch.ones(2, requires_grad=True)
        >>> _, leaves = reached_nodes((w * 2).sum() + v.detach().sum())
        >>> id(w) in leaves, id(v) in leaves
        (True, False)
    """
    nodes: set[int] = set()
    leaves: set[int] = set()
    stack: list[Any] = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in nodes:
            continue
        nodes.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes, leaves


@dataclass
class ModuleTrace:
    """How a module ran in the forward: when it started and ended (one counter for both),
    grad mode, and whether its inputs/output were tracked."""

    start: int
    order: int
    grad_enabled: bool
    input_tracked: bool
    output_nodes: list[Any] = field(default_factory=list)


class ForwardTracer:
    """Forward hooks that note, per module, grad mode and the autograd nodes of its outputs.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2)); tracer = ForwardTracer(m)
        >>> _ = m(torch.ones(1, 2)); tracer.remove()
        >>> tracer.traces["0"].grad_enabled
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.traces: dict[str, ModuleTrace] = {}
        self._starts: dict[str, int] = {}
        self._clock = 0
        self._hooks = HookSet()
        for name, module in model.named_modules():
            self._hooks.add(module.register_forward_pre_hook(self._pre_hook(name)))
            self._hooks.add(module.register_forward_hook(self._hook(name)))

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _pre_hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            self._starts.setdefault(name, self._tick())
        return record

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if name in self.traces:
                return
            floats = [t for t in tree_leaves(args)
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
            end = self._tick()
            self.traces[name] = ModuleTrace(
                start=self._starts.get(name, end), order=end,
                grad_enabled=torch.is_grad_enabled(),
                input_tracked=any(t.requires_grad for t in floats),
                output_nodes=[t.grad_fn for t in tree_leaves(output)
                              if isinstance(t, torch.Tensor) and t.grad_fn is not None])
        return record

    def remove(self) -> None:
        self._hooks.remove()


def why_unreached(layer: str, tracer: ForwardTracer, nodes: set[int]) -> str:
    """Where the path from a parameter of `layer` to the loss is cut, in one clause."""
    trace = tracer.traces.get(layer)
    if trace is None:
        return f"'{layer or 'model'}' never ran in the forward pass (an unused branch or layer)"
    if not trace.grad_enabled:
        return f"'{layer}' ran under torch.no_grad() (or inference_mode)"
    if not trace.output_nodes:
        return (f"'{layer}' ran but its output is not tracked by autograd: the parameter is "
                "used through .data or .detach() inside the module")
    if any(id(node) in nodes for node in trace.output_nodes):
        return (f"the output of '{layer}' reaches the loss but this parameter does not: it is "
                "used through .data or .detach() inside the module")
    cut = _first_cut_after(trace.order, tracer)
    return (f"the output of '{layer}' never reaches the loss: the path is cut{cut or ''} by "
            ".detach(), .data, .item(), a numpy round-trip, torch.no_grad(), or the output "
            "goes unused")


def _first_cut_after(order: int, tracer: ForwardTracer) -> str | None:
    """Where, after the module that ended at `order`, the autograd path visibly stops: the
    first module started later and run under no_grad, or run with grad on but only untracked
    float inputs (where a detached tensor re-enters the model). Containers that enclose the
    module started before it and are not candidates."""
    later = sorted((t.start, name) for name, t in tracer.traces.items()
                   if t.start > order and name)
    for _, name in later:
        trace = tracer.traces[name]
        if not trace.grad_enabled:
            return f" at '{name}', which runs under torch.no_grad(),"
        if not trace.input_tracked:
            return f" before '{name}' (its input arrives untracked)"
    return None
