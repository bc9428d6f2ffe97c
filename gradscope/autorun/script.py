"""Run a training script as ``__main__`` under gradscope, then report and exit as it did."""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GradscopeError
from .attach import AutoWatch

EXIT_INTERRUPTED = 130  # what a shell reports for a process stopped by Ctrl-C


@dataclass
class RunResult:
    """How the script ended and what gradscope saw of it."""

    exit_code: int
    auto: AutoWatch
    error: BaseException | None = None
    notes: list[str] = field(default_factory=list)


def run_target(target: str, args: Sequence[str], *, module: bool = False,
               options: dict[str, Any] | None = None) -> RunResult:
    """Run `target` (a script path, or a module name with `module=True`) as ``__main__`` with
    ``sys.argv = [target, *args]``, watched by gradscope; return how it ended.

    The script's traceback is printed as Python prints it; nothing is reported here (see
    :func:`gradscope.autorun.run`).

    Example:
        >>> import pathlib, tempfile
        >>> script = pathlib.Path(tempfile.mkdtemp()) / "noop.py"
        >>> _ = script.write_text("import sys; sys.exit(3)")
        >>> run_target(str(script), []).exit_code
        3
    """
    if module:
        spec_path = None
    else:
        spec_path = Path(target)
        if not spec_path.is_file():
            raise GradscopeError(
                f"there is no script {target!r}; give the path of a Python file "
                "(or -m package.module to run a module).")
    auto = AutoWatch(dict(options or {}))
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    sys.argv = [str(spec_path) if spec_path else target, *args]
    if spec_path is not None and sys.path:
        sys.path[0] = str(spec_path.resolve().parent)  # as `python train.py` would set it
    elif module and sys.path:
        sys.path[0] = os.getcwd()                        # as `python -m pkg.mod` would set it
    code, error = 0, None  # type: int, BaseException | None
    auto.attach()
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(spec_path), run_name="__main__")
    except SystemExit as done:
        code = _exit_code(done)
    except KeyboardInterrupt as err:
        code, error = EXIT_INTERRUPTED, err
    except BaseException as err:  # the script's own error: shown below, as Python would
        code, error = 1, err
    finally:
        auto.detach()
        sys.argv = saved_argv
        if saved_path0 is not None and sys.path:
            sys.path[0] = saved_path0
    if error is not None:
        _show_traceback(error, spec_path)
    return RunResult(exit_code=code, auto=auto, error=error)


def _exit_code(done: SystemExit) -> int:
    """The process exit code Python gives `sys.exit(code)` (printing a message as it does)."""
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code
    print(done.code, file=sys.stderr)
    return 1


def _show_traceback(error: BaseException, script: Path | None) -> None:
    """Print the traceback as Python would: from the script's first frame, via sys.excepthook."""
    tb = error.__traceback__
    here = {str(Path(__file__).resolve()), str(Path(runpy.__file__).resolve())}
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")
                              or str(Path(tb.tb_frame.f_code.co_filename).resolve()) in here):
        tb = tb.tb_next
    sys.stdout.flush()
    error.__traceback__ = tb  # Python's printer reads the exception's own traceback
    try:
        sys.excepthook(type(error), error, tb)
    except Exception:  # a broken custom excepthook: fall back to the standard printer
        traceback.print_exception(type(error), error, tb)
    sys.stderr.flush()


__all__ = ["EXIT_INTERRUPTED", "RunResult", "run_target"]
