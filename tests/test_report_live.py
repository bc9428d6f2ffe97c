"""The live view: panel content, folding of long models, refresh cap, plain lines off a TTY."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from rich.console import Console
from test_report_fixtures import (
    deep_diagnoses,
    deep_history,
    small_diagnoses,
    small_history,
)

import gradscope
from gradscope.report.live import LiveView, finding_line, panel, wants_live


def render(renderable, width: int = 100) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(renderable)
    return buffer.getvalue()


def test_panel_shows_step_loss_trend_findings_and_layers_in_model_order():
    history = small_history()
    text = render(panel(history, small_diagnoses(), width=110), width=110)
    assert "step 39" in text
    assert "loss 0.8451" in text
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")
    # most severe first
    assert text.index("ERROR") < text.index("WARNING") < text.index("INFO")
    assert "grad-vanishing" in text and "(likely vanishing-gradients)" in text
    rows = [line for line in text.splitlines() if line.startswith("│ ") and
            line.split()[1] in ("embed", "hidden", "out")]
    assert [row.split()[1] for row in rows] == ["embed", "hidden", "out"]
    # dead fraction of act1 (35/40 at step 35) is shown on its layer, 'embed'
    assert "88%" in rows[0]
    assert "25%" in rows[1]  # act2 saturation belongs to 'hidden'


def test_panel_values_match_the_record():
    history = small_history()
    record = history.last
    text = render(panel(history, []))
    grads = record.layer_grad_norm(history.layout)
    # the 'out' layer: L2 of (0.4, 0.1)
    assert abs(grads[2] - (0.4 ** 2 + 0.1 ** 2) ** 0.5) < 1e-12
    out_row = next(line for line in text.splitlines() if " out " in line)
    assert "0.41" in out_row
    assert "no problems so far" in text


def test_long_model_is_folded_to_top_offenders():
    history = deep_history()
    diagnoses = deep_diagnoses(history)
    text = render(panel(history, diagnoses, max_rows=12))
    layer_lines = [line for line in text.splitlines() if "blocks." in line or " head " in line]
    assert len(layer_lines) == 12
    assert "… 189 more layers" in text
    # diagnosed layers come first among the offenders; shown in model order
    indices = [int(line.split("blocks.")[1].split()[0]) for line in layer_lines
               if "blocks." in line]
    assert indices == sorted(indices)
    assert "blocks.0 " in text and " head " in text  # both ends, for scale
    assert "blocks.1 " in text


def test_refresh_is_capped_by_time():
    history = small_history()
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    view = LiveView(history, lambda: [], refresh_per_second=2, console=console,
                    panel_mode=True, clock=lambda: now[0])
    for i in range(50):
        now[0] = i * 0.05  # 20 records per second for 2.5 s
        view.on_record(history.last, [])
    view.on_close()
    # 2 per second over 2.5 s -> at most 6 renders during training, plus the final one
    assert 4 <= view.renders <= 7
    assert "gradscope" in console.file.getvalue()


def test_lines_mode_prints_one_line_per_new_or_changed_finding():
    history = small_history()
    out = io.StringIO()
    view = LiveView(history, lambda: [], console=Console(file=out, width=200))
    assert view.mode == "lines"
    d = small_diagnoses()
    view.on_record(history.last, [d[0]])
    view.on_record(history.last, [])
    view.on_record(history.last, [d[0], d[1]])
    view.on_close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0] == ("gradscope step 35: WARNING units-dead - Units never activate "
                        "(likely dead-units) [act1]")
    assert lines[1].endswith("(updated)")
    assert "ERROR grad-vanishing" in lines[2] and "[embed, hidden]" in lines[2]


def test_finding_line_is_short_and_plain():
    line = finding_line(small_diagnoses()[1], 7, True)
    assert "\n" not in line and "\x1b" not in line and len(line) < 160


def test_wants_live_modes():
    pipe = io.StringIO()
    assert wants_live(False, pipe) == (False, False)
    assert wants_live("auto", pipe) == (False, False)
    assert wants_live(True, pipe) == (True, False)


def _train(scope, model, opt, steps=4):
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(8, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)


def test_live_false_prints_nothing(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, live=False, every=1) as scope:
        _train(scope, model, opt)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_live_true_off_a_terminal_prints_plain_lines(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, live=True, every=1) as scope:
        # a finding that appears when the rules run at step 9 (they run once per 10 steps at
        # every=1; the rules themselves are tested elsewhere)
        scope.engine.update = lambda history, unseen=1: (
            [gradscope.Diagnosis("grad-none", "warning", "Gradients are None", rule="x")]
            if history.last.step == 9 else [])
        _train(scope, model, opt, steps=12)
    out = capsys.readouterr().out
    assert out == "gradscope step 9: WARNING grad-none - Gradients are None\n"
    assert "\x1b" not in out and "╭" not in out


def test_live_auto_off_a_terminal_prints_nothing(capsys):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, live="auto", every=1) as scope:
        _train(scope, torch.nn.Sequential(model), opt)
    assert capsys.readouterr().out == ""


def test_jupyter_redraws_one_output_area_in_place_and_ends_on_the_final_panel(monkeypatch):
    calls = []

    class Handle:
        def update(self, bundle, raw):
            calls.append(("update", bundle["text/plain"]))

    def display(bundle, raw, display_id=False):
        assert raw and display_id
        calls.append(("display", bundle["text/plain"]))
        return Handle()

    monkeypatch.setattr("IPython.display.display", display)
    clock = [0.0]
    history = small_history()
    view = LiveView(history, small_diagnoses, refresh_per_second=2, clock=lambda: clock[0],
                    console=Console(file=io.StringIO(), force_jupyter=True, width=115))
    assert view.mode == "notebook"
    for t in (0.0, 0.1, 0.2, 0.6, 0.7):  # a 0.5 s cap: renders at 0.0 and 0.6 only
        clock[0] = t
        view.on_record(history.last, [])
    view.on_close()
    assert [kind for kind, _ in calls] == ["display", "update", "update"]
    final = calls[-1][1]
    assert final.count("╭─ gradscope") == 1 and "step 39" in final and "units-dead" in final
    assert view.console.file.getvalue() == ""  # nothing printed beside the output area


def test_jupyter_panel_opens_anew_in_the_next_training_cell_and_closes_in_place(monkeypatch):
    calls = []

    class Handle:
        def __init__(self, n):
            self.n = n

        def update(self, bundle, raw):
            calls.append(("update", self.n))

    def display(bundle, raw, display_id=False):
        calls.append(("display", len(calls)))
        return Handle(len(calls) - 1)

    cell = [5]
    monkeypatch.setattr("IPython.display.display", display)
    monkeypatch.setattr("gradscope.report.display.current_cell", lambda: cell[0])
    history = small_history()
    view = LiveView(history, small_diagnoses, refresh_per_second=1000,
                    console=Console(file=io.StringIO(), force_jupyter=True))
    view.on_record(history.last, [])
    view._last = -1e9
    view.on_record(history.last, [])
    cell[0] = 6  # the training loop's cell run again: its old outputs are gone
    view._last = -1e9
    view.on_record(history.last, [])
    cell[0] = 7  # scope.close() in a later cell: the final panel replaces the last one
    view.on_close()
    assert calls == [("display", 0), ("update", 0), ("display", 2), ("update", 2)]


def test_a_failing_render_gives_the_terminal_back():
    history = small_history()
    calls = []

    def diagnoses():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return []

    stdout = sys.stdout
    view = LiveView(history, diagnoses, refresh_per_second=1000, panel_mode=True,
                    console=Console(file=io.StringIO(), force_terminal=True, width=100))
    view.on_record(history.last, [])
    assert sys.stdout is not stdout  # the live display redirects output above the panel
    view._last = -1e9
    with pytest.raises(RuntimeError):
        view.on_record(history.last, [])
    assert sys.stdout is stdout and view._live is None
