"""The `gradscope` command: demo scenarios, report/plot of saved logs, rules, exit codes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_report_fixtures import small_diagnoses, small_history

from gradscope.cli import main
from gradscope.demo import SCENARIOS, build, run_demo
from gradscope.rules.engine import builtin_rules
from gradscope.runlog import LOG_NAME, RunLogWriter

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "gradscope", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def write_logged_run(directory: Path) -> Path:
    """A finished run log with hand-made records and diagnosis events (one is an error)."""
    source = small_history()
    writer = RunLogWriter(directory, source.layout, {"every": 5}, history=source)
    diagnoses = small_diagnoses()
    for i, record in enumerate(source.records()):
        writer.on_record(record, diagnoses if i == 4 else [])
    writer.close()
    return directory


# --------------------------------------------------------------------------- demo scenarios
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_demo_scenarios_find_what_they_break(tmp_path, name):
    scenario = SCENARIOS[name]
    out = io.StringIO()
    scope, path = run_demo(name, out=tmp_path / f"{name}.png", live=False, file=out)
    signs = {d.sign for d in scope.diagnose()}
    serious = {d.sign for d in scope.diagnose() if d.severity in ("warning", "error")}
    if scenario.expects:
        assert signs & set(scenario.expects), (name, signs)
    else:
        assert serious == set(), (name, serious)
    assert path.exists() and path.stat().st_size > 10_000
    assert out.getvalue().startswith("gradscope report")


def test_scenario_builders_return_the_documented_tuple():
    for name in SCENARIOS:
        model, optimizer, batch_fn, loss_fn, kind = build(name)
        x, y = batch_fn(0)
        loss = loss_fn(model(x), y)
        assert loss.ndim == 0 and kind in ("standard", "no-zero-grad")
        assert any(p is q for g in optimizer.param_groups for p in g["params"]
                   for q in model.parameters())


def test_detached_scenario_leaves_side_branch_without_gradients():
    model, _optimizer, batch_fn, loss_fn, _ = build("detached")
    x, y = batch_fn(0)
    loss_fn(model(x), y).backward()
    assert all(p.grad is None for p in model.side.parameters())
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_demo_command_end_to_end(tmp_path):
    plot = tmp_path / "healthy.svg"
    done = run_cli("demo", "healthy", "--steps", "6", "--out", str(plot),
                   "--log-dir", str(tmp_path / "log"))
    assert done.returncode == 0, done.stderr
    assert "gradscope report" in done.stdout
    assert f"plot saved to {plot}" in done.stdout
    assert plot.exists() and (tmp_path / "log" / LOG_NAME).exists()


# --------------------------------------------------------------------------- report / plot
def test_report_of_a_logged_run_and_exit_codes(tmp_path, capsys):
    log_dir = write_logged_run(tmp_path)
    assert main(["report", str(log_dir), "--logged", "--width", "100"]) == 1  # has an error
    out = capsys.readouterr().out
    assert out.startswith("gradscope report") and "ERROR   grad-vanishing" in out
    assert main(["report", str(log_dir), "--logged", "--fail-on", "never"]) == 0
    capsys.readouterr()


def test_report_re_runs_the_rules(tmp_path, capsys):
    run_demo("exploding", steps=60, out=tmp_path / "e.png", live=False,
             log_dir=tmp_path / "log", file=io.StringIO())
    code = main(["report", str(tmp_path / "log"), "--width", "100"])
    out = capsys.readouterr().out
    assert code == 1  # loss-nonfinite is an error
    assert "loss-nonfinite" in out or "grad-exploding" in out
    assert main(["report", str(tmp_path / "log"), "--fail-on", "never"]) == 0
    capsys.readouterr()


def test_fail_on_warning(tmp_path, capsys):
    run_demo("detached", steps=6, out=tmp_path / "d.png", live=False,
             log_dir=tmp_path / "log", file=io.StringIO())
    assert main(["report", str(tmp_path / "log")]) == 0  # warnings only
    assert main(["report", str(tmp_path / "log"), "--fail-on", "warning"]) == 1
    capsys.readouterr()


def test_plot_command(tmp_path, capsys):
    log_dir = write_logged_run(tmp_path / "log")
    out = tmp_path / "grads.pdf"
    assert main(["plot", str(log_dir), "-o", str(out), "--step", "20"]) == 0
    assert out.read_bytes()[:4] == b"%PDF"
    assert f"plot saved to {out}" in capsys.readouterr().out


def test_rules_command_lists_every_rule(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for r in builtin_rules():
        assert r.id in out and r.sign in out
        for name in r.thresholds:
            assert f"{name}=" in out


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["report"], "the following arguments are required: LOG_DIR"),
    (["report", "/no/such/dir"], "does not exist"),
    (["report", "--fail-on", "sometimes", "x"], "invalid choice"),
    (["plot", "x"], "the following arguments are required: -o/--out"),
    (["demo", "no-such-scenario"], "invalid choice"),
    (["demo", "--steps", "0"], "must be at least 1"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_unreadable_log_and_bad_plot_name_exit_2(tmp_path, capsys):
    (tmp_path / LOG_NAME).write_text("this is not a log\n")
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no gradscope run log header" in capsys.readouterr().err
    log_dir = write_logged_run(tmp_path / "log")
    assert main(["plot", str(log_dir), "-o", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ".png, .svg, .pdf" in err


@pytest.mark.parametrize("command", [[], ["demo"], ["report"], ["plot"], ["rules"]])
def test_help_everywhere(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "usage: gradscope" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: gradscope" in capsys.readouterr().out


# --------------------------------------------------------------------------- killed run
KILLED_RUN = textwrap.dedent("""
    import sys, time, torch, gradscope
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, opt, every=2, log_dir=sys.argv[1])
    for step in range(100000):
        opt.zero_grad()
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)
        time.sleep(0.005)
""")


def test_report_reads_the_log_of_a_killed_run(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(KILLED_RUN)
    log_dir = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(script), str(log_dir)], env=env)
    try:
        deadline = time.monotonic() + 120
        path = log_dir / LOG_NAME
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().count('"type":"step"') >= 5:
                break
            assert child.poll() is None, "the training process ended early"
            time.sleep(0.05)
        else:
            pytest.fail("the training process wrote no steps in time")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    code = main(["report", str(log_dir), "--width", "120"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "stopped early" in out
    assert "recorded" in out.splitlines()[1]
    recorded = int(out.splitlines()[1].split(" recorded")[0].split()[-1])
    assert recorded >= 5
    assert main(["plot", str(log_dir), "-o", str(tmp_path / "killed.png")]) == 0
