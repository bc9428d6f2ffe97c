"""Scenario suite: real small training loops broken on purpose must be diagnosed with the right
sign and top cause; healthy runs on several architectures must raise no warning or error."""

from __future__ import annotations

import warnings

import pytest
import scenarios as S
import torch

# scenario -> (expected sign, expected top cause)
BROKEN = {
    # loss-flat
    "flat_lr_too_low": ("loss-flat", "lr-too-low"),
    "flat_broken_gradient_flow": ("loss-flat", "broken-gradient-flow"),
    "flat_saturated": ("loss-flat", "saturated-activations"),
    # loss-nonfinite
    "nonfinite_invalid_math": ("loss-nonfinite", "invalid-math"),
    "nonfinite_data": ("loss-nonfinite", "data-nonfinite"),
    "nonfinite_exploding": ("loss-nonfinite", "lr-too-high"),  # step 0 moves weights 4x
    # grad-none
    "none_detached": ("grad-none", "detached-graph"),
    "none_requires_grad_off": ("grad-none", "requires-grad-off"),
    "none_loss_detached": ("grad-none", "detached-graph"),
    # layers-stalled
    "stalled_missing_from_optimizer": ("layers-stalled", "missing-from-optimizer"),
    "stalled_dead_layer": ("layers-stalled", "dead-units"),
    # training-unstable
    "unstable_lr_too_high": ("training-unstable", "lr-too-high"),
    "unstable_outlier_batches": ("training-unstable", "outlier-batches"),
    # the other signs
    "vanishing_deep_sigmoid": ("grad-vanishing", "saturated-activations"),
    "vanishing_tiny_init": ("grad-vanishing", "poor-init"),
    "exploding_lr": ("grad-exploding", "lr-too-high"),
    "accumulating_no_zero_grad": ("grad-accumulating", "missing-zero-grad"),
    "frozen_missing_from_optimizer": ("params-frozen", "missing-from-optimizer"),
    "dead_relu_bias": ("units-dead", "poor-init"),
    "saturated_raw_inputs": ("activations-saturated", "data-scale"),
    "nonfinite_hidden_by_mask": ("values-nonfinite", "invalid-math"),
    "data_unscaled": ("data-suspect", "data-scale"),
}

HEALTHY = ["healthy_mlp", "healthy_cnn", "healthy_lstm", "healthy_gpt2", "healthy_bert",
           "healthy_micro_batches", "healthy_bf16"]


def _run(name: str, **watch):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(S, name)(**watch)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_run_is_diagnosed(name):
    sign, cause = BROKEN[name]
    scope = _run(name)
    found = {d.sign: d for d in scope.diagnose()}
    assert sign in found, f"{name}: expected {sign}, got {sorted(found)}"
    diagnosis = found[sign]
    assert diagnosis.cause == cause, (
        f"{name}: {sign} top cause {diagnosis.cause}, expected {cause}: {diagnosis.causes}")
    assert diagnosis.severity in ("warning", "error")
    assert diagnosis.summary and diagnosis.checks and diagnosis.causes[0].evidence
    assert diagnosis.first_step <= diagnosis.last_step
    assert not scope.failures


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_run_raises_nothing(name):
    scope = _run(name)
    alarms = [(d.sign, d.cause, d.summary) for d in scope.diagnose()
              if d.severity in ("warning", "error")]
    assert alarms == []
    assert not scope.failures


def test_healthy_run_at_default_sampling_raises_nothing():
    scope = _run("healthy_cnn", every=10)
    assert [d for d in scope.diagnose() if d.severity != "info"] == []


def test_names_layers_in_model_order_and_numbers():
    scope = _run("vanishing_tiny_init")
    d = next(d for d in scope.diagnose() if d.sign == "grad-vanishing")
    order = scope.layout.layers
    assert d.layers == sorted(d.layers, key=order.index)
    assert d.evidence["first_layer"] == "0"
    assert d.evidence["ratio"] < 1e-3
    assert "ratio" in d.summary


def test_invalid_math_names_the_module():
    scope = _run("nonfinite_invalid_math")
    d = next(d for d in scope.diagnose() if d.sign == "loss-nonfinite")
    assert d.layers == ["1"]
    assert "LogFeatures" in d.causes[0].evidence


def test_persistent_diagnosis_is_one_diagnosis_with_updated_steps():
    scope = _run("accumulating_no_zero_grad")
    found = [d for d in scope.diagnose() if d.sign == "grad-accumulating"]
    assert len(found) == 1
    assert found[0].last_step == scope.step_count - 1
    assert found[0].first_step < found[0].last_step
