"""Sample outputs shown in the docs are the real ones: each shown piece of docs/cli.md's
report sample appears, line for line, in the report the documented commands print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _run(command: str, cwd: Path) -> str:
    """Run a documented `gradscope ...` command as a user would (a fresh process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", "gradscope", *command.split()[1:]], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    return done.stdout


def _sample(text: str, command: str) -> list[list[str]]:
    """The lines printed after `$ command` in a code block, cut into pieces at '...'."""
    block = text[text.index(f"$ {command}\n") + len(command) + 3:]
    block = block[: block.index("```")]
    pieces: list[list[str]] = [[]]
    for line in block.splitlines():
        if line.strip() == "...":
            pieces.append([])
        else:
            pieces[-1].append(line.rstrip())
    return [p for p in pieces if p]


@pytest.mark.slow
def test_cli_report_sample_matches_the_real_report(tmp_path):
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    demo = re.search(r"\$ (gradscope demo dead-relu [^\n]*?) > /dev/null", text).group(1)
    _run(demo, tmp_path)
    command = "gradscope report runs/dead --width 96"
    out = [line.rstrip() for line in _run(command, tmp_path).splitlines()]
    position = 0
    for piece in _sample(text, command):
        found = next((i for i in range(position, len(out) - len(piece) + 1)
                      if out[i:i + len(piece)] == piece), None)
        assert found is not None, "docs/cli.md shows lines the report does not print:\n" + \
            "\n".join(piece)
        position = found + len(piece)


PANEL = """
import io, sys, tempfile
from gradscope.demo import run_demo
from gradscope.report.live import panel
from gradscope.report.summary import render_text
scope, _ = run_demo("vanishing", out=tempfile.mkdtemp() + "/v.png", live=False,
                    file=io.StringIO())
sys.stdout.write(render_text(panel(scope.history, scope.diagnose(), width=100), 100))
"""


@pytest.mark.slow
def test_signals_live_panel_sample_is_the_real_panel(tmp_path):
    text = (DOCS / "signals.md").read_text(encoding="utf-8")
    intro = "`gradscope demo` (the vanishing scenario) at its last step:\n\n```\n"
    shown = text[text.index(intro) + len(intro):]
    shown = shown[: shown.index("```")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", PANEL], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert shown == done.stdout
