"""The final report: the run in numbers, then each diagnosis with its causes, layers and checks."""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from ..diagnosis import Diagnosis
from ..history import History
from .display import Report, show_report
from .readings import (
    fmt,
    fold_list,
    loss_summary,
    severity_sorted,
    total_steps,
    unmeasured_signals,
)

SEVERITY_STYLE = {"error": "bold red", "warning": "bold yellow", "info": "bold cyan"}
DEFAULT_WIDTH = 100


def _evidence_text(evidence: dict[str, Any], limit: int = 8) -> str:
    parts = []
    for key, value in list(evidence.items())[:limit]:
        if isinstance(value, bool) or value is None:
            shown = str(value)
        elif isinstance(value, (int, float)):
            shown = fmt(value) if isinstance(value, float) else str(value)
        elif isinstance(value, (list, tuple)):
            items = [fmt(v) if isinstance(v, float) else str(v) for v in value[:6]]
            shown = "[" + ", ".join(items) + (", …" if len(value) > 6 else "") + "]"
        else:
            shown = str(value)
        parts.append(f"{key} {shown}")
    if len(evidence) > limit:
        parts.append(f"(+{len(evidence) - limit} more)")
    return " · ".join(parts)


def _steps_text(d: Diagnosis) -> str:
    if d.first_step == d.last_step:
        return f"step {d.first_step}"
    return f"steps {d.first_step}-{d.last_step}"


def _bullets(items: Sequence[Text | str], marker: str = "-") -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for item in items:
        grid.add_row(marker, item)
    return grid


def diagnosis_block(d: Diagnosis) -> RenderableType:
    """One diagnosis: severity, sign and title, then causes, layers, evidence and checks."""
    head = Text()
    head.append(f"{d.severity.upper():<7}", style=SEVERITY_STYLE.get(d.severity, "bold"))
    head.append(" ")
    head.append(d.sign, style="bold")
    head.append(f" · {d.title}")
    head.append(f" · {_steps_text(d)}", style="dim")
    body: list[RenderableType] = []
    if d.summary:
        body.append(Text(d.summary))
    if d.causes:
        body.append(Text.assemble(("Likely causes", "bold"), (" (score)", "dim")))
        rows = Table.grid(padding=(0, 1))
        rows.add_column(justify="right", no_wrap=True)
        rows.add_column(no_wrap=True)
        rows.add_column(justify="right", no_wrap=True)
        rows.add_column(overflow="fold")
        for rank, cause in enumerate(d.causes, 1):
            rows.add_row(f"{rank}.", Text(cause.id, style="bold" if rank == 1 else ""),
                         f"{cause.likelihood:.2f}", Text(cause.evidence, style="dim"))
        body.append(Padding(rows, (0, 0, 0, 2)))
    facts = Table.grid(padding=(0, 1))
    facts.add_column(no_wrap=True, style="bold")
    facts.add_column(overflow="fold")
    if d.layers:
        facts.add_row("Layers", f"({len(d.layers)}) {fold_list(d.layers)}")
    if d.evidence:
        facts.add_row("Evidence", _evidence_text(d.evidence))
    if facts.row_count:
        body.append(facts)
    if d.checks:
        body.append(Text("Check", style="bold"))
        body.append(Padding(_bullets(d.checks), (0, 0, 0, 2)))
    return Group(head, Padding(Group(*body), (0, 0, 0, 2)))


def report_renderable(history: History, diagnoses: Sequence[Diagnosis], *,
                      rules_checked: int | None = None,
                      notes: Sequence[str] = ()) -> RenderableType:
    """The whole report as one rich renderable (terminal or plain text alike)."""
    layout = history.layout
    steps = total_steps(history)
    parts: list[RenderableType] = [Text("gradscope report", style="bold underline")]
    numel = sum(p.numel for p in layout.params)
    parts.append(Text(
        f"{steps} steps, {history.total_recorded} recorded · {len(layout.layers)} layers · "
        f"{len(layout.params)} parameter tensors ({numel:,} values)"))
    losses = loss_summary(history)
    if losses["first"] is None:
        parts.append(Text("loss  not recorded (pass the loss to scope.step(loss))", style="dim"))
    else:
        line = Text("loss  ")
        nonfinite = losses.get("first non-finite")
        labels = ("first", "last finite", "best") if nonfinite else ("first", "last", "best")
        for label in labels:
            item = losses.get(label)
            if item is None:
                continue
            step, value = item
            shown = fmt(value, 4) if math.isfinite(value) else str(value)
            line.append(f"{label} ", style="bold")
            line.append(f"{shown} (step {step})   ")
        line.rstrip()
        parts.append(line)
        if nonfinite:
            more = Text("      ")
            more.append(f"non-finite from step {nonfinite[0]}", style="bold red")
            more.append(f" · last step {steps - 1}")
            parts.append(more)
    for note in notes:
        parts.append(Text(note, style="dim"))
    for missing in unmeasured_signals(history):
        parts.append(Text(f"not measured  {missing}", style="dim"))
    parts.append(Text(""))
    ordered = severity_sorted(diagnoses)
    if not ordered:
        checked = f" by {rules_checked} rules" if rules_checked is not None else ""
        parts.append(Text(f"No problems found: {history.total_recorded} recorded steps "
                          f"checked{checked}.", style="bold green"))
        return Group(*parts)
    parts += findings_blocks(ordered)
    return Group(*parts)


def findings_blocks(found: Sequence[Diagnosis]) -> list[RenderableType]:
    """The count of findings by severity, then one block per finding, in the given order.

    Example:
        >>> from gradscope.diagnosis import Diagnosis
        >>> d = Diagnosis(sign="loss-flat", severity="warning", title="Loss is flat")
        >>> str(findings_blocks([d])[0])
        '1 finding: 1 warning'
    """
    counts: dict[str, int] = {}
    for d in found:
        counts[d.severity] = counts.get(d.severity, 0) + 1
    summary = ", ".join(f"{counts[s]} {s}{'s' if counts[s] > 1 else ''}"
                        for s in ("error", "warning", "info") if s in counts)
    blocks: list[RenderableType] = [
        Text(f"{len(found)} finding{'s' if len(found) > 1 else ''}: {summary}", style="bold")]
    for d in found:
        blocks += [Text(""), diagnosis_block(d)]
    return blocks


def render_text(renderable: RenderableType, width: int = DEFAULT_WIDTH) -> str:
    """Render to plain text at a fixed width (no colour, no trailing spaces)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False,
                      force_jupyter=False, legacy_windows=False, soft_wrap=False,
                      emoji=False, highlight=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def emit(renderable: RenderableType, *, file: IO[str] | None = None,
         width: int | None = None) -> Report:
    """Print a report-like renderable where reports go and return its plain text.

    On a terminal: in colour. In Jupyter: displayed once, as HTML with its plain text (the
    returned `Report` does not display it again in the same cell). To `file`, or when standard
    output is a pipe: plain text at `width` (default 100 columns). Every report (the scope's,
    the checkup's, the CLI's) goes through here, so they behave alike.

    Example:
        >>> import io
        >>> buffer = io.StringIO()
        >>> text = emit("gradscope report", file=buffer)
        >>> text == buffer.getvalue() == "gradscope report\\n"
        True
    """
    target = file if file is not None else sys.stdout
    console = Console(file=target, width=width, highlight=False, emoji=False)
    if file is None and console.is_jupyter:
        return show_report(renderable, width or DEFAULT_WIDTH)
    if file is None and console.is_terminal:
        console.print(renderable)
        width = width or console.width
        report = Report(render_text(renderable, width), renderable, width)
    else:
        width = width or DEFAULT_WIDTH
        report = Report(render_text(renderable, width), renderable, width)
        target.write(report)
        target.flush()
    report._mark_shown()
    return report


def emit_report(history: History, diagnoses: Sequence[Diagnosis], *, file: IO[str] | None = None,
                width: int | None = None, rules_checked: int | None = None,
                notes: Sequence[str] = ()) -> Report:
    """Print the report of a run (see `emit`) and return its plain text."""
    renderable = report_renderable(history, diagnoses, rules_checked=rules_checked, notes=notes)
    return emit(renderable, file=file, width=width)
