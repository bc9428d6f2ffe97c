"""The examples run (in fast mode) and say what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "GRADSCOPE_FAST": "1"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), "--fast", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_quickstart_reports_the_learning_rate(tmp_path):
    done = run_example("quickstart.py", "--plot", str(tmp_path / "q.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gradscope report")
    assert "loss-flat" in done.stdout and "lr-too-low" in done.stdout
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_cnn_live_prints_findings_as_lines_off_a_terminal(tmp_path):
    done = run_example("cnn_live.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # not a terminal: no panel, one plain line per finding, then the report
    assert not any("╭" in line for line in lines)
    live = [line for line in lines if line.startswith("gradscope step ")]
    assert any("units-dead" in line for line in live)
    assert "gradscope report" in lines


@pytest.mark.slow
def test_transformer_log_runs_the_report_command(tmp_path):
    pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
    log_dir = tmp_path / "gpt2"
    done = run_example("transformer_log.py", "--log-dir", str(log_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"run log written to {log_dir}" in done.stdout
    assert "gradscope report" in done.stdout
    assert "15 layers" in done.stdout  # 2 blocks of GPT-2: the log's layout was read back
    assert (log_dir / "gradscope.jsonl").exists()


@pytest.mark.parametrize("name, missing, extra", [
    ("transformer_log.py", "transformers", "transformers"),
    ("hf_trainer_example.py", "transformers", "transformers"),
    ("hf_trainer_example.py", "accelerate", "transformers"),
    ("lightning_example.py", "lightning", "lightning"),
    ("tensorboard_example.py", "tensorboard", "tensorboard"),
])
def test_example_without_its_optional_package_names_the_extra(tmp_path, name, missing, extra):
    # None in sys.modules makes `import missing` fail as if the package were not installed
    code = (f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = [{name!r}]; "
            f"runpy.run_path({str(ROOT / 'examples' / name)!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[-1]] and "Traceback" not in done.stderr  # one sentence, no traceback
    assert f"pip install -e '.[{extra}]'" in lines[-1] and missing in lines[-1]


def test_checkup_example_finds_the_three_bugs_then_passes(tmp_path):
    done = run_example("checkup_example.py", "--plot", str(tmp_path / "ck.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gradscope checkup")
    report = done.stdout.split("after the fixes:")[0]
    for sign, cause in (("grad-none", "detached-graph"), ("data-suspect", "data-scale"),
                        ("loss-flat", "lr-too-low")):
        assert sign in report and cause in report, (sign, cause)
    assert "after the fixes: no problems found" in done.stdout
    assert (tmp_path / "ck.png").stat().st_size > 20_000
