"""Check 2: one forward/backward gives every trainable parameter a finite, non-zero gradient."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..layout import ModelLayout
from ..records import StepRecord
from ..rules.common import fmt
from .graph import ForwardTracer, why_unreached
from .result import CheckResult, finding

CUT_CHECKS = [
    "Follow the tensor from the named layer to the loss: look for .detach(), .data, .item(), "
    ".numpy()/.tolist() round-trips and torch.no_grad() blocks in between.",
    "If the layer is meant to be unused, delete it or freeze it (requires_grad_(False)).",
]


def check_gradients(layout: ModelLayout, records: Sequence[StepRecord], loss_tracked: bool,
                    graph: tuple[set[int], set[int]], tensor_ids: list[int],
                    tracer: ForwardTracer | None) -> CheckResult:
    """Name each trainable parameter whose first gradient is None, NaN/Inf or zero, with why.

    `graph` holds the ids of the autograd nodes and leaf tensors behind the first loss;
    `records` are the recorded steps of the overfit run (the first one is the forward/backward
    at initialisation): a gradient that is zero at init but non-zero later is only an effect
    of the initialisation (e.g. a zero-initialised layer downstream) and is not reported.
    """
    result = CheckResult("gradients")
    params = layout.params
    trainable = np.array([p.requires_grad for p in params], dtype=bool)
    result.data = {"params": len(params), "trainable": int(trainable.sum())}
    if not loss_tracked:
        result.summary = "the loss has no autograd history"
        result.diagnoses.append(finding(
            "grad-none", "error", "The loss is detached from the model",
            "the loss does not require grad, so backward() reaches no parameter",
            [("detached-graph", 1.0, "the loss has no grad_fn: it was computed under "
                                     "torch.no_grad(), from .detach()/.item() values, or from "
                                     "numpy")], "gradients", checks=CUT_CHECKS))
        return result
    if not trainable.any():
        result.summary = "no parameter has requires_grad=True"
        result.diagnoses.append(finding(
            "grad-none", "error", "No parameter requires a gradient",
            f"all {len(params)} parameter tensors have requires_grad=False",
            [("requires-grad-off", 1.0, "requires_grad was switched off for the whole model")],
            "gradients", layers=sorted({p.layer for p in params}),
            checks=["Call model.requires_grad_(True), or unfreeze the layers that should "
                    "train."]))
        return result
    first = records[0]
    none = trainable & first.grad_none
    nonfinite = trainable & ~first.grad_none & (first.grad_nonfinite > 0)
    zero_once = trainable & ~first.grad_none & (first.grad_norm == 0)
    later_nonzero = np.zeros(len(params), dtype=bool)
    for record in records[1:]:
        later_nonzero |= np.nan_to_num(record.grad_norm) > 0
    zero = zero_once & ~later_nonzero
    result.data.update({"none": int(none.sum()), "nonfinite": int(nonfinite.sum()),
                        "zero": int(zero.sum()), "zero_at_init_only": int((zero_once &
                                                                            later_nonzero).sum())})
    if none.any():
        idx = np.flatnonzero(none)
        by_layer: dict[str, list[str]] = {}
        for i in idx:
            by_layer.setdefault(params[i].layer, []).append(params[i].name)
        nodes, reached = graph
        causes = []
        for layer, names in by_layer.items():
            if tensor_ids[_index(params, names[0])] in reached:
                why = f"'{layer}' is reached, yet its gradient stayed None"
            elif tracer is not None:
                why = why_unreached(layer, tracer, nodes)
            else:
                why = "not reached from the loss"
            causes.append(f"{', '.join(names[:3])}{' …' if len(names) > 3 else ''}: {why}")
        all_none = bool(none[trainable].all())
        result.diagnoses.append(finding(
            "grad-none", "error" if all_none else "warning",
            "Gradients are None for trainable parameters",
            f"{idx.size} of {int(trainable.sum())} trainable parameter tensor(s) got no "
            f"gradient: {causes[0]}",
            [("detached-graph", 1.0, "; ".join(causes[:4]))], "gradients",
            layers=list(by_layer), evidence={"params_without_grad": int(idx.size)},
            checks=CUT_CHECKS))
    if nonfinite.any():
        idx = np.flatnonzero(nonfinite)
        result.diagnoses.append(finding(
            "values-nonfinite", "error", "Gradients hold NaN/Inf at initialisation",
            f"{idx.size} parameter tensor(s) got NaN/Inf gradients (e.g. '{params[idx[0]].name}')",
            [("invalid-math", 1.0, "a log/sqrt/division of zero or a negative number, or an "
                                   "overflow, in the forward or the loss")], "gradients",
            layers=sorted({params[i].layer for i in idx}),
            evidence={"params_nonfinite": int(idx.size), "origin": first.nonfinite_origin},
            checks=["Guard logs and divisions with an epsilon; clamp before exp()."]))
    if zero.any():
        idx = np.flatnonzero(zero)
        result.diagnoses.append(finding(
            "layers-stalled", "warning", "Parameters get an all-zero gradient",
            f"{idx.size} parameter tensor(s) get a gradient of exactly 0 at every step (e.g. "
            f"'{params[idx[0]].name}')",
            [("broken-gradient-flow", 1.0, "the loss reaches them only through values that are "
                                           "zero or multiplied by zero (dead units, a zero "
                                           "mask or weight downstream)")], "gradients",
            layers=sorted({params[i].layer for i in idx}),
            evidence={"params_zero_grad": int(idx.size)},
            checks=["Look downstream of these layers for dead ReLUs, zero masks or zeroed "
                    "weights."]))
    bad = int(none.sum() + nonfinite.sum() + zero.sum())
    result.summary = (f"{int(trainable.sum())} trainable parameter tensors: "
                      + ("all got finite, non-zero gradients" if not bad else
                         f"{bad} without a usable gradient")
                      + (f"; total gradient norm {fmt(first.total_grad_norm())}"))
    return result


def _index(params, name: str) -> int:
    for i, p in enumerate(params):
        if p.name == name:
            return i
    return -1
