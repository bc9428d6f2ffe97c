"""Sinks: what a Scope feeds while training runs (live view, run log, exporters).

A sink gets each recorded step with the diagnoses the rules found new or changed at it, and
is told when the run closes. It never runs the rules itself: the current diagnoses (as of
the rules' last run, see RuleCadence) are handed to the sinks that show them when they are
made. `make_sinks` builds the sinks the watch options ask for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..diagnosis import Diagnosis
from ..history import History, StepRecord
from ..layout import ModelLayout
from ..options import WatchOptions


@runtime_checkable
class Sink(Protocol):
    """Fed by a Scope (see `Scope.add_sink`): every recorded step, then the close.

    `diagnoses` are those new or changed at this step (empty when the rules did not run).
    A sink may also define `on_diagnoses(step, diagnoses)` (see `DiagnosisSink`).

    Example:
        >>> class Count:
        ...     n = 0
        ...     def on_record(self, record, diagnoses): self.n += 1
        ...     def on_close(self): pass
        >>> isinstance(Count(), Sink)
        True
    """

    def on_record(self, record: StepRecord, diagnoses: Sequence[Diagnosis]) -> None: ...

    def on_close(self) -> None: ...


@runtime_checkable
class DiagnosisSink(Sink, Protocol):
    """A sink that also hears of diagnoses found between recorded steps (when the rules catch
    up on unseen records or late losses in diagnose(), report(), plot() or close())."""

    def on_diagnoses(self, step: int, diagnoses: Sequence[Diagnosis]) -> None: ...



def options_summary(options: Any) -> dict[str, Any]:
    """The watch options as plain values (rules given as objects are named by their id)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in ("rules", "disable_rules") and value is not None:
            value = [getattr(item, "id", item) for item in value]
        out[f.name] = value
    return out


def log_name(options: Any) -> str:
    """gradscope.jsonl, or gradscope.rankN.jsonl when every rank of a distributed run writes."""
    from ..runlog import LOG_NAME
    from ..signals.distributed import rank, world_size

    if getattr(options, "all_ranks", False) and world_size() > 1:
        return f"gradscope.rank{rank()}.jsonl"
    return LOG_NAME


def make_sinks(options: WatchOptions, history: History, layout: ModelLayout,
               current: Callable[[], list[Diagnosis]]) -> list[Sink]:
    """Build the sinks `options` ask for; `current` gives the diagnoses as of the rules' last
    run (it runs no rule)."""
    from ..runlog import RunLogWriter, jsonable
    from .live import LiveView, wants_live

    sinks: list[Sink] = []
    show, as_panel = wants_live(options.live)
    if show:
        sinks.append(LiveView(history, current, refresh_per_second=options.refresh_per_second,
                              panel_mode=as_panel))
    if options.log_dir is not None:
        sinks.append(RunLogWriter(options.log_dir, layout, jsonable(options_summary(options)),
                                  history, name=log_name(options)))
    return sinks
