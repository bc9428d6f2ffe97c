"""Rule behaviour that must hold on training code the rules were not written for: flatness
judged by practical progress, facts reported as soon as they are certain, data scale judged
on the values the model receives, several optimizers."""

from __future__ import annotations

import numpy as np
from rulekit import act, data, deep_layout, history, record

from gradscope.layout import ModelLayout
from gradscope.options import WatchOptions
from gradscope.rules import RuleEngine


def run(h) -> dict:
    engine = RuleEngine.from_options(WatchOptions())
    engine.update(h)
    return {d.sign: d for d in engine.diagnoses() if d.severity in ("warning", "error")}


def flat_history(losses, layout=None, **fields):
    layout = layout or deep_layout(2)
    records = [record(layout, s, **fields) for s in range(len(losses))]
    return history(layout, records, losses=losses)


def test_a_steady_tiny_drop_is_flat_and_real_learning_is_not():
    rng = np.random.default_rng(0)
    steps = np.arange(200)
    tiny = 2.0 * (1 - 3e-7 * steps) + 1e-4 * rng.standard_normal(200)  # t statistic is huge
    found = run(flat_history(tiny, update_ratio=np.full(4, 1e-8)))
    assert "loss-flat" in found and found["loss-flat"].cause == "lr-too-low"
    learning = 2.0 * np.exp(-steps / 150) + 0.05 * rng.standard_normal(200)
    assert "loss-flat" not in run(flat_history(learning))


def test_flat_verdict_does_not_flip_with_run_length_under_batch_noise():
    rng = np.random.default_rng(1)
    noisy = 2.0 * (1 + 0.1 * rng.standard_normal(400))  # 10% batch noise, no trend
    verdicts = {"loss-flat" in run(flat_history(noisy[:n], update_ratio=np.full(4, 1e-8)))
                for n in range(60, 401, 20)}
    assert verdicts == {True}


def test_gradients_proportional_to_weights_point_to_a_detached_data_term():
    layout = deep_layout(2)
    weights = np.array([3.0, 0.5, 2.0, 0.2])
    losses = 2.3 + 0.01 * np.random.default_rng(2).standard_normal(80)
    found = run(flat_history(losses, layout, param_norm=weights, grad_norm=2e-4 * weights))
    assert found["loss-flat"].cause == "detached-graph"
    # ordinary gradients (not a multiple of the weights) do not name it
    found = run(flat_history(losses, layout, param_norm=weights,
                             grad_norm=np.array([0.1, 0.3, 0.02, 0.5])))
    assert "loss-flat" in found and found["loss-flat"].cause != "detached-graph"


def test_with_several_optimizers_a_flat_loss_needs_a_cause():
    losses = 1.4 + 0.1 * np.random.default_rng(3).standard_normal(200)  # D + G of a GAN
    layout = deep_layout(2)
    layout.static("optimizers", lambda: 2)
    assert "loss-flat" not in run(flat_history(losses, layout))
    found = run(flat_history(losses, layout, update_ratio=np.full(4, 1e-9)))
    assert found["loss-flat"].cause == "lr-too-low"
    # with one optimizer the same flat loss is reported
    assert "loss-flat" in run(flat_history(losses))


def _dead_records(layout, steps, dead_from):
    return [record(layout, s, activations={
        "0": act(dead=1.0 if s >= dead_from else 0.0, order=0),
        "1": act(dead=0.0, order=1)}) for s in steps]


def test_units_dead_from_the_first_batch_are_reported_without_warm_up():
    layout = deep_layout(2)
    steps = [0, 10, 20]
    found = run(history(layout, _dead_records(layout, steps, dead_from=0)))
    assert found["units-dead"].cause == "poor-init"
    assert found["units-dead"].first_step == 0
    # dying later is not a fact from the first batch: it waits out warm-up and the window
    assert "units-dead" not in run(history(layout, _dead_records(layout, steps, dead_from=10)))


def test_raw_8bit_pixels_are_a_data_scale_problem():
    layout = deep_layout(2)
    raw = [record(layout, s, data=data(low=0.0, high=255.0, std=80.0)) for s in range(5)]
    found = run(history(layout, raw, losses=np.linspace(34.0, 20.0, 5)))
    assert found["data-suspect"].cause == "data-scale"
    scaled = [record(layout, s, data=data(low=0.0, high=1.0, std=0.3)) for s in range(5)]
    assert "data-suspect" not in run(history(layout, scaled, losses=np.linspace(2, 1, 5)))


def test_a_frozen_output_layer_is_a_warning_a_frozen_body_is_not():
    import torch

    def frozen(names):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        for name, p in model.named_parameters():
            if name.split(".")[0] in names:
                p.requires_grad_(False)
        layout = ModelLayout.of(model)
        return run(history(layout, [record(layout, s) for s in range(3)],
                           losses=np.linspace(2, 1, 3)))

    found = frozen({"2"})
    assert found["params-frozen"].cause == "requires-grad-off"
    assert found["params-frozen"].layers == ["2"]
    assert "params-frozen" not in frozen({"0"})  # fine-tuning: the body frozen, an info


def test_a_flat_loss_with_uncleared_gradients_names_missing_zero_grad():
    losses = 2.3 + 0.01 * np.random.default_rng(4).standard_normal(80)
    found = run(flat_history(losses, stale_grad=np.full(4, 0.5)))
    assert found["loss-flat"].cause == "missing-zero-grad"
    assert found["grad-accumulating"].cause == "missing-zero-grad"
