"""The first bad step of broken training loops: found exactly at every=10 and every=1, its
cause judged from that step and the ones before, the same in the report, the run log's
logged findings and a replay of the log.

Ground truth comes from the same loop trained with plain torch (tests/onset_loops.py)."""

import io

import numpy as np
import pytest
import torch
from onset_loops import LOOPS, first_bad_step, first_blowup_step, run_plain
from torch import nn

import gradscope
from gradscope.cli import _load, main

NONFINITE = ("loss-nonfinite", "values-nonfinite")


def _key(d):
    return (d.sign, d.cause, d.first_step, d.evidence.get("origin"))


def _watched(loop, every, log_dir):
    model, opt = loop.build()
    scope = gradscope.watch(model, opt, every=every, live=False, log_dir=str(log_dir))
    # the same loop, stepped through gradscope: the build is seeded, so the run is the same
    loop_build = loop.build
    loop.build = lambda: (model, opt)
    try:
        rows = run_plain(loop, step_fn=scope.step)
    finally:
        loop.build = loop_build
    scope.close()
    return scope, rows


@pytest.mark.parametrize("every", [10, 1])
@pytest.mark.parametrize("name", list(LOOPS))
def test_first_bad_step_place_and_cause(name, every, tmp_path):
    loop = LOOPS[name]
    if name.startswith("gpt2"):
        pytest.importorskip("transformers")
    plain = run_plain(loop)
    scope, rows = _watched(loop, every, tmp_path)
    # gradscope only observes (the replay of the first bad step included): the same run
    np.testing.assert_array_equal([r["loss"] for r in rows], [r["loss"] for r in plain])
    assert scope.failures == {}
    diagnoses = scope.diagnose()
    if loop.nan:
        step = first_bad_step(plain)
        assert step is not None
        found = [d for d in diagnoses if d.sign in NONFINITE]
        assert found, [d.sign for d in diagnoses]
        top = diagnoses[0]  # the most severe and earliest finding leads with the cause
        assert (top.first_step, top.cause) == (step, loop.cause), top
        for d in found:
            assert d.first_step == step, (d.summary, step)
            assert d.cause == loop.cause, (d.causes, loop.cause)
            if loop.place is not None:
                assert d.evidence.get("origin") == loop.place, d.evidence
            if loop.place not in (None, "loss", "input"):
                assert d.layers == [loop.place]
            if loop.gap:
                assert d.evidence["gap_after"] == "stem.conv"
                assert d.evidence["gap_before"] == "stem.bn"
    else:
        assert first_bad_step(plain) is None
        step = first_blowup_step(plain)
        assert step is not None
        top = diagnoses[0]
        assert (top.rule, top.first_step, top.cause) == ("blow-up", step, loop.cause), top
        assert top.severity == "error"
        assert top.evidence["update_ratio"] > 1e-2
    # the report, the logged findings and a replay of the log agree on the top finding
    text = scope.report(file=io.StringIO(), width=200)
    top = diagnoses[0]
    assert f"{top.sign} " in text and f"{top.first_step}" in text
    log, _, logged, _ = _load(str(tmp_path), logged=True)
    # every diagnosis event of the run, live as it went: an onset, once found, is never
    # replaced by a later one
    events = [e["diagnosis"] for e in log.events if e["diagnosis"]["sign"] in NONFINITE]
    assert {(e["first_step"], e["causes"][0]["id"]) for e in events} <= {
        (d.first_step, d.cause) for d in diagnoses if d.sign in NONFINITE}
    _, _, replayed, _ = _load(str(tmp_path))
    live = {_key(d) for d in diagnoses if d.severity == "error"}
    assert {_key(d) for d in logged if d.severity == "error"} == live
    assert {_key(d) for d in replayed if d.severity == "error"} == live


def test_cli_report_shows_the_first_nonfinite_step(tmp_path, capsys):
    loop = LOOPS["mlp-rownorm"]
    _watched(loop, 10, tmp_path)
    main(["report", str(tmp_path)])
    out = capsys.readouterr().out
    assert "non-finite from step 23" in out
    assert "last finite" in out


@pytest.mark.parametrize("every", [10, 1])
def test_amp_overflow_skipped_by_the_scaler_stays_healthy(every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scope = gradscope.watch(model, opt, every=every, live=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(25):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step in (13, 14):
            model[2].weight.grad[0, 0] = float("inf")  # what a float16 overflow looks like
        scaler.step(opt)  # skipped: the optimizer's hooks do not run
        scaler.update()
        scope.step(loss)
    scope.close()
    assert scope.failures == {}
    assert not [d.sign for d in scope.diagnose() if d.severity == "error"]


@pytest.mark.parametrize("every", [10, 1])
def test_header_of_a_run_nan_from_its_first_step(every):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=every, live=False)
    for _ in range(12):
        opt.zero_grad()
        loss = (model(torch.randn(8, 4)) * float("nan")).mean()  # NaN made in the loss code
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    lines = scope.report(file=io.StringIO(), width=100).splitlines()
    assert lines[2].startswith("loss  first nan (step 0)")
    assert lines[3].split() == ["non-finite", "from", "step", "0", "·", "last", "step", "11"]
    top = scope.diagnose()[0]
    assert (top.first_step, top.cause, top.evidence["origin"]) == (0, "invalid-math", "loss")
