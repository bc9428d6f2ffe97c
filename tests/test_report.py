"""The final report: golden text at a fixed width, plain text to files, colour on terminals."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from test_report_fixtures import (
    deep_diagnoses,
    deep_history,
    small_diagnoses,
    small_history,
)

import gradscope
from gradscope.report.summary import emit_report

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("GRADSCOPE_UPDATE_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"report differs from {path} (GRADSCOPE_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("width", [100, 72])
def test_report_with_findings_matches_golden(width):
    out = io.StringIO()
    text = emit_report(small_history(), small_diagnoses(), file=out, width=width,
                       rules_checked=13)
    assert out.getvalue() == text
    check_golden(f"report_findings_w{width}.txt", text)


def test_report_without_findings_matches_golden():
    text = emit_report(small_history(), [], file=io.StringIO(), width=100, rules_checked=13)
    check_golden("report_healthy_w100.txt", text)


def test_report_of_deep_model_folds_layers_golden():
    history = deep_history()
    text = emit_report(history, deep_diagnoses(history), file=io.StringIO(), width=100)
    check_golden("report_deep_w100.txt", text)
    assert "(+22 more)" in text  # 30 layers named: 8 shown


def test_report_orders_by_severity_and_shows_every_part():
    text = emit_report(small_history(), small_diagnoses(), file=io.StringIO(), width=100)
    lines = text.splitlines()
    assert lines[0] == "gradscope report"
    assert "40 steps, 8 recorded" in lines[1]
    assert "first 2.3 (step 0)" in text and "last 0.8451 (step 39)" in text
    heads = [line.split()[0] for line in lines if line.split()
             and line.split()[0] in ("ERROR", "WARNING", "INFO")]
    assert heads == ["ERROR", "WARNING", "INFO"]
    vanishing = text[text.index("ERROR"):text.index("WARNING")]
    assert vanishing.index("vanishing-gradients") < vanishing.index("saturated-activations")
    assert "vanishing-gradients   0.80 " in vanishing and "(2) embed, hidden" in vanishing
    assert "Add normalisation between layers" in vanishing
    assert "ratio 2.40e-06" in vanishing
    assert "1 error, 1 warning, 1 info" in text


def test_plain_text_has_no_colour_codes_or_trailing_spaces():
    text = emit_report(small_history(), small_diagnoses(), file=io.StringIO(), width=80)
    assert "\x1b[" not in text
    assert all(line == line.rstrip() for line in text.splitlines())
    assert max(len(line) for line in text.splitlines()) <= 80


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_colour_and_the_return_value_is_plain(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    text = emit_report(small_history(), small_diagnoses(), width=100)
    assert "\x1b[" in terminal.getvalue()
    assert "\x1b[" not in text
    assert text.splitlines()[0] == "gradscope report"


def test_scope_report_writes_file_and_returns_text():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, opt, every=2) as scope:
        for _ in range(6):
            opt.zero_grad()
            loss = model(torch.randn(8, 3)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    out = io.StringIO()
    text = scope.report(file=out, width=90)
    assert out.getvalue() == text
    assert "6 steps, 3 recorded · 2 layers" in text
    assert text == emit_report(scope.history, scope.diagnose(), file=io.StringIO(), width=90,
                               rules_checked=len(scope.engine.rules))


def test_report_without_any_loss_says_so():
    from gradscope.layout import ModelLayout

    history = gradscope.History(ModelLayout.of(torch.nn.Linear(2, 2)))
    text = emit_report(history, [], file=io.StringIO(), width=100)
    assert "loss  not recorded" in text
    assert "No problems found: 0 recorded steps checked." in text
