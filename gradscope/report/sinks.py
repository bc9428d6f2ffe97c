"""The reporters a Scope feeds while training runs (live view, run log), made from its options."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..scope import Scope


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


def make_sinks(scope: Scope) -> list[Any]:
    """Build the sinks asked for by `scope.options` (each has on_record() and on_close())."""
    from ..runlog import RunLogWriter, jsonable
    from .live import LiveView, wants_live

    sinks: list[Any] = []
    options = scope.options
    show, as_panel = wants_live(options.live)
    if show:
        sinks.append(LiveView(scope.history, scope.engine.diagnoses,
                              refresh_per_second=options.refresh_per_second,
                              panel_mode=as_panel))
    if options.log_dir is not None:
        sinks.append(RunLogWriter(options.log_dir, scope.layout,
                                  jsonable(options_summary(options)), scope.history,
                                  name=log_name(options)))
    return sinks
