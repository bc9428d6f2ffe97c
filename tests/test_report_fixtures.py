"""Hand-made, deterministic histories and diagnoses for the reporter tests (and their checks)."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from gradscope import Cause, Diagnosis, History, StepRecord
from gradscope.layout import ModelLayout
from gradscope.records import ActivationStats, DataStats

BOOL_ARRAYS = {"grad_none", "not_in_optimizer", "requires_grad"}


def small_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        embed=nn.Linear(8, 16), act1=nn.ReLU(), hidden=nn.Linear(16, 16), act2=nn.Sigmoid(),
        out=nn.Linear(16, 4)))


def deep_model(blocks: int = 100) -> nn.Module:
    """2 * blocks + 1 parameter layers (Linear + LayerNorm per block, then a head)."""
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers += [nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU() if i % 2 else nn.Tanh()]
    return nn.Sequential(OrderedDict(blocks=nn.Sequential(*layers), head=nn.Linear(4, 1)))


def make_record(layout: ModelLayout, step: int, **values) -> StepRecord:
    """A StepRecord with neutral values for every field not given (robust to new fields)."""
    n = len(layout.params)
    defaults = {
        "step": step, "loss": 1.0, "stepped": True, "skipped": False, "lrs": [0.01],
        "backward_count": 1, "loss_requires_grad": True,
    }
    out = {}
    for f in dataclasses.fields(StepRecord):
        if f.name in values:
            out[f.name] = values[f.name]
        elif f.name in defaults:
            out[f.name] = defaults[f.name]
        elif "ndarray" in str(f.type):
            if f.name in BOOL_ARRAYS:
                out[f.name] = np.full(n, f.name == "requires_grad", dtype=bool)
            elif f.name in ("grad_nonfinite", "stale_grad"):
                out[f.name] = np.zeros(n)
            elif f.name == "changed":
                out[f.name] = np.ones(n)
            else:
                out[f.name] = np.full(n, 0.1)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        else:
            out[f.name] = None
    return StepRecord(**out)


def _act(dead=None, sat=None, order=0) -> ActivationStats:
    return ActivationStats(mean=0.1, std=1.0, zero_frac=0.0 if dead is None else dead,
                           nonfinite_frac=0.0, saturated_frac=sat, dead_frac=dead,
                           input_nonfinite=0, calls=1, order=order, leaf=True)


def small_history(steps: int = 40, every: int = 5) -> History:
    """A run whose first layer's gradient shrinks and whose ReLU dies over time."""
    layout = ModelLayout.of(small_model())
    history = History(layout)
    n = len(layout.params)
    for step in range(steps):
        loss = 2.0 * math.exp(-step / 30) + 0.3
        if step % every:
            history.add_losses([step], [loss])
            continue
        decay = 10.0 ** (-step / 10)
        grad = np.array([1e-2 * decay, 1e-3 * decay, 0.05, 0.01, 0.4, 0.1])[:n]
        record = make_record(
            layout, step, loss=loss, grad_norm=grad, grad_max=grad / 2,
            param_norm=np.array([4.0, 0.5, 4.0, 0.5, 2.0, 0.3])[:n],
            update_ratio=np.array([1e-3 * decay, 2e-3, 1e-3, 1e-3, 3e-3, 4e-3])[:n],
            activations={
                "embed": _act(order=0), "act1": _act(dead=min(step / 40, 1.0), order=1),
                "hidden": _act(order=2), "act2": _act(sat=0.25, order=3),
                "out": _act(order=4)},
            data=DataStats("float32", (32, 8), -3.0, 3.0, 0.0, 1.0, 0, True))
        history.add_losses([step], [loss])
        history.append(record)
    return history


def small_diagnoses() -> list[Diagnosis]:
    return [
        Diagnosis(
            sign="units-dead", severity="warning", title="Units never activate",
            causes=[Cause("dead-units", 0.7, "act1: 88% of units were never positive in the "
                          "last 8 recorded steps"),
                    Cause("lr-too-high", 0.2, "update/weight ratio 3e-3 at the output")],
            layers=["act1"], first_step=15, last_step=35,
            evidence={"dead_fraction": 0.875, "window": 8},
            checks=["Lower the learning rate or use LeakyReLU/GELU for 'act1'.",
                    "Check the initial biases of 'embed' (large negative biases switch units "
                    "off for every input)."],
            summary="88% of the units after 'embed' never switch on.", rule="units-dead"),
        Diagnosis(
            sign="grad-vanishing", severity="error",
            title="Gradients vanish toward the early layers",
            causes=[Cause("vanishing-gradients", 0.8, "embed grad norm 1.0e-06 vs out 0.41"),
                    Cause("saturated-activations", 0.4, "act2 saturated in 25% of outputs")],
            layers=["embed", "hidden"], first_step=20, last_step=35,
            evidence={"ratio": 2.4e-6, "first_layer_grad_norm": 1e-6,
                      "per_layer": [1e-6, 0.05, 0.41], "stalled": True},
            checks=["Use an initialisation matched to the activation (Kaiming for ReLU).",
                    "Add normalisation between layers or skip connections."],
            summary="The first layer gets a millionth of the output layer's gradient.",
            rule="grad-vanishing"),
        Diagnosis(sign="loss-flat", severity="info", title="Loss is flattening",
                  first_step=30, last_step=35, rule="loss-flat"),
    ]


def deep_history(records: int = 4, blocks: int = 100) -> History:
    """A 201-layer run: gradients shrink toward the input, some NaN, one layer without grad."""
    layout = ModelLayout.of(deep_model(blocks))
    history = History(layout)
    n = len(layout.params)
    depth = np.linspace(-8, 0, n)
    for i in range(records):
        grad = 10.0 ** depth
        grad[3] = np.nan  # a parameter without a gradient
        acts = {}
        for j, name in enumerate(layout.module_names):
            kind = layout.module_types[name]
            if kind == "ReLU":
                acts[name] = _act(dead=(j % 7) / 7, order=j)
            elif kind == "Tanh":
                acts[name] = _act(sat=(j % 5) / 10, order=j)
        record = make_record(layout, i * 10, loss=1.0 / (i + 1), grad_norm=grad,
                             grad_max=grad * 3, param_norm=np.full(n, 2.0),
                             update_ratio=np.full(n, 1e-3), activations=acts)
        history.add_losses([i * 10], [1.0 / (i + 1)])
        history.append(record)
    return history


def deep_diagnoses(history: History) -> list[Diagnosis]:
    layers = history.layout.layers
    return [Diagnosis(sign="grad-vanishing", severity="warning",
                      title="Gradients vanish toward the early layers",
                      causes=[Cause("vanishing-gradients", 0.9, "8 decades from input to head")],
                      layers=list(layers[:30]), first_step=10, last_step=30,
                      evidence={"ratio": 1e-8}, checks=["Add skip connections."],
                      rule="grad-vanishing")]


# --------------------------------------------------------------------------- the fixtures' checks
def test_small_history_is_consistent():
    history = small_history()
    assert [r.step for r in history.records()] == list(range(0, 40, 5))
    steps, losses = history.losses()
    assert steps.tolist() == list(range(40))
    assert np.all(np.diff(losses) < 0)
    assert len(history.layout.layers) == 3


def test_make_record_fills_every_field():
    layout = ModelLayout.of(torch.nn.Linear(2, 2))
    record = make_record(layout, 3)
    for f in dataclasses.fields(StepRecord):
        value = getattr(record, f.name)
        if isinstance(value, np.ndarray):
            assert value.shape == (2,), f.name


def test_deep_history_has_201_layers():
    history = deep_history()
    assert len(history.layout.layers) == 201
    assert history.total_recorded == 4
