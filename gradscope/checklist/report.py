"""The checkup report: one line per check (status, time, result), then each diagnosis."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..report.summary import emit, findings_blocks

if TYPE_CHECKING:
    from .result import Checkup

STATUS_STYLE = {"ok": "bold green", "info": "bold cyan", "warning": "bold yellow",
                "error": "bold red", "skipped": "dim"}


def checkup_renderable(ck: Checkup) -> RenderableType:
    """The whole checkup report as one rich renderable."""
    parts: list[RenderableType] = [Text("gradscope checkup", style="bold underline")]
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(overflow="fold")
    for result in ck.results:
        status = result.status
        detail = result.summary if result.skipped is None else f"skipped: {result.skipped}"
        table.add_row(Text(f"{status.upper():<7}", style=STATUS_STYLE.get(status, "bold")),
                      result.title, Text(f"{result.seconds:.2f}s", style="dim"), detail)
    parts.append(table)
    parts.append(Text(f"{len(ck.results)} checks in {ck.seconds:.1f}s", style="dim"))
    for note in ck.notes:
        parts.append(Text(note, style="dim"))
    parts.append(Text(""))
    found = ck.diagnoses
    if not found:
        parts.append(Text("No problems found: the model is ready to train.", style="bold green"))
        return Group(*parts)
    parts += findings_blocks(found)
    return Group(*parts)


def emit_checkup_report(ck: Checkup, file: IO[str] | None = None,
                        width: int | None = None) -> str:
    """Print the report where reports go (colour on a terminal, once in Jupyter, plain text to
    a file or pipe) and return its plain text.

    Example:
        >>> import io
        >>> from gradscope.checklist.result import Checkup, CheckResult
        >>> text = emit_checkup_report(Checkup([CheckResult("data")]), file=io.StringIO())
        >>> text.splitlines()[0]
        'gradscope checkup'
    """
    return emit(checkup_renderable(ck), file=file, width=width)
