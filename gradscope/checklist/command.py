"""`gradscope checkup TARGET`: run the checkup on the set-up a function of yours returns.

TARGET is `package.module:function` or `path/to/file.py:function`; the function takes no
arguments and returns `(model, batch, loss_fn, optimizer)` (loss_fn and optimizer may be None)
or a dict with those keys.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import GradscopeError
from .run import checkup

USAGE = ("give TARGET as package.module:function or path/to/file.py:function, a function "
         "without arguments that returns (model, batch, loss_fn, optimizer)")


def add_parser(sub: Any, fail_choices: tuple[str, ...]) -> None:
    """Add the `checkup` subcommand to the `gradscope` parser."""
    parser = sub.add_parser(
        "checkup", help="run the pre-training checklist on a model set-up of yours",
        description=("Import TARGET (package.module:function or file.py:function), call it to "
                     "get (model, batch, loss_fn, optimizer) and run gradscope.checkup() on "
                     "copies of them: loss at init, gradients, data, signal through depth, "
                     "overfit one batch, learning-rate range test."))
    parser.add_argument("target", metavar="TARGET",
                        help="package.module:function or path/to/file.py:function")
    parser.add_argument("--quick", action="store_true",
                        help="shorter overfit and range tests (30 steps each)")
    parser.add_argument("--plot", default=None, metavar="FILE",
                        help="also save the checkup figure (.png, .svg or .pdf)")
    parser.add_argument("--fail-on", choices=fail_choices, default="warning",
                        help="exit 1 when a finding is at least this severe (default: warning)")
    parser.add_argument("--width", type=int, default=None,
                        help="report width in characters (default: the terminal's)")


def load_setup(target: str) -> Callable[[], Any]:
    """The set-up function named by TARGET.

    Example:
        >>> load_setup("gradscope.checklist.command:_example_setup").__name__
        '_example_setup'
    """
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise GradscopeError(f"cannot read TARGET {target!r}; {USAGE}.")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise GradscopeError(f"no file {where!r}; {USAGE}.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        finally:
            sys.path.pop(0)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise GradscopeError(f"cannot import {where!r} ({err}); {USAGE}.") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise GradscopeError(f"{where} has no function {name!r}; {USAGE}.")
    return function


def _parts(setup: Any) -> tuple[Any, Any, Any, Any]:
    if isinstance(setup, Mapping):
        if "model" not in setup or "batch" not in setup:
            raise GradscopeError(f"the set-up dict needs the keys 'model' and 'batch'; {USAGE}.")
        return setup["model"], setup["batch"], setup.get("loss_fn"), setup.get("optimizer")
    if isinstance(setup, (tuple, list)) and 2 <= len(setup) <= 4:
        model, batch, *rest = setup
        rest = [*rest, None, None][:2]
        return model, batch, rest[0], rest[1]
    raise GradscopeError(f"the set-up function returned {type(setup).__name__}; {USAGE}.")


def run_command(args: argparse.Namespace) -> Any:
    """Run the checkup of TARGET, print its report, save the plot; return the Checkup."""
    model, batch, loss_fn, optimizer = _parts(load_setup(args.target)())
    ck = checkup(model, batch, loss_fn, optimizer, quick=args.quick)
    ck.report(width=args.width)
    if args.plot:
        print(f"plot saved to {ck.plot(args.plot)}")
    return ck


def _example_setup() -> tuple[Any, Any, Any, Any]:
    """A small classifier set-up (the example TARGET of the docs)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    return model, batch, nn.functional.cross_entropy, torch.optim.Adam(model.parameters())
