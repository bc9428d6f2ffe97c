"""Rules on hand-made histories (no model): thresholds, persistence, false-alarm guards, the
public API for switching rules off, tuning them and adding new ones, and docs/rules.md."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rulekit import act, data, deep_layout, history, per_layer, record

import gradscope
from gradscope.options import WatchOptions
from gradscope.rules import RuleEngine, builtin_rules
from gradscope.rules.catalog import render

SIGNS = ["loss-flat", "loss-nonfinite", "grad-none", "layers-stalled", "training-unstable",
         "grad-vanishing", "grad-exploding", "grad-accumulating", "params-frozen", "units-dead",
         "activations-saturated", "values-nonfinite", "data-suspect"]


def run(h, **options) -> list[gradscope.Diagnosis]:
    engine = RuleEngine.from_options(WatchOptions.from_kwargs(options))
    engine.update(h)
    return engine.diagnoses()


def signs(diagnoses, severities=("warning", "error")) -> set[str]:
    return {d.sign for d in diagnoses if d.severity in severities}


def vanishing_history(first_norm: float, steps: int = 30):
    layout = deep_layout(4)
    grads = per_layer(layout, [first_norm, 1e-3, 1e-2, 1.0])
    return history(layout, [record(layout, s, grad_norm=grads) for s in range(steps)])


def test_every_sign_has_a_rule_with_documented_thresholds():
    rules = builtin_rules()
    assert {r.sign for r in rules} == set(SIGNS)
    for r in rules:
        assert r.title and r.description and r.needs, r.id
        for name, threshold in r.thresholds.items():
            assert threshold.source, f"{r.id}.{name} has no source"


def test_grad_vanishing_uses_the_autotrainer_thresholds():
    assert "grad-vanishing" in signs(run(vanishing_history(5e-5)))  # ratio 5e-5, norm < 1e-4
    assert "grad-vanishing" not in signs(run(vanishing_history(2e-3)))  # ratio 2e-3 > 1e-3


def test_threshold_override_changes_the_outcome():
    h = vanishing_history(5e-5)
    assert "grad-vanishing" not in signs(run(h, thresholds={"grad-vanishing": {"ratio": 1e-6}}))


def test_condition_must_persist_for_the_window():
    layout = deep_layout(4)
    bad = per_layer(layout, [5e-5, 1e-3, 1e-2, 1.0])
    good = per_layer(layout, [0.5, 0.5, 0.5, 1.0])
    records = [record(layout, s, grad_norm=bad if s >= 27 else good) for s in range(30)]
    assert "grad-vanishing" not in signs(run(history(layout, records))), "3 bad steps < window 5"
    records = [record(layout, s, grad_norm=bad if s >= 25 else good) for s in range(30)]
    assert "grad-vanishing" in signs(run(history(layout, records)))


def test_first_steps_of_training_raise_no_warning():
    layout = deep_layout(4)
    bad = per_layer(layout, [5e-5, 1e-3, 1e-2, 1.0])
    records = [record(layout, s, grad_norm=bad) for s in range(10)]
    assert signs(run(history(layout, records))) == set()


def test_disable_rules_and_select_rules():
    h = vanishing_history(5e-5)
    assert "grad-vanishing" not in signs(run(h, disable_rules=["grad-vanishing"]))
    only = run(h, rules=["grad-vanishing"])
    assert {d.sign for d in only} == {"grad-vanishing"}


def test_unknown_rule_or_threshold_is_a_clear_error():
    with pytest.raises(gradscope.GradscopeError, match="unknown rule 'nope'"):
        RuleEngine.from_options(WatchOptions.from_kwargs({"rules": ["nope"]}))
    with pytest.raises(gradscope.GradscopeError, match="no threshold 'bogus'"):
        RuleEngine.from_options(WatchOptions.from_kwargs(
            {"thresholds": {"grad-vanishing": {"bogus": 1}}}))
    with pytest.raises(gradscope.GradscopeError, match="unknown rule"):
        RuleEngine.from_options(WatchOptions.from_kwargs({"thresholds": {"nope": {}}}))


def test_user_rule_through_watch():
    @gradscope.rule(sign="grad-exploding", severity="warning", title="Head too large",
                    thresholds={"limit": gradscope.Threshold(0.5, "my limit")})
    def head_too_large(ctx):
        last = ctx.last
        norm = last.layer_grad_norm(ctx.layout)[-1] if last else 0.0
        if not norm > ctx.t["limit"]:
            return None
        return gradscope.Finding(summary=f"head norm {norm:.3g}",
                                 causes=[gradscope.Cause("lr-too-high", 1.0, "big head")])

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, opt, every=1, rules=[head_too_large],
                         thresholds={"head-too-large": {"limit": 1e-9}}) as scope:
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean() * 100
            loss.backward()
            opt.step()
            scope.step(loss)
    [d] = scope.diagnose()
    assert (d.rule, d.sign, d.cause, d.first_step, d.last_step) == (
        "head-too-large", "grad-exploding", "lr-too-high", 0, 2)


def test_amp_overflow_steps_are_not_alarms_unless_they_persist():
    layout = deep_layout(2)
    n = len(layout.params)
    inf = np.full(n, np.inf)

    def overflow(s):
        return record(layout, s, stepped=False, skipped=True, grad_norm=inf,
                      grad_nonfinite=np.ones(n), changed=np.full(n, np.nan),
                      update_ratio=np.full(n, np.nan))

    records = [overflow(s) if s in (0, 1, 2, 15) else record(layout, s) for s in range(40)]
    learning = [2.0 * 0.97 ** s for s in range(40)]  # a loss that goes down, as it should
    assert signs(run(history(layout, records, losses=learning))) == set()
    records = [overflow(s) if s >= 20 else record(layout, s) for s in range(40)]
    assert "values-nonfinite" in signs(run(history(layout, records)))


def test_learning_rate_warmup_is_not_flat_loss_or_frozen():
    layout = deep_layout(2)
    n = len(layout.params)
    def records(lr):
        return [record(layout, s, lrs=[lr(s)], loss=2.0 + 0.01 * (s % 3),
                       update_ratio=np.full(n, 1e-8 * (s + 1)), changed=np.zeros(n))
                for s in range(120)]

    assert signs(run(history(layout, records(lambda s: 1e-6 * (s + 1))))) == set()
    # the same flat run without a rising learning rate is diagnosed
    assert signs(run(history(layout, records(lambda s: 1e-6)))) == {"loss-flat", "params-frozen"}


def test_a_warning_that_stops_holding_is_withdrawn():
    layout = deep_layout(4)
    bad = per_layer(layout, [5e-5, 1e-3, 1e-2, 1.0])
    good = per_layer(layout, [0.5, 0.5, 0.5, 1.0])
    engine = RuleEngine(builtin_rules())
    h = gradscope.History(layout)
    for s in range(40):
        h.append(record(layout, s, grad_norm=bad if s < 30 else good))
        h.add_losses([s], [1.0 / (s + 1)])
        engine.update(h)
        if s == 29:
            assert "grad-vanishing" in signs(engine.diagnoses())
    assert "grad-vanishing" not in signs(engine.diagnoses())
    assert [d.sign for d in engine.resolved] == ["grad-vanishing"]


def test_noisy_but_decreasing_loss_is_not_unstable():
    rng = np.random.default_rng(0)
    steps = 300
    losses = 2.0 * np.exp(-np.arange(steps) / 150) * (1 + 0.3 * rng.standard_normal(steps))
    layout = deep_layout(2)
    records = [record(layout, s, loss=float(losses[s])) for s in range(steps)]
    assert signs(run(history(layout, records, losses))) == set()


def test_loss_spikes_are_unstable():
    rng = np.random.default_rng(0)
    losses = 1.0 + 0.05 * rng.standard_normal(200)
    losses[[60, 90, 120, 150]] = 5.0
    layout = deep_layout(2)
    n = len(layout.params)
    records = [record(layout, s, loss=float(losses[s]), update_ratio=np.full(n, 0.2))
               for s in range(200)]
    [d] = [d for d in run(history(layout, records, losses)) if d.sign == "training-unstable"]
    assert d.cause == "lr-too-high" and d.evidence["spikes"] == 4


def _converged_loss(steps: int, seed: int = 0) -> np.ndarray:
    """A classifier's loss falling from ~2.3 to ~0.03 with skewed (log-normal) batch noise:
    near zero its relative jitter is large, as a few hard examples dominate a batch."""
    rng = np.random.default_rng(seed)
    level = 0.03 + 2.27 * np.exp(-np.arange(steps) / 40)
    return level * rng.lognormal(0.0, 0.5, steps)


def test_isolated_spikes_of_a_converged_noisy_loss_are_not_unstable():
    losses = _converged_loss(600)
    losses[[420, 470, 520]] = [0.5, 0.3, 0.35]  # rare hard batches, recovered from at once
    layout = deep_layout(2)
    records = [record(layout, s, loss=float(losses[s])) for s in range(600)]
    assert "training-unstable" not in signs(run(history(layout, records, losses)))


def test_recurring_spikes_of_a_converged_loss_are_unstable():
    losses = _converged_loss(600)
    losses[400::10] *= 20  # every tenth batch from step 400 on: a pattern, not noise
    layout = deep_layout(2)
    records = [record(layout, s, loss=float(losses[s])) for s in range(600)]
    [d] = [d for d in run(history(layout, records, losses)) if d.sign == "training-unstable"]
    assert d.severity == "warning" and d.evidence["spikes"] >= 3


def test_frozen_on_purpose_is_info_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with gradscope.watch(model, opt, every=1) as scope:
        for _ in range(30):
            opt.zero_grad()
            loss = (model(torch.randn(16, 4)) - 1).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    diagnoses = scope.diagnose()
    assert signs(diagnoses) == set()
    [info] = [d for d in diagnoses if d.sign == "params-frozen"]
    assert info.severity == "info" and info.layers == ["0"]


def test_nonfinite_origin_and_data_checks_from_records():
    layout = deep_layout(2)
    acts = {"0": act(order=0), "1": act(nonfinite=0.5, order=1)}
    records = [record(layout, s) for s in range(5)]
    records.append(record(layout, 5, loss=float("nan"), activations=acts,
                          nonfinite_origin="1"))
    found = {d.sign: d for d in run(history(layout, records))}
    assert found["values-nonfinite"].cause == "invalid-math"
    assert found["loss-nonfinite"].cause == "invalid-math"
    assert found["loss-nonfinite"].layers == ["1"]
    records = [record(layout, s, data=data(nonfinite=3 if s == 4 else 0)) for s in range(6)]
    found = {d.sign: d for d in run(history(layout, records))}
    assert found["data-suspect"].cause == "data-nonfinite"
    assert found["data-suspect"].severity == "error"


def test_a_rule_that_raises_is_switched_off_not_fatal():
    @gradscope.rule(sign="loss-flat", severity="warning", title="broken")
    def broken(ctx):
        raise ValueError("bug in a user rule")

    engine = RuleEngine([broken, *builtin_rules()])
    layout = deep_layout(2)
    with pytest.warns(gradscope.GradscopeWarning, match="broken"):
        engine.update(history(layout, [record(layout, 0)]))
    engine.update(history(layout, [record(layout, 0)]))  # switched off: no second warning


def test_rules_doc_is_up_to_date():
    path = Path(__file__).parent.parent / "docs" / "rules.md"
    assert path.read_text() == render(), (
        "docs/rules.md is out of date: run python -m gradscope.rules.catalog > docs/rules.md")


def test_median_finite_matches_numpy_nanmedian():
    from gradscope.rules.common import median_finite

    rng = np.random.default_rng(0)
    for _ in range(100):
        values = rng.normal(size=(rng.integers(1, 9), rng.integers(1, 9)))
        values[rng.random(values.shape) < 0.3] = np.nan
        values[rng.random(values.shape) < 0.1] = np.inf
        clean = np.where(np.isfinite(values), values, np.nan)
        for axis in (0, 1, None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = np.nanmedian(clean, axis=axis)
            np.testing.assert_allclose(median_finite(values, axis=axis), expected,
                                       equal_nan=True)


def test_frozen_evidence_names_each_parameter_with_its_own_ratio():
    layout = deep_layout(2)  # 0.weight, 0.bias, 1.weight, 1.bias
    grads = np.array([0.1, 1e-9, 0.1, 0.1])  # only 0.bias is tiny next to its weight norm
    records = [record(layout, s, grad_norm=grads, changed=np.zeros(4)) for s in range(5)]
    [d] = [d for d in run(history(layout, records)) if d.sign == "params-frozen"]
    assert d.evidence["tiny_grad_example"] == "0.bias" and d.evidence["tiny_grad_params"] == 1
    assert d.evidence["tiny_grad_ratio"] == pytest.approx(1e-9)
    [cause] = [c for c in d.causes if c.id == "vanishing-gradients"]
    assert "'0.bias': 1.00e-09" in cause.evidence and "0.1" not in cause.evidence


@pytest.mark.parametrize("cause, general", [
    ("missing-zero-grad", "Call optimizer.zero_grad() (or model.zero_grad()) once per optimizer "
                          "step, before the first backward of the step."),
    ("missing-from-optimizer", "Build the optimizer from model.parameters() after the model is "
                               "complete (layers added later are not in it)."),
    ("invalid-math", "Look at the module named as origin: guard log/sqrt/division with a small "
                     "epsilon or clamp, and keep exp/softmax inputs bounded."),
])
def test_check_lists_do_not_repeat_a_causes_advice(cause, general):
    from gradscope import Cause
    from gradscope.rules.advice import CAUSE_CHECKS, checks_for

    other = "Check the learning rate of each param group."
    checks = checks_for([Cause(cause, 1.0, "")], [general, other])
    assert checks == [CAUSE_CHECKS[cause], other]


def test_distinct_advice_is_kept():
    from gradscope import Cause
    from gradscope.rules.advice import CAUSE_CHECKS, checks_for

    causes = [Cause("lr-too-high", 0.6, ""), Cause("exploding-gradients", 0.4, "")]
    general = ["Inspect the batches at the spike steps."]
    assert checks_for(causes, general) == [CAUSE_CHECKS["lr-too-high"],
                                           CAUSE_CHECKS["exploding-gradients"], *general]
