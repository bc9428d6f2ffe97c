"""No close() needed for the truth: diagnose(), report() and plot() cover every step given to
step() so far, and a run that ends normally without close() still ends its run log."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tolerance import UNIT_ROUNDOFF

import gradscope
from gradscope.cli import main
from gradscope.runlog import read_log

ROOT = Path(__file__).resolve().parents[1]


def _train(steps: int, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, opt, live=False, **options)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)
        losses.append(loss.item())
    return scope, losses


def test_report_of_an_open_scope_covers_the_last_step():
    # every=10: steps 291-299 are not recorded, their losses wait on the device
    scope, losses = _train(300, every=10)
    assert scope.history.last.step == 290
    text = scope.report(file=io.StringIO(), width=120)
    assert "300 steps, 30 recorded" in text
    last = next(line for line in text.splitlines() if line.startswith("loss"))
    assert f"last {losses[-1]:.4g} (step 299)" in last
    steps, values = scope.history.losses()
    assert steps.tolist() == list(range(300))
    assert values.tolist() == pytest.approx(losses, rel=0, abs=0)  # the same float32 values
    assert not scope.closed
    scope.close()


def test_diagnose_without_close_sees_losses_of_unrecorded_steps():
    # a loss that is NaN on an unrecorded step is found by diagnose() before any close()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, opt, every=10, live=False)
    for step in range(15):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss if step != 13 else loss * float("nan"))
    signs = [d.sign for d in scope.diagnose()]
    assert "loss-nonfinite" in signs
    scope.close()
    assert [d.sign for d in scope.diagnose()] == signs


RUN = textwrap.dedent("""
    import sys, torch, gradscope
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, opt, log_dir=sys.argv[1], live=False)
    for step in range(25):
        opt.zero_grad()
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)
    print(repr(loss.item()))
    if sys.argv[2] == "raise":
        raise RuntimeError("the training script failed")
""")


def _run(tmp_path: Path, how: str) -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "train.py"
    script.write_text(RUN)
    log_dir = tmp_path / how
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(log_dir), how], env=env,
                          capture_output=True, text=True, timeout=120)
    return done, log_dir


def test_a_run_that_ends_without_close_is_not_called_a_crash(tmp_path, capsys):
    done, log_dir = _run(tmp_path, "finish")
    assert done.returncode == 0, done.stderr
    log = read_log(log_dir)
    assert log.ended
    # every loss reached the log, the last one (step 24, not recorded at every=10) included
    assert [s for s, _ in log.losses] == list(range(25))
    # the log keeps float32 shortest digits: within two float32 roundings of the printed value
    assert log.losses[-1][1] == pytest.approx(float(done.stdout.strip()),
                                              rel=2 * UNIT_ROUNDOFF[torch.float32])
    assert main(["report", str(log_dir), "--width", "120"]) == 0
    out = capsys.readouterr().out
    assert "stopped early" not in out and "crash" not in out
    assert "25 steps, 3 recorded" in out


def test_a_run_ended_by_an_uncaught_exception_is_still_called_a_crash(tmp_path, capsys):
    done, log_dir = _run(tmp_path, "raise")
    assert done.returncode == 1 and "the training script failed" in done.stderr
    assert not read_log(log_dir).ended
    main(["report", str(log_dir), "--width", "120"])
    assert "stopped early" in capsys.readouterr().out
