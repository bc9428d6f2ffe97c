"""`gradscope run`: diagnose a training script without editing it.

Example (shell)::

    gradscope run train.py --epochs 3
    gradscope run --every 5 --plot grads.png --fail-on error -m mypkg.train --lr 0.1
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..diagnosis import fails
from .attach import AutoWatch
from .script import EXIT_INTERRUPTED, RunResult, run_target


def run(target: str, args: Sequence[str] = (), *, module: bool = False,
        fail_on: str = "never", plot: str | Path | None = None,
        **options: Any) -> int:
    """Run a script (or module) as ``__main__``, watched by gradscope; print the report, save
    the plot when asked, and return the exit code: the script's own, or 1 when it exited 0
    but a finding is at least as severe as `fail_on` (``"info"``, ``"warning"``, ``"error"``;
    ``"never"`` turns that off). `options` are those of :func:`gradscope.watch`.

    Example:
        >>> import pathlib, tempfile
        >>> script = pathlib.Path(tempfile.mkdtemp()) / "train.py"
        >>> _ = script.write_text('''
        ... import torch
        ... model = torch.nn.Linear(4, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
        ... for _ in range(3):
        ...     opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
        ... ''')
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as printed:
        ...     code = run(str(script), every=1, live=False)
        >>> code, "3 steps, 3 recorded" in printed.getvalue()
        (0, True)
    """
    from ..options import WatchOptions

    WatchOptions.from_kwargs(dict(options))  # bad options fail here, before the script runs
    result = run_target(target, args, module=module, options=options)
    if not _reports_here():
        return result.exit_code
    return finish(result, fail_on=fail_on, plot=plot)


def finish(result: RunResult, *, fail_on: str = "never", plot: str | Path | None = None) -> int:
    """Report what the run showed, save the plot, and return the exit code."""
    auto = result.auto
    sys.stdout.flush()
    missing = auto.missing()
    if missing is not None:
        print(f"gradscope: {missing}", file=sys.stderr, flush=True)
        return result.exit_code
    scope = auto.scope
    assert scope is not None
    notes = list(auto.notes)
    if auto.backward_calls == 0:
        notes.append("no backward() call was seen, so the loss is not recorded")
    for note in notes:
        print(f"gradscope: {note}.", file=sys.stderr, flush=True)
    scope.report()
    if plot is not None:
        try:
            print(f"gradscope: plot saved to {scope.plot(plot)}", flush=True)
        except Exception as err:  # a bad path must not hide the script's exit code
            print(f"gradscope: could not save the plot to {plot}: {err}", file=sys.stderr)
    if result.exit_code == 0 and fails(scope.diagnose(), fail_on):
        return 1
    return result.exit_code



def _reports_here() -> bool:
    """Rank 0 reports under torchrun, even after the script destroyed its process group."""
    from ..signals.distributed import is_rank_zero

    return is_rank_zero() and os.environ.get("RANK", "0") == "0"


__all__ = ["EXIT_INTERRUPTED", "AutoWatch", "RunResult", "finish", "run", "run_target"]
