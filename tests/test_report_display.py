"""What report() and plot() return and how they show themselves (IPython faked; the real kernel
is exercised in test_notebook.py)."""

from __future__ import annotations

import base64
import copy
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from rich.console import Console
from test_report_fixtures import small_diagnoses, small_history

import gradscope
from gradscope.report import display as display_module
from gradscope.report.display import Report, SavedPlot, rich_bundle
from gradscope.report.summary import emit_report


@pytest.fixture
def ipython(monkeypatch):
    """A fake IPython: the running cell's number and what display() received."""

    class Shell:
        def __init__(self):
            self.cell = 1
            self.shown: list[dict] = []

    shell = Shell()
    monkeypatch.setattr(display_module, "current_cell", lambda: shell.cell)
    monkeypatch.setattr("IPython.display.display",
                        lambda bundle, raw, **kw: shell.shown.append(bundle))
    return shell


def _scope(steps: int = 30) -> gradscope.Scope:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, opt, every=1) as scope:
        for _ in range(steps):
            opt.zero_grad()
            loss = model(torch.randn(16, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    return scope


def test_report_is_the_plain_text_for_code():
    scope = _scope()
    out = io.StringIO()
    report = scope.report(file=out, width=90)
    assert isinstance(report, str) and out.getvalue() == report
    assert report.splitlines()[0] == "gradscope report"
    assert report + "" == out.getvalue() and type(report + "") is str
    assert json.loads(json.dumps({"r": report}))["r"] == out.getvalue()
    for copied in (pickle.loads(pickle.dumps(report)), copy.deepcopy(report)):
        assert type(copied) is str and copied == out.getvalue()
    # at a prompt the text was printed already: the echo is one short line, not the text again
    assert repr(report) == (f"<gradscope report, {len(out.getvalue().splitlines())} lines: "
                            "print() it or str() it for the text>")


def test_report_renders_in_colour_through_rich():
    report = emit_report(small_history(), small_diagnoses(), file=io.StringIO(), width=100)
    terminal = io.StringIO()
    Console(file=terminal, width=100, force_terminal=True, color_system="standard").print(report)
    assert "\x1b[" in terminal.getvalue() and "units-dead" in terminal.getvalue()


def test_a_report_does_not_echo_in_its_cell_but_shows_in_a_later_one(ipython):
    report = emit_report(small_history(), small_diagnoses(), file=io.StringIO(), width=100)
    report._ipython_display_()  # the cell's last line: printed already, nothing more
    assert ipython.shown == []
    ipython.cell = 2
    report._ipython_display_()  # `report` on its own in a later cell
    (bundle,) = ipython.shown
    assert bundle["text/plain"] + "\n" == report
    assert "<span" in bundle["text/html"] and "units-dead" in bundle["text/html"]


def test_in_a_notebook_the_report_is_displayed_once_as_html_and_text(ipython, monkeypatch):
    monkeypatch.setattr("rich.console._is_jupyter", lambda: True)
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    report = emit_report(small_history(), small_diagnoses())
    assert stdout.getvalue() == ""
    (bundle,) = ipython.shown
    assert set(bundle) == {"text/plain", "text/html"}
    assert bundle["text/plain"] + "\n" == report
    assert report == emit_report(small_history(), small_diagnoses(), file=io.StringIO(),
                                 width=100)
    report._ipython_display_()  # the echo in the same cell is skipped
    assert len(ipython.shown) == 1


def test_rich_bundle_html_escapes_and_keeps_colour():
    bundle = rich_bundle("[red]a < b[/red]", 40)
    assert bundle["text/plain"] == "a < b"
    assert "a &lt; b" in bundle["text/html"] and "color" in bundle["text/html"]


def test_plot_without_a_path_returns_the_figure(tmp_path):
    scope = _scope()
    fig = scope.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 5
    fig.savefig(tmp_path / "later.png")
    assert (tmp_path / "later.png").stat().st_size > 10_000


def test_plot_with_a_path_returns_that_path(tmp_path):
    scope = _scope()
    path = scope.plot(tmp_path / "g.svg")
    assert isinstance(path, Path) and path == tmp_path / "g.svg"
    assert repr(path) == repr(Path(tmp_path / "g.svg"))
    assert path.read_text().startswith("<?xml")
    assert isinstance(path.parent, Path) and str(path.with_suffix(".png")).endswith("g.png")


def test_in_a_notebook_plot_shows_the_figure_once(ipython, monkeypatch, tmp_path):
    monkeypatch.setattr("gradscope.report.plots.in_notebook", lambda: True)
    scope = _scope()
    path = scope.plot(tmp_path / "g.png")
    (bundle,) = ipython.shown
    assert base64.b64decode(bundle["image/png"]) == path.read_bytes()  # the saved file itself
    path._ipython_display_()
    fig = scope.plot()
    assert len(ipython.shown) == 2 and ipython.shown[1]["image/png"].startswith("iVBORw0KGgo")
    fig._ipython_display_()
    assert len(ipython.shown) == 2
    ipython.cell = 2
    fig._ipython_display_()   # `fig` in a later cell shows it again
    path._ipython_display_()  # a path in a later cell shows as a path
    assert len(ipython.shown) == 4 and "image/png" in ipython.shown[2]
    assert ipython.shown[3] == {"text/plain": repr(Path(tmp_path / "g.png"))}


def test_plot_outside_a_notebook_displays_nothing(ipython, tmp_path):
    scope = _scope()
    scope.plot(tmp_path / "g.png")
    scope.plot()
    assert ipython.shown == []


def test_saved_plot_derived_paths_are_plain_in_display(ipython):
    path = SavedPlot("runs/g.png")
    path._mark_shown()
    path.parent._ipython_display_()  # never shown itself: displays as a path
    assert ipython.shown == [{"text/plain": repr(Path("runs"))}]


def test_report_on_a_terminal_does_not_echo_at_an_ipython_prompt(ipython, monkeypatch):
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    report = emit_report(small_history(), small_diagnoses(), width=100)
    assert "units-dead" in stdout.getvalue() and isinstance(report, Report)
    report._ipython_display_()
    assert ipython.shown == []
