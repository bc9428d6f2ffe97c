"""The run log: strict JSON lines, exact round trip, crash tolerance, replay of the rules."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from test_report_fixtures import make_record, small_diagnoses, small_history, small_model
from tolerance import UNIT_ROUNDOFF

import gradscope
from gradscope.demo import run_demo
from gradscope.layout import ModelLayout
from gradscope.options import WatchOptions
from gradscope.records import ActivationStats
from gradscope.rules.engine import RuleEngine
from gradscope.runlog import LOG_NAME, RunLogWriter, layout_from_summary, read_log

# the log keeps each value's shortest float32 digits: one rounding to float32, and the digits
# read back as float64 lie within half a float32 ulp of that float32 value
F32_ROUNDING = 2 * UNIT_ROUNDOFF[torch.float32]


def strict_lines(path):
    """Every line parsed by a JSON parser that refuses NaN/Infinity literals."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def train(model, opt, scope, steps, start=0):
    gen = torch.Generator().manual_seed(start)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(16, 8, generator=gen)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)


def assert_records_equal(a, b):
    assert a.step == b.step and a.stepped == b.stepped and a.skipped == b.skipped
    np.testing.assert_allclose(a.loss, b.loss, rtol=0)
    for name in ("grad_norm", "grad_max", "param_norm", "update_ratio", "changed",
                 "stale_grad", "grad_nonfinite"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=F32_ROUNDING,
                                   equal_nan=True, err_msg=name)
    for name in ("grad_none", "not_in_optimizer"):
        assert getattr(a, name).dtype == bool
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.lrs == pytest.approx(b.lrs)
    assert a.backward_count == b.backward_count
    assert a.loss_requires_grad == b.loss_requires_grad
    assert a.nonfinite_origin == b.nonfinite_origin
    assert a.nonfinite_grad_params == b.nonfinite_grad_params
    assert a.data == b.data or (a.data.dtype == b.data.dtype and a.data.shape == b.data.shape)
    assert set(a.activations) == set(b.activations)
    for name, stats in a.activations.items():
        other = b.activations[name]
        for field in ("mean", "std", "zero_frac", "nonfinite_frac"):
            np.testing.assert_allclose(getattr(stats, field), getattr(other, field),
                                       rtol=F32_ROUNDING, equal_nan=True)
        assert (stats.dead_frac is None) == (other.dead_frac is None)
        assert (stats.saturated_frac is None) == (other.saturated_frac is None)
        assert (stats.calls, stats.order, stats.leaf) == (other.calls, other.order, other.leaf)


def test_watched_run_round_trips_through_the_log(tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, opt, every=3, log_dir=tmp_path) as scope:
        train(model, opt, scope, 10)
    entries = strict_lines(tmp_path / LOG_NAME)
    assert next(e["type"] for e in entries) == "header"
    assert entries[-1]["type"] == "end" and entries[-1]["steps"] == 10
    header = entries[0]
    assert header["schema"] == 1
    assert header["layout"] == scope.layout.summary()
    assert header["options"]["every"] == 3 and header["options"]["log_dir"] == str(tmp_path)

    log = read_log(tmp_path)
    assert log.ended and not log.truncated and log.problems == []
    originals = scope.history.records()
    assert [r.step for r in log.records] == [0, 3, 6, 9]
    for a, b in zip(log.records, originals):
        assert_records_equal(a, b)
    steps, losses = scope.history.losses()
    rebuilt = log.history()
    r_steps, r_losses = rebuilt.losses()
    np.testing.assert_array_equal(r_steps, steps)
    np.testing.assert_allclose(r_losses, losses, rtol=0)
    assert rebuilt.layout.layers == scope.layout.layers
    assert rebuilt.layout.param_names == scope.layout.param_names


def test_non_finite_values_are_valid_json_and_come_back(tmp_path):
    layout = ModelLayout.of(small_model())
    n = len(layout.params)
    grad = np.array([np.nan, np.inf, -np.inf, 0.0, 1e-30, 3.5])[:n]
    record = make_record(layout, 4, loss=math.inf, grad_norm=grad,
                         activations={"act1": ActivationStats(
                             math.nan, math.inf, 0.0, 1.0, None, 0.5, 3, 1, 0, True)},
                         nonfinite_origin="hidden", nonfinite_grad_params=["embed.bias"])
    writer = RunLogWriter(tmp_path, layout, {"every": 1})
    writer.on_record(record, [])
    writer.close()
    strict_lines(tmp_path / LOG_NAME)  # no NaN/Infinity literals
    back = read_log(tmp_path).records[0]
    assert back.loss == math.inf
    assert np.isnan(back.grad_norm[0]) and back.grad_norm[1] == np.inf
    assert back.grad_norm[2] == -np.inf and back.grad_norm[3] == 0.0
    assert back.grad_norm[4] == pytest.approx(1e-30, rel=F32_ROUNDING)
    stats = back.activations["act1"]
    assert math.isnan(stats.mean) and stats.std == math.inf and stats.saturated_frac is None
    assert stats.dead_frac == 0.5 and stats.input_nonfinite == 3 and stats.leaf is True
    assert back.nonfinite_origin == "hidden" and back.nonfinite_grad_params == ["embed.bias"]


def test_each_line_is_on_disk_before_close(tmp_path):
    layout = ModelLayout.of(small_model())
    writer = RunLogWriter(tmp_path, layout, {})
    path = tmp_path / LOG_NAME
    assert [e["type"] for e in strict_lines(path)] == ["header"]
    writer.on_record(make_record(layout, 0), small_diagnoses()[:1])
    # read through a separate handle while the writer is still open
    assert [e["type"] for e in strict_lines(path)] == ["header", "step", "diagnosis"]
    log = read_log(tmp_path)
    assert not log.ended and len(log.records) == 1
    writer.close()
    assert read_log(tmp_path).ended


def test_losses_of_unrecorded_steps_and_diagnosis_events(tmp_path):
    source = small_history(steps=12, every=5)
    records = {r.step: r for r in source.records()}
    steps, losses = source.losses()
    history = gradscope.History(source.layout)  # filled step by step, as a Scope does
    writer = RunLogWriter(tmp_path, source.layout, {}, history=history)
    d = small_diagnoses()
    events = {0: [d[0]], 5: [d[0], d[1]], 10: []}
    for step, loss in zip(steps.tolist(), losses.tolist()):
        history.add_losses([step], [loss])
        if step in records:
            history.append(records[step])
            writer.on_record(records[step], events[step])
    writer.close()
    entries = strict_lines(tmp_path / LOG_NAME)
    kinds = [e["type"] for e in entries]
    assert kinds == ["header", "step", "diagnosis", "loss", "step", "diagnosis", "diagnosis",
                     "loss", "step", "loss", "end"]
    assert entries[3]["steps"] == [1, 2, 3, 4]
    assert entries[-2]["steps"] == [11]
    assert [e["event"] for e in entries if e["type"] == "diagnosis"] == ["new", "changed", "new"]
    log = read_log(tmp_path)
    assert [s for s, _ in log.losses] == list(range(12))
    logged = {x.sign: x for x in log.logged_diagnoses()}
    assert logged["grad-vanishing"].causes[0].id == "vanishing-gradients"
    assert logged["grad-vanishing"].evidence["per_layer"] == [1e-6, 0.05, 0.41]


def _write_log(tmp_path, records=5):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, opt, every=1, log_dir=tmp_path) as scope:
        train(model, opt, scope, records)
    return tmp_path / LOG_NAME


def test_truncated_last_line_is_skipped_quietly(tmp_path):
    path = _write_log(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    step_lines = [i for i, line in enumerate(lines) if line.startswith(b'{"type":"step"')]
    cut = [*lines[: step_lines[-1]], lines[step_lines[-1]][:200]]  # killed mid-write
    path.write_bytes(b"".join(cut))
    log = read_log(tmp_path)
    assert log.truncated and log.problems == [] and not log.ended
    assert [r.step for r in log.records] == [0, 1, 2, 3]


def test_corrupt_line_is_reported_with_its_number_and_the_rest_kept(tmp_path):
    path = _write_log(tmp_path)
    lines = path.read_text().splitlines()
    step_lines = [i for i, line in enumerate(lines) if line.startswith('{"type":"step"')]
    lines[step_lines[1]] = lines[step_lines[1]][:50] + "#garbage"
    lines.insert(step_lines[2], '{"type":"step","grad_norm":"oops"}')
    path.write_text("\n".join(lines) + "\n")
    log = read_log(tmp_path)
    assert [p.line for p in log.problems] == [step_lines[1] + 1, step_lines[2] + 1]
    assert "not valid JSON" in log.problems[0].reason
    assert "unreadable step entry" in log.problems[1].reason
    assert [r.step for r in log.records] == [0, 2, 3, 4]
    assert log.ended


def test_replaying_the_log_gives_the_diagnoses_of_the_live_run(tmp_path):
    scope, _ = run_demo("detached", steps=12, out=tmp_path / "d.png", live=False,
                        log_dir=tmp_path / "log", file=io.StringIO())
    live = scope.diagnose()
    assert live, "the demo should produce a diagnosis"
    log = read_log(tmp_path / "log")
    engine = RuleEngine.from_options(WatchOptions())
    log.replay(engine, capacity=scope.options.history_size)
    replayed = engine.diagnoses()
    assert [(d.sign, d.severity, d.first_step, d.last_step, d.cause, d.layers)
            for d in replayed] == [(d.sign, d.severity, d.first_step, d.last_step, d.cause,
                                    d.layers) for d in live]


def test_appended_runs_read_the_last_by_default(tmp_path):
    _write_log(tmp_path, records=2)
    _write_log(tmp_path, records=3)
    log = read_log(tmp_path)
    assert log.runs == 2 and len(log.records) == 3
    assert len(read_log(tmp_path, run=0).records) == 2


def test_layout_summary_round_trip():
    layout = ModelLayout.of(small_model())
    back = layout_from_summary(json.loads(json.dumps(layout.summary())))
    assert back.layers == layout.layers and back.param_layer == layout.param_layer
    assert [p.numel for p in back.params] == [p.numel for p in layout.params]
    assert back.module_names == layout.module_names


def test_log_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(gradscope.GradscopeError, match="is a file"):
        gradscope.watch(torch.nn.Linear(2, 2), log_dir=target)


@pytest.mark.parametrize("content, message", [
    (None, "no run log in"),
    ('{"type":"step"}\n', "holds no gradscope run log header"),
    ('{"type":"header","schema":99,"layout":{}}\n', "schema 99"),
])
def test_unreadable_logs_give_one_clear_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / LOG_NAME).write_text(content)
    with pytest.raises(gradscope.GradscopeError, match=message):
        read_log(tmp_path)


def test_bytes_per_recorded_step_of_a_200_layer_model(tmp_path):
    blocks = []
    for _ in range(100):
        blocks += [torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.ReLU()]
    model = torch.nn.Sequential(*blocks, torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradscope.watch(model, opt, every=1, log_dir=tmp_path) as scope:
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(8, 32)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    assert len(scope.layout.layers) == 201
    sizes = [len(line) + 1 for line in (tmp_path / LOG_NAME).read_text().splitlines()
             if line.startswith('{"type":"step"')]
    assert len(sizes) == 3
    # documented in docs/log-format.md: about 43 kB per recorded step for this model
    assert 30_000 < np.mean(sizes) < 50_000


def test_every_rank_writes_its_own_log_when_all_ranks(tmp_path, monkeypatch):
    import gradscope.signals.distributed as dist
    from gradscope.report.sinks import log_name

    monkeypatch.setattr(dist, "world_size", lambda: 4)
    monkeypatch.setattr(dist, "rank", lambda: 3)
    assert log_name(WatchOptions(all_ranks=True)) == "gradscope.rank3.jsonl"
    assert log_name(WatchOptions()) == LOG_NAME
    RunLogWriter(tmp_path, ModelLayout.of(small_model()), {},
                 name="gradscope.rank3.jsonl").close()
    with pytest.raises(gradscope.GradscopeError, match="one run log per rank"):
        read_log(tmp_path)
    assert read_log(tmp_path / "gradscope.rank3.jsonl").ended
