"""Hand-made histories for testing rules without a model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from gradscope.history import History, StepRecord
from gradscope.layout import ModelLayout
from gradscope.records import ActivationStats, DataStats


def deep_layout(layers: int = 4, width: int = 8) -> ModelLayout:
    """Layout of a Linear stack: layer i owns params 2i (weight) and 2i+1 (bias)."""
    return ModelLayout.of(nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]))


def record(layout: ModelLayout, step: int, **fields) -> StepRecord:
    """A healthy-looking record; override any field (per-layer helpers below)."""
    n = len(layout.params)
    base = dict(
        step=step, loss=1.0, stepped=True, skipped=False, lrs=[1e-3],
        grad_norm=np.full(n, 0.1), grad_max=np.full(n, 0.05), grad_nonfinite=np.zeros(n),
        grad_none=np.zeros(n, dtype=bool), param_norm=np.full(n, 1.0),
        update_ratio=np.full(n, 1e-3), changed=np.ones(n), stale_grad=np.zeros(n),
        not_in_optimizer=np.zeros(n, dtype=bool), requires_grad=np.ones(n, dtype=bool),
        backward_count=1, loss_requires_grad=True,
    )
    base.update(fields)
    return StepRecord(**base)


def per_layer(layout: ModelLayout, values) -> np.ndarray:
    """Spread one value per layer onto that layer's parameters (norms split evenly)."""
    out = np.zeros(len(layout.params))
    counts = np.bincount(layout.param_layer)
    for i, layer in enumerate(layout.param_layer):
        out[i] = values[layer] / np.sqrt(counts[layer])
    return out


def history(layout: ModelLayout, records, losses=None) -> History:
    h = History(layout)
    for r in records:
        h.append(r)
    steps = [r.step for r in records] if losses is None else list(range(len(losses)))
    values = [r.loss for r in records] if losses is None else list(losses)
    h.add_losses(steps, values)
    return h


def act(mean=0.0, std=1.0, zero=0.0, nonfinite=0.0, saturated=None, dead=None,
        order=0, input_nonfinite=0) -> ActivationStats:
    return ActivationStats(mean=mean, std=std, zero_frac=zero, nonfinite_frac=nonfinite,
                           saturated_frac=saturated, dead_frac=dead,
                           input_nonfinite=input_nonfinite, calls=1, order=order, leaf=True)


def data(nonfinite: int = 0, low: float = -3.0, high: float = 3.0, std: float = 1.0,
         dtype: str = "float32", size: int = 32) -> DataStats:
    return DataStats(dtype=dtype, shape=(size, 8), min=low, max=high, mean=0.0, std=std,
                     nonfinite=nonfinite, is_float=dtype.startswith("float"))


__all__ = ["act", "data", "deep_layout", "history", "per_layer", "record", "torch"]


def fed_one_by_one(history: History) -> Iterator[History]:
    """A fresh History fed the records of `history` one at a time, each with the losses up to
    its step, as a live run feeds them; yields the copy after each record (the records' kept
    values are cleared first, so the rules work them out again)."""
    records = history.records()
    steps, values = (a.tolist() for a in history.losses())
    for r in records:
        r._derived.clear()
    copy, j = History(history.layout), 0
    for r in records:
        k = j
        while k < len(steps) and steps[k] <= r.step:
            k += 1
        copy.add_losses(steps[j:k], values[j:k])
        j = k
        copy.append(r)
        yield copy
