"""Which cause a rule leads with when several are present, on hand-made histories: causes
before consequences (oversized steps before the saturation they produce, uncleared gradients
before the oversized steps they make), and the signs added for learning rates hidden by
gradient clipping."""

from __future__ import annotations

import numpy as np
import pytest
from rulekit import data, deep_layout, history, per_layer, record

from gradscope.records import OutputStats
from gradscope.rules.context import RuleContext
from gradscope.rules.engine import RuleEngine, builtin_rules


def _rule(rule_id: str):
    return next(r for r in builtin_rules() if r.id == rule_id)


def _fire(rule_id: str, hist):
    rule = _rule(rule_id)
    return rule(RuleContext(hist, rule.resolve(None)))


def _noisy(levels, seed=0, noise=0.02):
    rng = np.random.default_rng(seed)
    levels = np.asarray(levels, dtype=float)
    return levels * np.exp(rng.normal(0, noise, levels.size))


def _records(layout, steps, **fields):
    return [record(layout, s, **fields) for s in steps]


# ----------------------------------------------------------------------- clipped blow-up
def _clipped_run(jump_to: float, ratio: float, grads_grow: bool, steps: int = 60,
                 spike: int = 4):
    layout = deep_layout()
    losses = list(_noisy(np.full(steps, 5.0)))
    losses[0] = 4.0
    for s in range(2, 2 + spike):  # the loss leaps after two oversized steps, then settles
        losses[s] = jump_to
    recs = []
    for s in range(0, steps, 10):
        grad = 0.1 * (1000.0 if grads_grow and s > 0 else 1.0)
        recs.append(record(layout, s, update_ratio=np.full(len(layout.params), ratio),
                           grad_norm=np.full(len(layout.params), grad),
                           grad_max=np.full(len(layout.params), grad / 2), loss=losses[s]))
    return history(layout, recs, losses)


def test_a_clipped_jump_of_an_order_of_magnitude_is_a_blow_up_from_the_learning_rate():
    finding = _fire("blow-up", _clipped_run(jump_to=60.0, ratio=0.05, grads_grow=False))
    assert finding is not None
    assert finding.causes[0].id == "lr-too-high"
    assert finding.first_step == 2
    assert "bounded" in finding.causes[0].evidence


@pytest.mark.parametrize("jump_to, ratio", [(30.0, 0.05), (60.0, 0.002)])
def test_a_smaller_jump_or_ordinary_steps_are_no_blow_up(jump_to, ratio):
    # 30 < 10 x 4.0: no order of magnitude; 0.002: steps of a healthy size
    assert _fire("blow-up", _clipped_run(jump_to=jump_to, ratio=ratio, grads_grow=False)) is None


def test_a_single_spiking_batch_is_no_blow_up():
    assert _fire("blow-up", _clipped_run(jump_to=60.0, ratio=0.05, grads_grow=False,
                                         spike=1)) is None


def test_a_clipped_jump_is_judged_only_once_it_settled():
    hist = _clipped_run(jump_to=60.0, ratio=0.05, grads_grow=False, steps=15)
    assert _fire("blow-up", hist) is None  # 12 steps after the jump: it may still grow


# ----------------------------------------------------------------------- loss stalled high
def _stalled(ratio: float, levels, stale: float = 0.0):
    layout = deep_layout()
    losses = _noisy(levels)
    recs = _records(layout, range(0, len(losses), 10),
                    update_ratio=np.full(len(layout.params), ratio),
                    stale_grad=np.full(len(layout.params), stale))
    return history(layout, recs, losses)


def _early_drop_then_plateau(steps=400, start=4.0, plateau=3.0):
    t = np.arange(steps)
    return plateau + (start - plateau) * np.exp(-t / 15.0)


def test_a_loss_that_stalls_high_under_oversized_steps_names_the_learning_rate():
    finding = _fire("loss-flat", _stalled(0.05, _early_drop_then_plateau()))
    assert finding is not None and finding.causes[0].id == "lr-too-high"
    assert "no further progress" in finding.summary


def test_stalling_under_ordinary_steps_or_after_converging_is_not_flagged():
    assert _fire("loss-flat", _stalled(0.002, _early_drop_then_plateau())) is None
    # came down by over half: near its floor, whatever the steps
    assert _fire("loss-flat", _stalled(0.05, _early_drop_then_plateau(plateau=1.0))) is None


def test_uncleared_gradients_lead_over_the_oversized_steps_they_make():
    finding = _fire("loss-flat", _stalled(0.05, _early_drop_then_plateau(), stale=1.0))
    assert [c.id for c in finding.causes][:2] == ["missing-zero-grad", "lr-too-high"]


# ----------------------------------------------------------------------- other causes
def test_zero_weights_at_the_first_step_name_poor_init():
    layout = deep_layout()
    norms = np.ones(len(layout.params))
    norms[0::2] = 0.0  # every weight matrix exactly zero at the start
    recs = [record(layout, s, param_norm=norms,
                   grad_norm=per_layer(layout, [1e-9, 1e-8, 1e-7, 1e-2]))
            for s in range(0, 100, 10)]
    hist = history(layout, recs, _noisy(np.full(100, 2.3)))
    flat = _fire("loss-flat", hist)
    assert flat.causes[0].id == "poor-init" and "exactly zero" in flat.causes[0].evidence
    vanishing = _fire("grad-vanishing", hist)
    assert vanishing is not None and vanishing.causes[0].id == "poor-init"


def test_vanishing_under_oversized_steps_names_the_learning_rate_first():
    layout = deep_layout()
    recs = [record(layout, s, update_ratio=np.full(len(layout.params), 0.2),
                   grad_norm=per_layer(layout, [1e-9, 1e-8, 1e-7, 1e-2]))
            for s in range(0, 100, 10)]
    finding = _fire("grad-vanishing", history(layout, recs, _noisy(np.full(100, 2.3))))
    assert finding.causes[0].id == "lr-too-high"


def test_a_blow_up_from_unnormalised_inputs_names_the_data_scale():
    layout = deep_layout()
    losses = [1.0] * 30 + [float("nan")] * 5
    recs = [record(layout, s, data=data(low=-3000.0, high=3000.0, std=900.0), loss=losses[s])
            for s in range(0, 30, 10)]
    recs.append(record(layout, 30, loss=float("nan"), data=data(low=-3000.0, high=3000.0,
                                                                  std=900.0),
                       grad_norm=np.full(len(layout.params), np.inf),
                       grad_nonfinite=np.ones(len(layout.params))))
    engine = RuleEngine(builtin_rules())
    hist = history(layout, recs, losses)
    engine.update(hist)
    nonfinite = {d.sign: d for d in engine.diagnoses()}["loss-nonfinite"]
    assert nonfinite.cause == "data-scale"


def test_probability_rows_need_a_loss_that_applies_its_own_softmax():
    rows = OutputStats(classes=4, min=0.01, max=0.9, row_sum_error=3e-8, grad_row_sum=2e-8)
    assert rows.probability_rows and rows.shift_invariant_loss
    written_for_probabilities = OutputStats(4, 0.01, 0.9, 3e-8, 0.7)
    assert not written_for_probabilities.shift_invariant_loss
    logits = OutputStats(4, -3.0, 5.0, 4.2, 1e-8)
    assert not logits.probability_rows
    half = OutputStats(4, 0.0, 1.002, 4e-3, 0.01, half_precision=True)
    assert half.probability_rows and half.shift_invariant_loss


def test_a_clipped_blow_up_stays_reported_long_after_it_happened():
    hist = _clipped_run(jump_to=60.0, ratio=0.05, grads_grow=False, steps=700)
    finding = _fire("blow-up", hist)
    assert finding is not None and finding.first_step == 2


def test_spikes_of_a_converged_loss_keep_their_causes():
    # outlier batches (input spread far off) behind recurring spikes of a low loss: the
    # learning-rate evidence does not apply, the other causes still do
    layout = deep_layout()
    rng = np.random.default_rng(0)
    losses = list(2.0 * np.exp(-np.arange(300) / 20.0) + 0.05 * np.exp(rng.normal(0, 0.05, 300)))
    spike_steps = list(range(120, 300, 30))
    for s in spike_steps:
        losses[s] = 3.0
    recs = [record(layout, s, loss=losses[s],
                   data=data(std=50.0 if s in spike_steps else 1.0, low=-200, high=200))
            for s in range(0, 300, 10)]
    finding = _fire("training-unstable", history(layout, recs, losses))
    assert finding is not None
    assert finding.causes and finding.causes[0].id == "outlier-batches"
