"""When the rules run: at most once per RULE_STEPS training steps, at once on NaN/Inf, and
on every unseen record before diagnose()/report()/close() answer; a diagnosis's first step
does not depend on that cadence."""

from __future__ import annotations

import io

import torch
from torch import nn

import gradscope
from gradscope.demo import run_demo
from gradscope.history import History
from gradscope.options import WatchOptions
from gradscope.rules import RuleEngine
from gradscope.rules.engine import RULE_STEPS
from gradscope.runlog import read_log


def _train(scope, model, opt, steps, poison_at=None):
    for step in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        if step == poison_at:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        scope.step(loss)


def _counting(scope):
    calls = []
    update = scope.engine.update

    def counted(history, unseen=1):
        calls.append((history.last.step, unseen))
        return update(history, unseen)

    scope.engine.update = counted
    return calls


def test_rules_run_once_per_rule_steps_and_at_once_on_nan():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=1, live=False)
    calls = _counting(scope)
    _train(scope, model, opt, 25, poison_at=13)
    # every 10th record; then at once from the NaN step on (the weights stay NaN after it)
    assert calls == [(9, 10)] + [(step, 4 if step == 13 else 1) for step in range(13, 25)]
    assert scope.diagnose()[0].sign == "loss-nonfinite"
    assert len(calls) == 13  # nothing unseen: diagnose() ran no evaluation
    scope.close()


def test_diagnose_catches_up_on_unseen_records():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=1, live=False)
    calls = _counting(scope)
    _train(scope, model, opt, 14)
    assert calls == [(9, 10)]
    scope.diagnose()
    assert calls == [(9, 10), (13, 4)]
    scope.close()


def test_every_record_is_evaluated_when_records_are_sparse():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=RULE_STEPS, live=False)
    calls = _counting(scope)
    _train(scope, model, opt, 3 * RULE_STEPS)
    assert calls == [(0, 1), (RULE_STEPS, 1), (2 * RULE_STEPS, 1)]
    scope.close()
    # close() brings the losses of the unrecorded last steps in: the rules look once more
    assert calls[3:] == [(2 * RULE_STEPS, 1)]
    assert scope.history.losses()[0][-1] == 3 * RULE_STEPS - 1


def test_no_new_loss_and_no_unseen_record_runs_no_rule():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=1, live=False)
    calls = _counting(scope)
    _train(scope, model, opt, RULE_STEPS)
    scope.diagnose()
    scope.close()
    scope.diagnose()
    assert calls == [(RULE_STEPS - 1, RULE_STEPS)]


def test_first_step_is_the_same_as_with_rules_on_every_record(tmp_path):
    # the reference: a fresh engine that evaluates after each record of the same run
    scope, _ = run_demo("vanishing", steps=40, out=tmp_path / "v.png", live=False,
                        log_dir=tmp_path / "log", file=io.StringIO())
    live = {d.sign: (d.first_step, d.cause) for d in scope.diagnose()}
    assert live, "the demo should produce a diagnosis"
    engine = RuleEngine.from_options(WatchOptions())
    history = History(scope.layout, capacity=scope.options.history_size)
    steps, losses = scope.history.losses()
    for record in scope.history.records():
        upto = steps <= record.step
        history.add_losses(steps[upto & (steps > (history.last.step if history.last else -1))]
                           .tolist(), losses[upto & (steps > (history.last.step
                                                              if history.last else -1))].tolist())
        history.append(record)
        engine.update(history)
    every_record = {d.sign: (d.first_step, d.cause) for d in engine.diagnoses()}
    assert live == every_record


def test_diagnoses_found_at_close_reach_the_run_log(tmp_path):
    # 6 steps at every=1: the rules have not run yet when training stops; close() runs
    # them and the run log gets the diagnosis event
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, opt, every=1, live=False, log_dir=tmp_path) as scope:
        calls = _counting(scope)
        for _ in range(6):
            opt.zero_grad()
            loss = model[1](model[0](torch.randn(8, 4)).detach()).pow(2).mean()  # cut off
            loss.backward()
            opt.step()
            scope.step(loss)
    assert calls == [(5, 6)]
    [d] = [d for d in scope.diagnose() if d.sign == "grad-none"]
    log = read_log(tmp_path)
    assert [e.sign for e in log.logged_diagnoses()] == ["grad-none"]
    assert d.first_step < 5  # found in the history as it stood at an earlier record
