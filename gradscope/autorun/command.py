"""The `gradscope run` sub-command: its arguments, and splitting them from the script's."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..cli import positive_int

EXAMPLES = """\
examples:
  gradscope run train.py --epochs 3            # the script's own arguments follow it
  gradscope run --every 5 --plot grads.png --fail-on error train.py
  gradscope run --no-live --log-dir runs/a -m mypkg.train --lr 0.1
  torchrun --nproc_per_node 2 -m gradscope run train.py

The script runs unmodified as __main__. gradscope finds the model (the outermost module whose
parameters an optimizer holds), the optimizer(s) and the loss (the tensor backward() runs
from), records once per optimizer step, and at the end prints the report. The exit code is
the script's own, or 1 when it exited 0 and --fail-on is met.
"""

# run's own options that take a value; everything from the script (or -m MODULE) on is the
# script's
_WITH_VALUE = {"--every", "--log-dir", "--plot", "--fail-on"}


def add_parser(sub: Any, fail_choices: Sequence[str]) -> argparse.ArgumentParser:
    """Add `run` to the `gradscope` sub-commands."""
    run = sub.add_parser(
        "run", help="run a training script unmodified and explain what goes wrong",
        usage="gradscope run [options] (SCRIPT | -m MODULE) [args ...]",
        description="Run a training script (or -m module) without editing it, watched by "
        "gradscope, then print the report.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("target", nargs="?", metavar="SCRIPT",
                     help="the training script, run as __main__")
    run.add_argument("-m", dest="module", metavar="MODULE", default=None,
                     help="run a module as `python -m MODULE` does")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="args",
                     help="arguments passed to the script as its sys.argv[1:]")
    run.add_argument("--every", type=positive_int, default=10, metavar="N",
                     help="record the heavier signals every N optimizer steps (default: 10)")
    run.add_argument("--log-dir", default=None, metavar="DIR",
                     help="write the run log there (read it with 'gradscope report DIR')")
    live = run.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_const", const=True, default="auto",
                      help="live view in the terminal (default: on when it is a terminal)")
    live.add_argument("--no-live", dest="live", action="store_const", const=False,
                      help="print nothing while the script trains")
    run.add_argument("--plot", default=None, metavar="FILE",
                     help="save the gradient figure there (.png, .svg or .pdf)")
    run.add_argument("--fail-on", choices=list(fail_choices), default="never",
                     help="exit 1 when the script exits 0 and a finding is at least this "
                     "severe (default: never)")
    return run



def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split `run`'s arguments into its own options and the script's part (script or -m
    MODULE, then the script's arguments, passed on untouched).

    Example:
        >>> split_argv(["--every", "2", "train.py", "--every", "5"])
        (['--every', '2', 'train.py'], ['--every', '5'])
        >>> split_argv(["-m", "pkg.train", "-x"])
        (['-m', 'pkg.train'], ['-x'])
    """
    own: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return own + list(argv[i + 1:i + 2]), list(argv[i + 2:])
        if token == "-m" or (token.startswith("-m") and len(token) > 2 and token[1] == "m"):
            take = 2 if token == "-m" else 1
            return own + list(argv[i:i + take]), list(argv[i + take:])
        if not token.startswith("-"):
            return [*own, token], list(argv[i + 1:])
        own.append(token)
        if token in _WITH_VALUE:
            own.extend(argv[i + 1:i + 2])
            i += 1
        i += 1
    return own, []


def command(args: argparse.Namespace, script_args: Sequence[str]) -> int:
    """Run `gradscope run` with parsed options; return the exit code."""
    from ..cli import UsageError
    from . import run

    if args.module and args.target:
        raise UsageError("gradscope run: give a script or -m MODULE, not both "
                         "(see 'gradscope run --help')")
    if not args.module and not args.target:
        raise UsageError("gradscope run: give the training script to run, e.g. "
                         "'gradscope run train.py' (see 'gradscope run --help')")
    if args.plot is not None:
        from ..report.plots import FORMATS

        if not args.plot.lower().endswith(tuple(FORMATS)):
            raise UsageError(f"gradscope run: cannot write {args.plot!r}; use a file name "
                             f"ending in {', '.join(FORMATS)}")
    options: dict[str, Any] = {"every": args.every, "live": args.live}
    if args.log_dir is not None:
        options["log_dir"] = args.log_dir
    return run(args.module or args.target, list(args.args) + list(script_args),
               module=bool(args.module), fail_on=args.fail_on, plot=args.plot, **options)
