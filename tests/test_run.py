"""`gradscope run`: unmodified scripts are watched, trained bit for bit as without it, diagnosed
as with watch(), and exit as they would."""

from __future__ import annotations

import ast
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradscope.autorun.command import split_argv
from gradscope.runlog import read_log

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "run_scripts"
PLAIN = SCRIPTS / "plain_loop.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADSCOPE_FAST="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def python(*args: str | Path, cwd: Path | None = None,
           timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=timeout)


def gradscope_run(*args: str | Path, cwd: Path | None = None,
                  timeout: float = 240) -> subprocess.CompletedProcess:
    return python("-m", "gradscope", "run", "--no-live", *args, cwd=cwd, timeout=timeout)


def run_here(capsys, script: Path | str, *args: Any, **options: Any) -> tuple[int, str, str]:
    """`gradscope run` in this process (much faster than a new interpreter per run)."""
    from gradscope.autorun import run

    options.setdefault("live", False)
    code = run(str(script), [str(a) for a in args], **options)
    out = capsys.readouterr()
    return code, out.out, out.err


def plain_here(script: Path, *args: Any) -> int:
    """The script as `python script args...` runs it, in this process, without gradscope."""
    saved = sys.argv[:]
    sys.argv = [str(script), *map(str, args)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = saved
    return 0


def _diagnoses(log_dir: Path) -> list[tuple]:
    return [(d.sign, d.severity, d.cause, tuple(d.layers), d.first_step)
            for d in read_log(log_dir).logged_diagnoses()]


def _records(log_dir: Path) -> list:
    return read_log(log_dir).history().records()


def _same_weights(a: Path, b: Path) -> None:
    left, right = torch.load(a), torch.load(b)
    assert left.keys() == right.keys()
    for key, value in left.items():
        if isinstance(value, dict):
            assert all(torch.equal(value[k], right[key][k]) for k in value), key
        else:
            assert torch.equal(value, right[key]), key


def strip_gradscope(source: str) -> str:
    """An example with every gradscope line taken out: the script a user has before adding it."""
    tree = ast.parse(source)
    lines: list[str | None] = list(source.splitlines())
    doc = tree.body[0]
    if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
        for i in range(doc.lineno - 1, doc.end_lineno or doc.lineno):
            lines[i] = None
        lines[doc.lineno - 1] = '"""A training script."""'
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in lines:
        if line is None:
            continue
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if line.strip() and indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        block = re.match(r"(\s*)with gradscope\.watch\(.*\) as scope:", line)
        if block:
            out.append(block.group(1) + "if True:")
            continue
        line = line.replace("callbacks=[callback],", "").replace("callbacks=[callback])", ")")
        if re.search(r"import gradscope|from gradscope|gradscope\.|\bscope\b|callback|"
                     r"TensorBoardExporter|\bcommand\b", line):
            if line.rstrip().endswith(":"):
                skip_deeper_than = indent
            continue
        out.append(line)
    stripped = "\n".join(out) + "\n"
    assert "import gradscope" not in stripped and "scope." not in stripped
    return stripped


def _example_copy(name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(strip_gradscope((ROOT / "examples" / f"{name}.py").read_text()))
    return path


# ------------------------------------------------------------------ examples, unmodified
def _report(stdout: str) -> str:
    """The report block of an example's output (what follows it is the example's own)."""
    text = stdout[stdout.index("gradscope report"):]
    return text.split("figure saved")[0].split("TensorBoard logs")[0].strip()


@pytest.mark.parametrize("name, every, sign", [
    ("quickstart", "5", "lr-too-low"),
    ("cnn_live", "2", "units-dead"),
    # 8 sigmoid layers: in the 40 steps of --fast the loss does not go down (first-layer
    # gradients ~1e-7 of the last's)
    ("tensorboard_example", "5", "loss-flat"),
])
def test_example_copies_get_the_report_watch_gives(tmp_path, capsys, monkeypatch, name,
                                                   every, sign):
    """Each example, with its gradscope lines removed, under `gradscope run --every N` (its
    watch() setting): the same report, word for word, as the example prints itself."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    assert plain_here(ROOT / "examples" / f"{name}.py", "--fast") == 0
    report = _report(capsys.readouterr().out)
    script = _example_copy(name, tmp_path)
    code, out, err = run_here(capsys, script, "--fast", every=int(every),
                              plot=tmp_path / "run.png")
    assert code == 0, err
    assert sign in report
    assert report in out
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_transformer_example_copy(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    script = _example_copy("transformer_log", tmp_path)
    code, out, err = run_here(capsys, script, "--fast", "--log-dir", tmp_path / "own", every=5)
    assert code == 0, err
    assert "No problems found" in out
    assert re.search(r"\b30 steps, 6 recorded · \d+ layers", out)


def test_lightning_example_without_its_callback(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    assert plain_here(ROOT / "examples" / "lightning_example.py", "--fast") == 0
    original = capsys.readouterr().out
    script = _example_copy("lightning_example", tmp_path)
    code, out, err = run_here(capsys, script, "--fast", every=5)
    assert code == 0, err
    # the example's bug: the encoder is detached from the loss, found with no callback
    assert "grad-none" in out and "encoder.0" in out
    assert "20 steps, 4 recorded" in out  # max_steps=20 with accumulate_grad_batches=2
    report = original[original.index("gradscope report"):]
    report = report[:report.index("\nwarning:")]
    assert report in out  # word for word the report of the example's GradscopeCallback


def test_hf_trainer_example_without_its_callback(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    assert plain_here(ROOT / "examples" / "hf_trainer_example.py", "--fast") == 0
    original = capsys.readouterr().out
    script = _example_copy("hf_trainer_example", tmp_path)
    code, out, err = run_here(capsys, script, "--fast", every=2)
    assert code == 0, err
    # max_steps=12 with gradient_accumulation_steps=2: one gradscope step per optimizer step
    assert "12 steps, 6 recorded" in out
    report = original[original.index("gradscope report"):]
    report = report[:report.index("\nwarning:")]
    assert "params-frozen" in report and report in out


# ------------------------------------------------------------------ same diagnosis as watch()
@pytest.mark.parametrize("bug, sign, steps", [
    ("no-zero-grad", "grad-accumulating", "20"),
    ("lr-low", "loss-flat", "120"),
    ("detach", "grad-none", "20"),
])
def test_injected_bug_gets_the_diagnosis_watch_gives(tmp_path, capsys, bug, sign, steps):
    assert plain_here(PLAIN, "--bug", bug, "--watch", tmp_path / "ref", "--steps", steps) == 0
    code, _, err = run_here(capsys, PLAIN, "--bug", bug, "--steps", steps, every=5,
                            log_dir=tmp_path / "run")
    assert code == 0, err
    expected = _diagnoses(tmp_path / "ref")
    assert sign in {d[0] for d in expected}
    assert _diagnoses(tmp_path / "run") == expected
    ref_records, run_records = _records(tmp_path / "ref"), _records(tmp_path / "run")
    assert [r.step for r in run_records] == [r.step for r in ref_records]
    for a, b in zip(ref_records, run_records):
        np.testing.assert_array_equal(a.grad_norm, b.grad_norm)
        np.testing.assert_array_equal(a.update_ratio, b.update_ratio)
        assert a.loss == b.loss and a.backward_count == b.backward_count
        assert a.activations.keys() == b.activations.keys()
        for name, stats in a.activations.items():
            assert stats.dead_frac == b.activations[name].dead_frac, name


def test_accumulation_amp_is_one_step_per_optimizer_step_and_bit_identical(tmp_path, capsys):
    args = ["--accum", "3", "--amp", "--steps", "12"]
    assert plain_here(PLAIN, *args, "--save", tmp_path / "plain.pt") == 0
    assert plain_here(PLAIN, *args, "--watch", tmp_path / "ref", "--every", "1") == 0
    code, _, err = run_here(capsys, PLAIN, *args, "--save", tmp_path / "run.pt", every=1,
                            log_dir=tmp_path / "run")
    assert code == 0, err
    _same_weights(tmp_path / "plain.pt", tmp_path / "run.pt")
    records = _records(tmp_path / "run")
    assert [r.backward_count for r in records] == [3] * 12
    ref_records = _records(tmp_path / "ref")
    # the loss is the unscaled one: the sum of the micro-batch losses, as the reference gives
    np.testing.assert_array_equal([r.loss for r in records], [r.loss for r in ref_records])
    assert all(1.0 < r.loss < 2.0 for r in records)
    for a, b in zip(ref_records, records):
        np.testing.assert_array_equal(a.grad_norm, b.grad_norm)
    assert _diagnoses(tmp_path / "run") == _diagnoses(tmp_path / "ref")


def test_steps_the_grad_scaler_skips_are_recorded_as_skipped(tmp_path, capsys):
    # step 4's gradients overflow: the scaler skips that step, as AMP does
    args = ["--amp", "--overflow-at", "4", "--steps", "10"]
    assert plain_here(PLAIN, *args, "--watch", tmp_path / "ref", "--every", "1") == 0
    code, _, err = run_here(capsys, PLAIN, *args, every=1, log_dir=tmp_path / "run")
    assert code == 0, err
    ref_records, records = _records(tmp_path / "ref"), _records(tmp_path / "run")
    assert len(records) == 10
    assert [r.skipped for r in records] == [r.skipped for r in ref_records]
    assert [r.skipped for r in records] == [i == 4 for i in range(10)]
    np.testing.assert_array_equal([r.loss for r in records], [r.loss for r in ref_records])
    assert _diagnoses(tmp_path / "run") == _diagnoses(tmp_path / "ref")


def test_gan_with_two_optimizers(tmp_path, capsys):
    gan = SCRIPTS / "gan.py"
    assert plain_here(gan, "--save", tmp_path / "plain.pt") == 0
    assert plain_here(gan, "--watch", tmp_path / "ref") == 0
    code, _, err = run_here(capsys, gan, "--save", tmp_path / "run.pt", every=2,
                            log_dir=tmp_path / "run")
    assert code == 0, err
    _same_weights(tmp_path / "plain.pt", tmp_path / "run.pt")
    ref_records, run_records = _records(tmp_path / "ref"), _records(tmp_path / "run")
    # one gradscope step per round of both optimizers, the models named as in the script
    assert [r.step for r in run_records] == list(range(0, 24, 2))
    assert read_log(tmp_path / "run").layout.param_names == \
        read_log(tmp_path / "ref").layout.param_names
    for a, b in zip(ref_records, run_records):
        np.testing.assert_array_equal(a.grad_norm, b.grad_norm)
        np.testing.assert_array_equal(a.update_ratio, b.update_ratio)
        assert a.loss == b.loss
    assert _diagnoses(tmp_path / "run") == _diagnoses(tmp_path / "ref")


# ------------------------------------------------------------------ endings and exit codes
def test_a_script_that_raises_shows_its_traceback_and_the_report(tmp_path):
    done = gradscope_run(PLAIN, "--raise-at", "7")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    start = lines.index("Traceback (most recent call last):")
    assert str(PLAIN) in lines[start + 1]  # the script's own frames, gradscope's are left out
    assert "gradscope" not in "\n".join(lines[start:]).replace(str(PLAIN), "")
    assert lines[-1] == "RuntimeError: data loader broke at step 7"
    assert "7 steps" in done.stdout and "gradscope report" in done.stdout


@pytest.mark.parametrize("ending, code", [
    (["--exit", "0"], 0), (["--exit", "3"], 3), (["--exit", "stopped early"], 1),
    (["--interrupt-at", "4"], 130),
])
def test_exit_codes_pass_through(capsys, ending, code):
    got, out, err = run_here(capsys, PLAIN, "--steps", "8", *ending)
    assert got == code, err
    assert "gradscope report" in out
    if ending[-1] == "stopped early":
        assert err.strip().endswith("stopped early")
    if code == 130:
        assert "KeyboardInterrupt" in err and "4 steps" in out


def test_fail_on_gates_a_clean_exit(capsys):
    args = [PLAIN, "--bug", "detach", "--steps", "20"]  # grad-none, a warning
    assert run_here(capsys, *args, fail_on="warning", every=5)[0] == 1
    assert run_here(capsys, *args, fail_on="error", every=5)[0] == 0
    # the script's own failure wins over --fail-on
    assert run_here(capsys, *args, "--exit", "4", fail_on="warning", every=5)[0] == 4
    # and the command line gets there too
    done = gradscope_run("--every", "5", "--fail-on", "warning", *args)
    assert done.returncode == 1 and "grad-none" in done.stdout


def test_nothing_to_watch_says_so_and_runs_untouched(tmp_path, capsys):
    script = tmp_path / "no_optimizer.py"
    script.write_text("import sys, torch\nprint(torch.nn.Linear(2, 1)(torch.ones(1, 2)).shape,"
                      " sys.argv[1:])\nsys.exit(5)\n")
    code, out, err = run_here(capsys, script, "a", "--b")
    assert code == 5
    assert out.strip() == "torch.Size([1, 1]) ['a', '--b']"
    message = [line for line in err.splitlines() if line.startswith("gradscope:")]
    assert len(message) == 1 and "no torch optimizer" in message[0]


def test_a_script_that_watches_itself_keeps_its_own_scope(tmp_path, capsys):
    script = tmp_path / "watched.py"
    script.write_text(
        "import torch, gradscope\nmodel = torch.nn.Linear(3, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), 0.1)\n"
        "scope = gradscope.watch(model, opt, every=1)\n"
        "for _ in range(4):\n"
        "    opt.zero_grad(); loss = model(torch.randn(4, 3)).pow(2).mean()\n"
        "    loss.backward(); opt.step(); scope.step(loss)\n"
        "scope.close(); print('own scope', scope.history.total_recorded)\n")
    code, out, err = run_here(capsys, script)
    assert code == 0, err
    assert out.strip() == "own scope 4"
    assert "already watched" in err and "ran untouched" in err


def test_module_mode_and_bad_usage(tmp_path, capsys, monkeypatch):
    from gradscope.cli import main

    package = tmp_path / "pkg_run_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(PLAIN.read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--no-live", "-m", "pkg_run_test.train", "--steps", "6"]) == 0
    assert "6 steps" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    assert "there is no script" in capsys.readouterr().err
    assert main(["run"]) == 2
    assert main(["run", "--plot", "x.txt", str(PLAIN)]) == 2
    # after the module, even gradscope's own option names belong to the script
    assert main(["run", "--no-live", "-m", "pkg_run_test.train", "--steps", "3", "--every",
                 "1"]) == 0
    assert "3 steps, 1 recorded" in capsys.readouterr().out


def test_help_shows_an_example():
    done = python("-m", "gradscope", "run", "--help")
    assert done.returncode == 0
    assert "gradscope run train.py" in done.stdout and "-m MODULE" in done.stdout


def test_split_argv_leaves_the_script_arguments_alone():
    assert split_argv(["--no-live", "t.py", "--no-live", "-m", "x"]) == \
        (["--no-live", "t.py"], ["--no-live", "-m", "x"])
    assert split_argv(["--plot", "a.png", "-m", "pkg.mod", "--every", "3"]) == \
        (["--plot", "a.png", "-m", "pkg.mod"], ["--every", "3"])


def test_nothing_of_it_remains_after_the_script(tmp_path):
    from gradscope.autorun import run

    torch_state = (torch.optim.Optimizer.__init__, torch.autograd.backward,
                   torch.amp.GradScaler.scale, torch.amp.GradScaler.update)
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\nmodel = torch.nn.Linear(3, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), 0.1)\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); model(torch.randn(4, 3)).pow(2).mean().backward(); opt.step()\n"
        "MODEL = model\n")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert run(str(script), live=False, every=1) == 0
    assert "3 steps, 3 recorded" in out.getvalue()
    after = (torch.optim.Optimizer.__init__, torch.autograd.backward,
             torch.amp.GradScaler.scale, torch.amp.GradScaler.update)
    assert after == torch_state
    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks

    assert not module_hooks._global_forward_pre_hooks
    assert not module_hooks._global_forward_hooks
    assert not optimizer_hooks._global_optimizer_pre_hooks
    assert not optimizer_hooks._global_optimizer_post_hooks


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    done = python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "gradscope", "run", "--no-live", "--every", "5",
                  "--log-dir", tmp_path / "log", SCRIPTS / "ddp.py", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("gradscope report") == 1  # rank 0 reports, rank 1 stays quiet
    assert "ranks 2 done" in done.stdout
    assert "grad-accumulating" in done.stdout and "missing-zero-grad" in done.stdout
    records = _records(tmp_path / "log")
    assert [r.step for r in records] == list(range(0, 30, 5)) and all(r.stepped for r in records)
