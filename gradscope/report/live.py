"""The live view: a compact panel on a terminal or in Jupyter, one line per finding elsewhere.

It renders only when a step is recorded and at most `refresh_per_second` times a second,
on the training thread (no background thread), so training is not slowed down. On a terminal
rich's `Live` redraws the panel; in Jupyter one output area of the cell is replaced in place
(IPython display updates, no ipywidgets needed), and the last panel stays there.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..diagnosis import Diagnosis
from ..history import History, StepRecord
from .display import OutputArea
from .readings import (
    UPDATE_RATIO_REFERENCE,
    fmt,
    fmt_frac,
    fold_name,
    fold_rows,
    layer_rows,
    log_bar,
    severity_sorted,
    sparkline,
)
from .summary import SEVERITY_STYLE

#: Layers shown in the panel before the rest are folded into "… N more".
MAX_LAYER_ROWS = 12
#: How many recent losses the trend covers.
TREND_STEPS = 200


def panel(history: History, diagnoses: Sequence[Diagnosis], *, max_rows: int = MAX_LAYER_ROWS,
          width: int = 100) -> RenderableType:
    """The live panel for the newest recorded step.

    Example:
        >>> import torch
        >>> from gradscope.layout import ModelLayout
        >>> p = panel(History(ModelLayout.of(torch.nn.Linear(2, 2))), [])
        >>> type(p).__name__
        'Panel'
    """
    record = history.last
    steps, losses = history.losses()
    header = Text()
    step = int(steps[-1]) if steps.size else (record.step if record else 0)
    header.append("step ", style="dim")
    header.append(f"{step:<7}", style="bold")
    if losses.size:
        header.append("loss ", style="dim")
        header.append(f"{fmt(losses[-1], 4):<10}", style="bold")
        header.append(sparkline(losses[-TREND_STEPS:], width=24), style="cyan")
        finite = losses[np.isfinite(losses)]
        if finite.size:
            header.append(f"  best {fmt(finite.min(), 4)}", style="dim")
    if record is not None and record.lrs:
        lrs = sorted({fmt(v) for v in record.lrs})
        header.append(f"  lr {'/'.join(lrs[:3])}", style="dim")
    parts: list[RenderableType] = [header]
    ordered = severity_sorted(diagnoses)
    if ordered:
        for d in ordered[:6]:
            line = Text("● ", style=SEVERITY_STYLE.get(d.severity, ""))
            line.append(f"{d.severity.upper():<8}", style=SEVERITY_STYLE.get(d.severity, ""))
            line.append(d.sign, style="bold")
            line.append(f"  {d.title}")
            if d.cause:
                line.append(f"  (likely {d.cause})", style="dim")
            line.truncate(width - 4, overflow="ellipsis")
            parts.append(line)
        if len(ordered) > 6:
            parts.append(Text(f"  … {len(ordered) - 6} more", style="dim"))
    else:
        parts.append(Text("● no problems so far", style="green"))
    parts.append(_layer_table(history, record, ordered, max_rows))
    title = Text.assemble(("gradscope", "bold"), f" · recorded {history.total_recorded}")
    return Panel(Group(*parts), title=title, title_align="left", width=width, padding=(0, 1))


def _layer_table(history: History, record: StepRecord | None,
                 diagnoses: Sequence[Diagnosis], max_rows: int) -> Table:
    rows = layer_rows(history, record, diagnoses)
    shown, hidden = fold_rows(rows, max_rows)
    grads = np.array([r.grad_norm for r in rows])
    positive = grads[np.isfinite(grads) & (grads > 0)]
    low = float(positive.min()) if positive.size else 1.0
    high = float(positive.max()) if positive.size else 1.0
    low, high = 10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high))
    if high <= low * 10:
        low = high / 100
    table = Table(box=None, padding=(0, 1), pad_edge=False, expand=False,
                  header_style="dim", show_edge=False)
    table.add_column("layer", no_wrap=True, max_width=30)
    table.add_column("grad norm (log)", no_wrap=True)
    table.add_column("", justify="right", no_wrap=True)
    table.add_column("update/w", justify="right", no_wrap=True)
    table.add_column("dead", justify="right", no_wrap=True)
    table.add_column("sat", justify="right", no_wrap=True)
    for row in shown:
        name = Text(fold_name(row.name, 30), style="bold red" if row.flagged else "")
        if row.grad_norm == 0 or (np.isfinite(row.grad_norm) and row.grad_norm < low * 1.01):
            bar_style = "red"
        elif not np.isnan(row.grad_norm) and not np.isfinite(row.grad_norm):
            bar_style = "bold red"
        else:
            bar_style = "green"
        bar = Text(f"{log_bar(row.grad_norm, low, high, 14):<14}", style=bar_style)
        ratio = Text(fmt(row.update_ratio, 2), style=_ratio_style(row.update_ratio))
        table.add_row(name, bar, fmt(row.grad_norm, 2), ratio,
                      Text(fmt_frac(row.dead), style=_frac_style(row.dead)),
                      Text(fmt_frac(row.saturated), style=_frac_style(row.saturated)))
    if hidden:
        table.add_row(Text(f"… {hidden} more layers", style="dim"), "", "", "", "", "")
    return table


def _ratio_style(value: float) -> str:
    if not np.isfinite(value):
        return "dim"
    if value == 0 or abs(math.log10(value / UPDATE_RATIO_REFERENCE)) > 2:
        return "yellow"
    return ""


def _frac_style(value: float) -> str:
    if not np.isfinite(value):
        return "dim"
    return "yellow" if value >= 0.5 else ""


def finding_line(d: Diagnosis, step: int, new: bool) -> str:
    """One short plain line for a new or changed diagnosis (the non-terminal live view).

    Example:
        >>> print(finding_line(Diagnosis("loss-flat", "warning", "Loss is flat"), 40, True))
        gradscope step 40: WARNING loss-flat - Loss is flat
    """
    text = f"gradscope step {step}: {d.severity.upper()} {d.sign} - {d.title}"
    if d.cause:
        text += f" (likely {d.cause})"
    if d.layers:
        text += f" [{', '.join(d.layers[:3])}{', …' if len(d.layers) > 3 else ''}]"
    if not new:
        text += " (updated)"
    return text


class LiveView:
    """The live sink: a refreshing panel on a terminal or in Jupyter, plain lines otherwise.

    `mode` is "panel" (rich Live on a terminal), "notebook" (one output area redrawn in place)
    or "lines" (one plain line per new or changed finding).

    Example:
        >>> import io, torch
        >>> from gradscope.layout import ModelLayout
        >>> h = History(ModelLayout.of(torch.nn.Linear(2, 2)))
        >>> view = LiveView(h, lambda: [], console=Console(file=io.StringIO()))
        >>> view.mode
        'lines'
    """

    def __init__(self, history: History, diagnoses: Callable[[], list[Diagnosis]], *,
                 refresh_per_second: float = 4.0, console: Console | None = None,
                 panel_mode: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 max_rows: int = MAX_LAYER_ROWS) -> None:
        self.history = history
        self._diagnoses = diagnoses
        self.console = console or Console(highlight=False, emoji=False)
        if panel_mode is None:
            panel_mode = self.console.is_terminal or self.console.is_jupyter
        if not panel_mode:
            self.mode = "lines"
        else:
            self.mode = "notebook" if self.console.is_jupyter else "panel"
        self._area: OutputArea | None = None
        self.interval = 1.0 / refresh_per_second
        self._clock = clock
        self._last = -math.inf
        self._live: Live | None = None
        self._seen: set[str] = set()
        self._dirty = False
        self.max_rows = max_rows
        self.renders = 0

    def _width(self) -> int:
        return max(min(self.console.width, 100), 60)

    def on_record(self, record: StepRecord, changed: Sequence[Diagnosis]) -> None:
        if self.mode == "lines":
            self._print_lines(record, changed)
            return
        self._dirty = True
        now = self._clock()
        if now - self._last < self.interval:
            return
        self._last = now
        try:
            self._render()
        except Exception:
            self._abandon()  # give the terminal back before the error switches this view off
            raise

    def _abandon(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            with contextlib.suppress(Exception):
                live.stop()

    def on_diagnoses(self, step: int, changed: Sequence[Diagnosis]) -> None:
        """Diagnoses found outside a recorded step (the rules catching up at close)."""
        if self.mode == "lines":
            self._print_step_lines(step, changed)
        else:
            self._dirty = True

    def _print_lines(self, record: StepRecord, changed: Sequence[Diagnosis]) -> None:
        self._print_step_lines(record.step, changed)

    def _print_step_lines(self, step: int, changed: Sequence[Diagnosis]) -> None:
        for d in changed:
            key = d.rule or d.sign
            new = key not in self._seen
            self._seen.add(key)
            self.console.out(finding_line(d, step, new), highlight=False)

    def _render(self, last: bool = False) -> None:
        renderable = panel(self.history, self._diagnoses(), max_rows=self.max_rows,
                           width=self._width())
        if self.mode == "notebook":
            if self._area is None:
                self._area = OutputArea()
            self._area.show(renderable, self._width(), last=last)
        elif self._live is None:
            self._live = Live(renderable, console=self.console, auto_refresh=False,
                              transient=False, redirect_stdout=True, redirect_stderr=True)
            self._live.start(refresh=True)
            # a scope that is never closed must still give the terminal back at exit
            atexit.register(_stop_at_exit, weakref.ref(self))
        else:
            self._live.update(renderable, refresh=True)
        self._dirty = False
        self.renders += 1

    def on_close(self) -> None:
        if self.mode == "lines":
            return
        try:
            if self._dirty or self._live is not None or self._area is not None:
                self._render(last=True)
        finally:
            if self._live is not None:
                self._live.stop()
                self._live = None


def _stop_at_exit(ref: weakref.ReferenceType[LiveView]) -> None:
    view = ref()
    if view is not None and view._live is not None:
        with contextlib.suppress(Exception):
            view.on_close()


def wants_live(live: Any, stream: IO[str] | None = None) -> tuple[bool, bool]:
    """(show anything, as a panel) for the `live` option: True, False or "auto" (terminal only)."""
    if live is False:
        return False, False
    console = Console(file=stream or sys.stdout)
    interactive = console.is_terminal or console.is_jupyter
    if live == "auto":
        return interactive, interactive
    return True, interactive
