"""The pieces behind Scope, each on its own: StepRecorder, LossBuffer and Diagnoser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tolerance import norm_rtol
from torch import nn

from gradscope.diagnoser import Diagnoser
from gradscope.guard import Guard
from gradscope.history import History
from gradscope.layout import ModelLayout
from gradscope.losses import MAX_PENDING, LossBuffer, scalar_loss
from gradscope.options import WatchOptions
from gradscope.recorder import StepRecorder
from gradscope.rules.engine import RULE_STEPS, RuleEngine, builtin_rules
from gradscope.signals.transfer import DeviceBatch


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _recorder(model, opt, every=1):
    layout = ModelLayout.of(model)
    history = History(layout)
    losses = LossBuffer(history)
    recorder = StepRecorder(model, layout, [opt], WatchOptions(every=every), losses, Guard())
    recorder.attach()
    return recorder, history


def _one_step(model, opt, recorder):
    opt.zero_grad()
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    value, requires_grad = scalar_loss(loss)
    return recorder.finish_step(value, requires_grad), loss.item(), grads


# --------------------------------------------------------------------------- StepRecorder
def test_recorder_returns_a_record_on_recorded_steps_only():
    model, opt = _model()
    recorder, history = _recorder(model, opt, every=3)
    records = [_one_step(model, opt, recorder)[0] for _ in range(7)]
    assert [r.step if r is not None else None for r in records] == [0, None, None, 3, None,
                                                                    None, 6]
    # the losses of unrecorded steps went to the history with the next recorded step
    assert history.losses()[0].tolist() == list(range(7))
    assert recorder.step == 7
    recorder.detach()


def test_recorder_measures_gradients_against_a_float64_reference():
    model, opt = _model()
    recorder, _ = _recorder(model, opt)
    record, loss, grads = _one_step(model, opt, recorder)
    reference = [g.double().norm().item() for g in grads]
    # float32 norms of at most 32 values, against float64 (tests/tolerance.py)
    assert record.grad_norm.tolist() == pytest.approx(reference, rel=norm_rtol(32))
    assert record.loss == loss  # kept as given: no arithmetic
    assert record.stepped and not record.skipped and record.backward_count == 1
    assert record.loss_requires_grad is True
    recorder.detach()


def test_recorder_detach_leaves_no_hook():
    model, opt = _model()
    recorder, _ = _recorder(model, opt)
    _one_step(model, opt, recorder)
    recorder.detach()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_recorder_records_the_step_after_a_nonfinite_loss():
    model, opt = _model()
    recorder, _ = _recorder(model, opt, every=10)
    records = []
    for step in range(3):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        records.append(recorder.finish_step(loss.detach() * (math.nan if step == 0 else 1)))
    # step 0 is recorded (every=10) with a NaN loss: step 1 is recorded too, step 2 is not
    assert [r.step if r is not None else None for r in records] == [0, 1, None]
    assert math.isnan(records[0].loss) and math.isfinite(records[1].loss)
    recorder.detach()


# --------------------------------------------------------------------------- LossBuffer
def test_loss_buffer_keeps_step_order_across_floats_and_tensors():
    history = History(ModelLayout.of(nn.Linear(1, 1)))
    losses = LossBuffer(history)
    values = [torch.tensor(1.5), 2.5, torch.tensor(3.5, dtype=torch.float64), float("inf")]
    for step, value in enumerate(values):
        losses.add(step, value)
    batch = DeviceBatch()
    losses.put(batch)
    assert len(batch) == 1  # one stacked tensor per device
    taken = losses.take(batch.fetch())
    assert taken == {0: 1.5, 1: 2.5, 2: 3.5, 3: math.inf}
    assert len(losses) == 0
    steps, stored = history.losses()
    assert steps.tolist() == [0, 1, 2, 3] and stored.tolist() == [1.5, 2.5, 3.5, math.inf]
    assert losses.flush() == {}


def test_loss_buffer_is_full_at_its_limit():
    losses = LossBuffer(History(ModelLayout.of(nn.Linear(1, 1))))
    for step in range(MAX_PENDING - 1):
        losses.add(step, 0.0)
    assert not losses.full
    losses.add(MAX_PENDING, 0.0)
    assert losses.full


@pytest.mark.parametrize("bad, word", [(torch.ones(2), "shape"), ("0.5", "str"),
                                       (True, "bool")])
def test_scalar_loss_refuses_what_is_not_a_loss(bad, word):
    from gradscope import GradscopeError

    with pytest.raises(GradscopeError, match=word):
        scalar_loss(bad)


# --------------------------------------------------------------------------- Diagnoser
def _records(steps):
    model, opt = _model()
    recorder, history = _recorder(model, opt)
    out = [_one_step(model, opt, recorder)[0] for _ in range(steps)]
    recorder.detach()
    return history.layout, out


def test_diagnoser_runs_the_rules_at_the_cadence_and_catches_up():
    layout, records = _records(RULE_STEPS + 3)
    history = History(layout)
    diagnoser = Diagnoser(RuleEngine(builtin_rules()), history, every=1)
    for record in records:
        history.add_losses([record.step], [record.loss])
        history.append(record)
        diagnoser.feed(record)
    assert diagnoser.evaluations == 1 and diagnoser.cadence.unevaluated == 3
    diagnoser.catch_up()
    assert diagnoser.evaluations == 2 and diagnoser.cadence.unevaluated == 0
    diagnoser.catch_up()
    assert diagnoser.evaluations == 2  # nothing unseen: nothing runs
    diagnoser.catch_up(new_losses=True)
    assert diagnoser.evaluations == 3


def test_diagnoser_runs_at_once_on_a_nonfinite_record():
    layout, records = _records(2)
    history = History(layout)
    diagnoser = Diagnoser(RuleEngine(builtin_rules()), history, every=1)
    records[1].loss = float("nan")
    for record in records:
        history.add_losses([record.step], [record.loss])
        history.append(record)
        diagnoser.feed(record)
    assert diagnoser.evaluations == 1
    assert [d.sign for d in diagnoser.diagnoses()] == ["loss-nonfinite"]
    assert np.isnan(history.losses()[1][-1])


# --------------------------------------------------------------------------- records
def test_records_hold_activations_as_one_table_whatever_they_were_given():
    from gradscope.records import ActivationStats, ActivationTable

    relu = ActivationStats(0.1, 1.0, 0.5, 0.0, None, 0.25, 0, 2, 1, True)
    tanh = ActivationStats(0.0, 0.5, 0.0, 0.125, 0.75, None, 3, 1, 0, False)
    n = 2
    record = gradscope_record(n, activations={"relu": relu, "tanh": tanh})
    table = record.activations
    assert isinstance(table, ActivationTable)
    assert dict(table) == {"relu": relu, "tanh": tanh}
    assert table.column("dead_frac")[0] == 0.25 and np.isnan(table.column("dead_frac")[1])
    assert table.input_nonfinite.tolist() == [0, 3] and table.orders.tolist() == [1, 0]
    assert ActivationTable.of(table) is table
    assert record.modules_over("nonfinite_frac", 0.0) == {"tanh": 0.125}
    assert len(gradscope_record(n).activations) == 0


def gradscope_record(n, **fields):
    from gradscope import StepRecord

    arrays = [np.zeros(n)] * 9
    return StepRecord(0, 1.0, True, False, [0.1], *arrays, np.ones(n, bool), 1, True, **fields)
