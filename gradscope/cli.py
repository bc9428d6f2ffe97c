"""The `gradscope` command: demo, report, plot, rules, run and checkup.

Exit codes: 0 fine, 1 findings at or above the failing severity, 2 bad usage or unreadable input.

Example (shell)::

    gradscope demo dead-relu --log-dir runs/dead
    gradscope report runs/dead --fail-on warning
    gradscope run train.py --epochs 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .diagnosis import Diagnosis, fails
from .errors import GradscopeError

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2
FAIL_CHOICES = ("info", "warning", "error", "never")
CHECKUP_DEMO = "checkup"  # `gradscope demo checkup`: a checkup instead of a training run


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")



def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `gradscope` command."""
    from ._version import __version__
    from .demo import DEFAULT, SCENARIOS

    parser = _Parser(prog="gradscope", description=(
        "Training diagnostics for PyTorch: see why a model does not learn. Run a demo, or read "
        "back the run log written by gradscope.watch(model, optimizer, log_dir=...)."))
    parser.add_argument("--version", action="version", version=f"gradscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="train a small model broken on purpose and explain it",
                          description=(
                              "Train a small model on synthetic data with the live view, then "
                              "print the report and save a plot. Scenarios: "
                              + ", ".join(f"{n} ({'finds ' + ' or '.join(s.expects) if s.expects else 'nothing to find'})"  # noqa: E501
                                          for n, s in SCENARIOS.items())
                              + "; checkup runs gradscope.checkup() on a model with three "
                              "bugs instead of training it."))
    demo.add_argument("scenario", nargs="?", default=DEFAULT,
                      choices=[*SCENARIOS, CHECKUP_DEMO],
                      metavar="SCENARIO", help=f"one of: {', '.join([*SCENARIOS, CHECKUP_DEMO])} "
                      f"(default: {DEFAULT})")
    demo.add_argument("--steps", type=positive_int, default=None,
                      help="training steps (default: the scenario's own, about 100)")
    demo.add_argument("--out", "-o", default=None, metavar="FILE",
                      help="where to save the plot (.png, .svg or .pdf; default: "
                      "gradscope-demo-SCENARIO.png)")
    demo.add_argument("--log-dir", default=None, metavar="DIR",
                      help="also write the run log there (read it with 'gradscope report DIR')")
    demo.add_argument("--no-live", action="store_true", help="no live view while training")
    demo.add_argument("--fail-on", choices=FAIL_CHOICES, default="never",
                      help="exit 1 when a finding is at least this severe (default: never)")

    report = sub.add_parser("report", help="re-run the rules over a saved run log",
                            description=(
                                "Read a run log (also of a run that crashed or was killed), "
                                "re-run the rules over it and print the report."))
    report.add_argument("log_dir", metavar="LOG_DIR",
                        help="the log_dir given to watch(), or its gradscope.jsonl")
    report.add_argument("--fail-on", choices=FAIL_CHOICES, default="error",
                        help="exit 1 when a finding is at least this severe (default: error)")
    report.add_argument("--width", type=positive_int, default=None,
                        help="report width in characters (default: the terminal's)")
    report.add_argument("--logged", action="store_true",
                        help="show the findings the run logged instead of re-running the rules")

    plot = sub.add_parser("plot", help="save the figure of a saved run log",
                          description="Draw the gradient figure of a run log to a file.")
    plot.add_argument("log_dir", metavar="LOG_DIR",
                      help="the log_dir given to watch(), or its gradscope.jsonl")
    plot.add_argument("-o", "--out", required=True, metavar="FILE",
                      help="output file (.png, .svg or .pdf)")
    plot.add_argument("--step", type=int, default=None,
                      help="recorded step for the per-layer panels (default: the last)")

    from .checklist.command import add_parser as add_checkup_parser

    add_checkup_parser(sub, FAIL_CHOICES)

    sub.add_parser("rules", help="list the rules with their signs, severities and thresholds",
                   description="List every built-in rule: id, sign, severity and thresholds "
                   "(override with watch(thresholds={rule_id: {name: value}})).")

    from .autorun.command import add_parser as add_run_parser

    add_run_parser(sub, FAIL_CHOICES)
    return parser


# --------------------------------------------------------------------------- commands
def _load(log_dir: str, logged: bool = False) -> tuple[Any, Any, list[Diagnosis], list[str]]:
    """(run log, history, diagnoses, notes) for a log directory."""
    from .runlog import read_log

    log = read_log(log_dir)
    notes = [f"run log {log.path}"]
    if not log.ended:
        notes.append("the log has no end entry: the run stopped early (crashed or killed); "
                     "showing what it recorded")
    if log.truncated:
        notes.append("its last line was cut off and is skipped")
    for problem in log.problems[:5]:
        notes.append(f"line {problem.line} skipped: {problem.reason}")
    if len(log.problems) > 5:
        notes.append(f"{len(log.problems) - 5} more unreadable lines skipped")
    if log.runs > 1:
        notes.append(f"the log holds {log.runs} runs; showing the last")
    if logged:
        return log, log.history(), log.logged_diagnoses(), notes
    engine = _engine_for(log, notes)
    history = log.replay(engine, capacity=_capacity(log))
    return log, history, engine.diagnoses(), notes


def _capacity(log: Any) -> int:
    size = log.options.get("history_size")
    return size if isinstance(size, int) and size > 0 else max(len(log.records), 1)


def _engine_for(log: Any, notes: list[str]) -> Any:
    """A rule engine with the run's own rule selection and thresholds where they still apply."""
    from .options import WatchOptions
    from .rules.engine import RuleEngine, builtin_rules

    options = log.options
    known = {r.id for r in builtin_rules()}
    rules = options.get("rules")
    if rules is not None:
        kept = tuple(r for r in rules if r in known)
        if len(kept) != len(rules):
            notes.append("custom rules of the run are not in the log; they are not re-run")
        rules = kept
    disabled = tuple(r for r in options.get("disable_rules") or () if r in known)
    thresholds = {k: v for k, v in (options.get("thresholds") or {}).items() if k in known}
    try:
        chosen = WatchOptions(rules=rules, disable_rules=disabled, thresholds=thresholds)
        return RuleEngine.from_options(chosen)
    except GradscopeError as err:
        notes.append(f"the run's rule settings do not apply ({err}); using the defaults")
        return RuleEngine.from_options(WatchOptions())


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.scenario == CHECKUP_DEMO:
        from .checklist.demo import run_checkup_demo

        ck, path = run_checkup_demo(out=args.out)
        print(f"plot saved to {path}")
        return EXIT_FOUND if fails(ck.diagnoses, args.fail_on) else EXIT_OK

    live: bool | str = not args.no_live
    scope, path = run_demo(args.scenario, steps=args.steps, out=args.out, live=live,
                           log_dir=args.log_dir)
    print(f"plot saved to {path}")
    if args.log_dir:
        print(f"run log in {args.log_dir} (read it with: gradscope report {args.log_dir})")
    return EXIT_FOUND if fails(scope.diagnose(), args.fail_on) else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from .report.summary import emit_report

    log, history, diagnoses, notes = _load(args.log_dir, args.logged)
    rules = None if args.logged else len(_engine_for(log, []).rules)
    emit_report(history, diagnoses, width=args.width, rules_checked=rules, notes=notes)
    return EXIT_FOUND if fails(diagnoses, args.fail_on) else EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from .report.plots import FORMATS, save_plot

    if Path(args.out).suffix.lower() not in FORMATS:
        raise UsageError(f"gradscope plot: cannot write {args.out!r}; use a file name ending in "
                         f"{', '.join(FORMATS)}")
    _, history, diagnoses, _ = _load(args.log_dir)
    path = save_plot(history, diagnoses, args.out, step=args.step)
    print(f"plot saved to {path}")
    return EXIT_OK


def cmd_rules(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    from .report.summary import SEVERITY_STYLE
    from .rules.engine import builtin_rules

    rules = builtin_rules()
    console = Console(highlight=False, emoji=False)
    if not rules:
        console.print("no built-in rules")
        return EXIT_OK
    for i, r in enumerate(rules):
        if i:
            console.print()
        head = Text()
        head.append(r.id, style="bold")
        head.append(f"  sign {r.sign}  ")
        head.append(r.severity, style=SEVERITY_STYLE.get(r.severity, ""))
        console.print(head)
        console.print(Text(f"  {r.title}"))
        if r.thresholds:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(no_wrap=True)
            grid.add_column(overflow="fold", style="dim")
            for name, threshold in r.thresholds.items():
                grid.add_row(f"{name}={threshold.default:g}", threshold.source)
            console.print(Padding(grid, (0, 0, 0, 4)))
    console.print(f"{len(rules)} rules. Change a threshold with "
                  "watch(..., thresholds={'RULE': {'NAME': VALUE}}).", style="dim")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, script_args: Sequence[str] = ()) -> int:
    from .autorun.command import command

    return command(args, script_args)


def cmd_checkup(args: argparse.Namespace) -> int:
    from .checklist.command import run_command

    ck = run_command(args)
    return EXIT_FOUND if fails(ck.diagnoses, args.fail_on) else EXIT_OK


COMMANDS = {"demo": cmd_demo, "report": cmd_report, "plot": cmd_plot, "rules": cmd_rules,
            "run": cmd_run, "checkup": cmd_checkup}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `gradscope` command with `argv` (default: sys.argv[1:]); return the exit code.

    Example:
        >>> main(["report", "/no/such/dir"])
        2
    """
    try:
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["run"]:  # the script's own arguments are passed on, not parsed here
            from .autorun.command import split_argv

            own, script_args = split_argv(argv[1:])
            return cmd_run(parser.parse_args(["run", *own]), script_args)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    except GradscopeError as err:
        print(f"gradscope: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"gradscope: {err.strerror or err}: {err.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("gradscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
