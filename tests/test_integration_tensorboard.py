"""TensorBoard export, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerance import UNIT_ROUNDOFF
from torch import nn

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradscope
from gradscope.integrations.tensorboard import TensorBoardExporter, export

# TensorBoard stores scalars as float32: one rounding of a float64 value, plus a few float64
# operations when a per-layer figure is assembled
TB_ROUNDING = 2 * UNIT_ROUNDOFF[torch.float32]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.Sigmoid(),
                         nn.Linear(12, 1))


def _train(scope, model, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(16, 5, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> tuple[list[int], np.ndarray]:
    events = acc.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events])


def test_live_exporter_writes_per_layer_signals(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=2)
    TensorBoardExporter(tmp_path).attach(scope)
    _train(scope, model, opt, 6)
    scope.close()
    acc = _read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"grad_norm/0", "grad_norm/2", "grad_norm/4", "update_ratio/0",
            "dead_units/1", "saturated/3", "gradscope/loss"} <= tags
    records = scope.history.records()
    for i, layer in enumerate(scope.layout.layers):
        steps, values = _scalars(acc, f"grad_norm/{layer}")
        assert steps == [0, 2, 4]
        # independent reference: per-layer norm from the per-parameter norms
        names = [p.name for p in scope.layout.params if p.layer == layer]
        idx = [scope.layout.param_names.index(n) for n in names]
        expected = [np.sqrt(np.sum(r.grad_norm[idx] ** 2)) for r in records]
        np.testing.assert_allclose(values, expected, rtol=TB_ROUNDING)
        _, ratios = _scalars(acc, f"update_ratio/{layer}")
        np.testing.assert_allclose(ratios, [r.layer_update_ratio(scope.layout)[i]
                                            for r in records], rtol=TB_ROUNDING)
    _, dead = _scalars(acc, "dead_units/1")
    np.testing.assert_allclose(dead, [r.activations["1"].dead_frac for r in records],
                               rtol=TB_ROUNDING)
    _, losses = _scalars(acc, "gradscope/loss")
    np.testing.assert_allclose(losses, [r.loss for r in records], rtol=TB_ROUNDING)


def test_export_after_training_writes_diagnoses_as_text(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing learns
    with gradscope.watch(model, opt, every=1) as scope:
        _train(scope, model, opt, 30)
    diagnoses = scope.diagnose()
    assert diagnoses, "a zero learning rate must be diagnosed"
    export(scope, tmp_path)
    acc = _read(tmp_path)
    text_tags = set(acc.Tags()["tensors"])
    for d in diagnoses:
        tag = f"gradscope/diagnosis/{d.sign}/text_summary"  # how add_text stores it
        assert tag in text_tags
        content = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        assert d.title in content and d.sign in content
    steps, _ = _scalars(acc, "grad_norm/0")
    assert steps == list(range(30))


def test_bad_writer_is_refused_with_a_clear_message():
    with pytest.raises(gradscope.GradscopeError, match="log directory or a SummaryWriter"):
        TensorBoardExporter(42)
