"""The rules' shortcuts (early answers from cheap preconditions, values kept across
evaluations) give what the general path gives: the same diagnoses on real runs, and the same
numbers as a plain recomputation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scenarios as S
import torch
from rulekit import fed_one_by_one

from gradscope import records
from gradscope.history import FiniteScan, History, Ring
from gradscope.layout import ModelLayout
from gradscope.rules import activations, evidence, gradients, loss, params
from gradscope.rules.common import fast_median, median_finite, plain_median
from gradscope.rules.engine import RuleEngine, builtin_rules
from gradscope.rules.onset import first_blowup


def _general(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch every precondition shortcut off: each rule takes its full path."""
    for module, name, value in [
        (gradients, "_may_lack_grads", True), (gradients, "_may_vanish", True),
        (gradients, "_may_explode", True), (gradients, "_may_stall", True),
        (loss, "_may_spike", True),
        (params, "_may_be_frozen", True), (evidence, "_may_exceed", True),
        (evidence, "_some_layer_moves", False),
    ]:
        monkeypatch.setattr(module, name, lambda *args, _v=value, **kwargs: _v)
    monkeypatch.setattr(FiniteScan, "all_finite", lambda self: bool(
        np.all(np.isfinite(self._ring.array()))))
    monkeypatch.setattr(FiniteScan, "max_finite", lambda self: math.inf)
    monkeypatch.setattr(records, "SMALL_ARRAY", 0)  # no plain-Python path for small arrays
    monkeypatch.setattr(activations, "_hidden_over", lambda record, field, limit: frozenset(
        record.modules_over(field, limit)) - {activations._output_module(record)})


def _replay(history: History) -> list:
    """Every evaluation's new or changed diagnoses over a fresh copy of `history`, fed one
    record at a time with its losses (records' kept values cleared first)."""
    engine = RuleEngine(builtin_rules())
    return [[(d.sign, d.severity, d.first_step, d.last_step, d.summary,
              [(c.id, c.likelihood, c.evidence) for c in d.causes], list(d.layers),
              repr(d.evidence), list(d.checks)) for d in engine.update(copy)]
            for copy in fed_one_by_one(history)]


SCENARIOS = ["flat_lr_too_low", "flat_saturated", "none_detached", "stalled_dead_layer",
             "unstable_lr_too_high", "vanishing_tiny_init", "exploding_lr",
             "accumulating_no_zero_grad", "frozen_missing_from_optimizer", "dead_relu_bias",
             "saturated_raw_inputs", "nonfinite_exploding", "healthy_mlp"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_shortcuts_give_the_general_paths_diagnoses(name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    history = getattr(S, name)().history
    fast = _replay(history)
    assert any(fast) or name.startswith("healthy")
    with monkeypatch.context() as patched:
        _general(patched)
        general = _replay(history)
    assert fast == general


def test_finite_scan_matches_a_rescan_of_the_ring() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        ring = Ring(int(rng.integers(1, 60)))
        scan = FiniteScan(ring)
        for _ in range(20):
            values = rng.normal(size=int(rng.integers(0, 90))) * 10
            for share, bad in ((0.2, np.nan), (0.05, np.inf), (0.05, -np.inf), (0.2, 3.0)):
                values[rng.random(values.size) < share] = bad
            ring.extend(values.tolist())
            if rng.random() < 0.3:
                continue  # several batches between two questions
            held = ring.array()
            finite = np.isfinite(held)
            assert scan.all_finite() == bool(finite.all())
            if not finite.any():
                assert scan.first_finite() is None and scan.max_finite() == -math.inf
                continue
            at = int(np.argmax(finite))
            assert scan.first_finite() == (ring.count - len(ring) + at, float(held[at]))
            assert scan.max_finite() == held[finite].max()


def test_first_blowup_shortcut_matches_the_full_scan() -> None:
    rng = np.random.default_rng(2)
    layout = ModelLayout.of(torch.nn.Linear(1, 1))
    for _ in range(200):
        history = History(layout, loss_capacity=int(rng.integers(5, 80)))
        for step in range(0, int(rng.integers(1, 150)), 3):
            values = np.abs(rng.normal(size=3)) * 10.0 ** rng.integers(-1, 4, size=3)
            values[rng.random(3) < 0.1] = np.nan
            history.add_losses([step, step + 1, step + 2], values.tolist())
            for factor in (10.0, 1e3):
                steps, held = history.losses()
                finite = np.isfinite(held)
                expected = None
                if finite.any() and held[finite][0] > 0:
                    start = float(held[finite][0])
                    over = np.flatnonzero(finite & (held >= factor * start))
                    if over.size:
                        expected = (int(steps[over[0]]), float(held[over[0]]), start)
                assert first_blowup(history, factor) == expected


def _median_finite_reference(values: np.ndarray, axis: int | None = None):
    """numpy's own median of the finite values (NaN when there are none; NaN for an empty
    array, as gradscope's median answers it)."""
    if values.size == 0:
        return np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        median = np.nanmedian(np.where(np.isfinite(values), values, np.nan), axis=axis)
    return float(median) if np.ndim(median) == 0 else median


def test_median_finite_matches_numpys_median_of_the_finite_values() -> None:
    rng = np.random.default_rng(3)
    for _ in range(2000):
        rows, cols = int(rng.integers(0, 18)), int(rng.integers(1, 12))
        a = rng.lognormal(size=(rows, cols)) * 10.0 ** rng.integers(-8, 3)
        mask = rng.random((rows, cols))
        a[mask < 0.15] = np.nan
        a[(mask > 0.15) & (mask < 0.2)] = np.inf
        a[(mask > 0.2) & (mask < 0.22)] = -np.inf
        if rng.random() < 0.2:
            a = a.astype(np.float32)
        for axis in (None, 0):
            got, want = median_finite(a, axis=axis), _median_finite_reference(a, axis=axis)
            assert np.array_equal(np.asarray(got), np.asarray(want), equal_nan=True)
            assert np.asarray(got).dtype == np.asarray(want).dtype or axis is None


def test_plain_median_is_fast_median_without_nan() -> None:
    rng = np.random.default_rng(4)
    for n in range(0, 20):
        values = (rng.normal(size=n) * 10.0 ** rng.integers(-5, 5, size=n)).tolist()
        if n > 2:
            values[0] = math.inf
        assert np.array_equal(plain_median(values), fast_median(values), equal_nan=True)


def _small_arrays(rng: np.random.Generator, n: int) -> np.ndarray:
    """n values over a wide range of magnitudes (some beyond float64's squares), with NaN, +-inf
    and zeros among them."""
    values = rng.random(n) * 10.0 ** rng.integers(-200, 200, size=n)
    mask = rng.random(n)
    values[mask < 0.15] = np.nan
    values[(mask > 0.15) & (mask < 0.2)] = np.inf
    values[(mask > 0.2) & (mask < 0.25)] = 0.0
    return values


def test_small_array_paths_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-layer norms, the stall precondition and the frozen precondition on Python floats
    give numpy's answers bit for bit (float64) on small arrays."""
    rng = np.random.default_rng(5)
    outcomes = set()
    for _ in range(400):
        layers, n = int(rng.integers(1, 8)), int(rng.integers(1, 40))
        owners = rng.integers(0, layers, size=n).tolist()
        layout = type("Layout", (), {"param_layer": owners, "owners": np.asarray(owners),
                                     "layers": [None] * layers})()
        ratio, norm, grad = (_small_arrays(rng, n) for _ in range(3))
        if rng.random() < 0.5:  # ratios close together: the stall test can answer False
            ratio = np.where(np.isfinite(ratio), 1e-3 * (1 + 0.1 * rng.random(n)), ratio)
            norm = np.where(np.isfinite(norm), rng.random(n), norm)
        changed = rng.integers(0, 2, size=n).astype(np.float64)
        trainable = rng.random(n) < 0.8
        record = type("Record", (), {})()
        record.update_ratio, record.param_norm, record.grad_norm = ratio, norm, grad
        record.changed, record.requires_grad = changed, trainable
        record.derived = lambda key, compute: compute()
        stall = float(rng.choice([0.01, 0.5, 0.999]))
        answers = []
        for small in (64, 0):
            monkeypatch.setattr(records, "SMALL_ARRAY", small)
            with np.errstate(all="ignore"):
                answers.append((records._per_layer(layout, grad).tobytes(),
                                gradients._may_stall(record, stall),
                                params._may_be_frozen(record)))
        assert answers[0] == answers[1]
        outcomes.add(answers[0][1:])
    assert outcomes == {(a, b) for a in (False, True) for b in (False, True)}


def test_small_activation_tables_give_numpy_modules_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Modules over a limit (positive, and zero: any non-zero measured value) on Python floats
    are numpy's, values and order."""
    rng = np.random.default_rng(6)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        floats = rng.random((n, 6))
        mask = rng.random((n, 6))
        floats[mask < 0.2] = np.nan
        floats[(mask > 0.2) & (mask < 0.5)] = 0.0
        floats[(mask > 0.5) & (mask < 0.55)] = 0.3  # on a limit
        table = records.ActivationTable([f"m{i}" for i in range(n)], floats,
                                        np.zeros((n, 3), np.int64), np.ones((n, 3), bool))
        answers = []
        for small in (64, 0):
            monkeypatch.setattr(records, "SMALL_ARRAY", small)
            record = type("Record", (), {"activations": table, "_derived": {}})()
            record.derived = lambda key, compute, r=record: records.StepRecord.derived(
                r, key, compute)
            record._activations_where = lambda field, m, r=record: (
                records.StepRecord._activations_where(r, field, m))
            record._positive_activations = lambda r=record: (
                records.StepRecord._positive_activations(r))
            answers.append([list(records.StepRecord.modules_over(record, field, limit).items())
                            for field in ("dead_frac", "saturated_frac", "nonfinite_frac")
                            for limit in (0.0, 0.3, 0.9)])
        assert answers[0] == answers[1]


def test_small_nonfinite_checks_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cadence's non-finite activation check and weights_finite on Python floats give
    numpy's answers (float32 and float64 values, NaN, +-inf)."""
    from gradscope.rules import engine

    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(300):
        n = int(rng.integers(1, 30))
        values = rng.random(n) * (rng.random(n) < 0.3)
        mask = rng.random(n)
        values[mask < 0.1] = np.nan
        values[(mask > 0.1) & (mask < 0.13)] = -np.inf if rng.random() < 0.5 else np.inf
        if rng.random() < 0.3:
            values = values.astype(np.float32)
        floats = np.zeros((n, 6))
        floats[:, records.FLOAT_FIELDS.index("nonfinite_frac")] = values
        table = records.ActivationTable([f"m{i}" for i in range(n)], floats,
                                        np.zeros((n, 3), np.int64), np.ones((n, 3), bool))
        answers = []
        for small in (64, 0):
            monkeypatch.setattr(records, "SMALL_ARRAY", small)
            record = type("Record", (), {"activations": table, "param_norm": values,
                                         "_derived": {}})()
            record.derived = lambda key, compute, r=record: records.StepRecord.derived(
                r, key, compute)
            answers.append((engine._any_nonfinite_activation(record),
                            records.StepRecord.weights_finite(record)))
        assert answers[0] == answers[1]
        seen.add(answers[0])
    assert seen == {(a, b) for a in (False, True) for b in (False, True)}
