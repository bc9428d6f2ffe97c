"""Showing reports, figures and the live panel in Jupyter: once, where they are made.

In a notebook a report or a figure is displayed the moment it is made, so it appears whether
the call is the last line of a cell or not. The object returned (the report's text, the saved
path, the figure) then skips its own display in that same cell: the cell shows it once. Shown
again in a later cell (a variable on its own line), it displays as usual.

Nothing here imports IPython unless a notebook is running; outside one, these objects are a
plain `str`, `Path` and matplotlib `Figure` to the code that uses them.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: How rich frames its HTML in a notebook (a scrollable block of monospaced text).
PRE_FORMAT = ('<pre style="white-space:pre;overflow-x:auto;line-height:normal;'
              "font-family:Menlo,'DejaVu Sans Mono',consolas,'Courier New',monospace\">"
              "{code}</pre>")
#: Resolution of a figure shown inline (the saved file keeps its own).
INLINE_DPI = 90


def in_notebook() -> bool:
    """True inside a Jupyter kernel (rich's test: IPython's ZMQ shell, Colab, Databricks).

    Example:
        >>> in_notebook()
        False
    """
    return Console(file=io.StringIO()).is_jupyter


def _shell() -> Any:
    ipython = sys.modules.get("IPython")  # under IPython it is imported; never import it here
    return None if ipython is None else ipython.get_ipython()


def current_cell() -> int | None:
    """The running cell's execution count under IPython (None outside IPython)."""
    shell = _shell()
    return None if shell is None else getattr(shell, "execution_count", None)


def _display(bundle: dict[str, Any], **kwargs: Any) -> Any:
    from IPython.display import display

    return display(bundle, raw=True, **kwargs)


def rich_bundle(renderable: RenderableType, width: int) -> dict[str, str]:
    """A renderable as notebook output: coloured HTML and its plain text, at a fixed width.

    Example:
        >>> sorted(rich_bundle("hello", 40))
        ['text/html', 'text/plain']
    """
    console = Console(file=io.StringIO(), width=width, record=True, force_terminal=True,
                      force_jupyter=False, color_system="truecolor", legacy_windows=False,
                      soft_wrap=False, emoji=False, highlight=False)
    console.print(renderable)  # rendered once; both exports read the recording
    text = console.export_text(clear=False, styles=False)
    html = console.export_html(inline_styles=True, code_format=PRE_FORMAT)
    return {"text/plain": "\n".join(line.rstrip() for line in text.splitlines()),
            "text/html": html}


def figure_bundle(fig: Figure, png: bytes | None = None) -> dict[str, str]:
    """A figure as notebook output: PNG (rendered at INLINE_DPI unless given) and a caption."""
    if png is None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=INLINE_DPI)
        png = buffer.getvalue()
    return {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": repr(fig)}


class ShownOnce:
    """Mixin: displayed by IPython as usual, except in the cell that made it (shown there).

    `_bundle()` gives what to display; `_mark_shown()` records the cell it was shown in.
    """

    _shown_in: int | None = None

    def _mark_shown(self) -> None:
        self._shown_in = current_cell()

    def _bundle(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _ipython_display_(self) -> None:
        if self._shown_in is not None and self._shown_in == current_cell():
            return
        _display(self._bundle())


class Report(ShownOnce, str):
    """The report's plain text (a `str`), which shows itself once in a notebook.

    `str(report)`, `print(report)`, `report.splitlines()`, comparisons and writes all see the
    plain text; rich (`rich.print(report)`) and Jupyter see the coloured report.

    Example:
        >>> r = Report("gradscope report\\nNo problems found.\\n")
        >>> r.splitlines()[0], isinstance(r, str)
        ('gradscope report', True)
        >>> r
        <gradscope report, 2 lines: print() it or str() it for the text>
    """

    _renderable: RenderableType | None = None
    _width: int = 100

    def __new__(cls, text: str, renderable: RenderableType | None = None,
                width: int = 100) -> Report:
        self = super().__new__(cls, text)
        self._renderable = renderable
        self._width = width
        return self

    def __rich__(self) -> RenderableType:
        return self._renderable if self._renderable is not None else str(self)

    def _bundle(self) -> dict[str, Any]:
        if self._renderable is None:
            return {"text/plain": str(self)}
        return rich_bundle(self._renderable, self._width)

    def __repr__(self) -> str:
        # the text was printed already: echoing it again at a prompt would print it twice
        lines = len(self.splitlines())
        return f"<gradscope report, {lines} lines: print() it or str() it for the text>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))  # pickles (and copies) as the plain text


def show_report(renderable: RenderableType, width: int) -> Report:
    """Display a report in the running notebook now; return its text, which will not echo."""
    bundle = rich_bundle(renderable, width)
    report = Report(bundle["text/plain"] + "\n", renderable, width)
    _display(bundle)
    report._mark_shown()
    return report


class SavedPlot(ShownOnce, type(Path())):  # type: ignore[misc]
    """The path a figure was saved to (a `pathlib.Path`); it does not echo where it was shown.

    Example:
        >>> SavedPlot("grads.png").suffix, repr(SavedPlot("grads.png")) == repr(Path("grads.png"))
        ('.png', True)
    """

    def _bundle(self) -> dict[str, Any]:
        return {"text/plain": repr(self)}

    def __repr__(self) -> str:
        return repr(Path(self))


def show_figure(fig: Figure, png: bytes | None = None) -> None:
    """Display `fig` in the running notebook now (as PNG)."""
    _display(figure_bundle(fig, png))
    if isinstance(fig, ShownOnce):
        fig._mark_shown()


class OutputArea:
    """One output area of the running cell, redrawn in place (Jupyter display ids).

    The first `show()` displays; later ones replace that display, so a notebook holds one
    panel however often it is redrawn. When training goes on in another cell (a loop cell run
    again, whose old outputs the notebook cleared), the panel opens anew in that cell; `last=
    True` (the final redraw, maybe from a later cell) updates the panel where it is. No
    ipywidgets needed.
    """

    def __init__(self) -> None:
        self._handle: Any = None
        self._cell: int | None = None
        self.updates = 0

    def show(self, renderable: RenderableType, width: int, *, last: bool = False) -> None:
        bundle = rich_bundle(renderable, width)
        cell = current_cell()
        if self._handle is None or (not last and cell != self._cell):
            self._handle = _display(bundle, display_id=True)
            self._cell = cell
        else:
            self._handle.update(bundle, raw=True)
            self.updates += 1
