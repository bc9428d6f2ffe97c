"""Reading a run log back, also one cut short by a crash or a kill."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..diagnosis import Diagnosis
from ..errors import GradscopeError
from ..history import History, StepRecord
from ..layout import ModelLayout, ParamInfo
from ..records import FlightLog

if TYPE_CHECKING:
    from ..rules.engine import RuleEngine

from .encoding import (
    LOG_NAME,
    SCHEMA,
    decode_record,
    number_from_json,
)


@dataclass
class LogProblem:
    """A line of the log that could not be read."""

    line: int
    reason: str


@dataclass
class RunLog:
    """What a run log holds, read back."""

    path: Path
    header: dict[str, Any]
    layout: ModelLayout
    records: list[StepRecord]
    losses: list[tuple[int, float]]
    events: list[dict[str, Any]]
    ended: bool
    problems: list[LogProblem] = field(default_factory=list)
    truncated: bool = False
    runs: int = 1
    # (line order) entries: ("loss", steps, values), ("step", record) or ("flight", log):
    # the flight recorder's steps after the last record
    _order: list[tuple] = field(default_factory=list, repr=False)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.header.get("options") or {})

    def logged_diagnoses(self) -> list[Diagnosis]:
        """The diagnoses as the run itself logged them (last state of each)."""
        latest: dict[str, Diagnosis] = {}
        for event in self.events:
            try:
                d = Diagnosis.from_dict(event["diagnosis"])
            except (KeyError, TypeError, ValueError):
                continue
            latest[d.rule or d.sign] = d
        return list(latest.values())

    def history(self, capacity: int | None = None) -> History:
        """A History holding every record and loss of the log (rules not run)."""
        history = History(self.layout, capacity=capacity or max(len(self.records), 1),
                          loss_capacity=max(len(self.losses) + len(self.records), 1))
        self._replay(history, None)
        return history

    def replay(self, engine: RuleEngine, capacity: int | None = None) -> History:
        """Rebuild the History step by step, running `engine.update(history)` as the live run
        did (see RuleCadence; `every` from the logged options) and once more at the end."""
        history = History(self.layout, capacity=capacity or max(len(self.records), 1),
                          loss_capacity=max(len(self.losses) + len(self.records), 1))
        self._replay(history, engine)
        return history

    def _replay(self, history: History, engine: RuleEngine | None) -> None:
        from ..diagnoser import Diagnoser

        every = self.options.get("every")
        diagnoser = (Diagnoser(engine, history, every if isinstance(every, int) and every > 0
                               else 10) if engine is not None else None)
        losses_after_record = False  # as live: the rules see the last losses at close
        for entry in self._order:
            losses_after_record = entry[0] in ("loss", "flight")
            if entry[0] == "flight":
                history.flight_tail = entry[1]
            elif entry[0] == "loss":
                history.add_losses(entry[1], entry[2])
            else:
                record = entry[1]
                history.add_losses([record.step], [record.loss])
                history.append(record)
                if diagnoser is not None:
                    diagnoser.feed(record)
        if diagnoser is not None:
            diagnoser.catch_up(new_losses=losses_after_record)


def layout_from_summary(summary: dict[str, Any]) -> ModelLayout:
    """Rebuild a ModelLayout (without tensors) from `ModelLayout.summary()`.

    Example:
        >>> import torch
        >>> layout = ModelLayout.of(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        >>> layout_from_summary(layout.summary()).param_layer
        [0, 0]
    """
    params = []
    for p in summary["params"]:
        shape = tuple(int(v) for v in p.get("shape", ()))
        params.append(ParamInfo(name=str(p["name"]), layer=str(p.get("layer", "")), shape=shape,
                                numel=int(np.prod(shape)) if shape else 1,
                                requires_grad=bool(p.get("requires_grad", True))))
    layers = [str(name) for name in summary.get("layers", [])]
    for info in params:
        if info.layer not in layers:
            layers.append(info.layer)
    index = {name: i for i, name in enumerate(layers)}
    module_types = {str(k): str(v) for k, v in (summary.get("module_types") or {}).items()}
    layout = ModelLayout(params=params, tensors=[], layers=layers,
                         param_layer=[index[p.layer] for p in params],
                         module_names=list(module_types), module_types=module_types)
    layout.static("optimizers", lambda: int(summary.get("optimizers") or 1))
    return layout


def find_log(path: str | Path) -> Path:
    """The log file for `path`: the file itself, or gradscope.jsonl inside a directory."""
    path = Path(path)
    if path.is_dir():
        candidate = path / LOG_NAME
        ranks = sorted(path.glob("gradscope.rank*.jsonl"))
        if not candidate.exists() and ranks:
            raise GradscopeError(
                f"{str(path)!r} holds one run log per rank; pass one of them, e.g. "
                f"{str(ranks[0])!r}.")
        if not candidate.exists():
            raise GradscopeError(
                f"no run log in {str(path)!r} (expected {LOG_NAME}); pass the log_dir= "
                "given to gradscope.watch().")
        return candidate
    if not path.exists():
        raise GradscopeError(f"{str(path)!r} does not exist; pass a log directory or its "
                             f"{LOG_NAME} file.")
    return path


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, content, ends with newline) for each line of the file."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            yield number, raw.rstrip(b"\r\n"), raw.endswith(b"\n")


def read_log(path: str | Path, run: int = -1) -> RunLog:
    """Read a run log (a directory or the .jsonl file); `run` picks one when several appended.

    A truncated last line (a killed run) is skipped quietly; any other unreadable line is
    listed in `problems` with its line number, and everything valid is kept.

    Example:
        >>> import tempfile, torch
        >>> from gradscope.runlog import RunLogWriter
        >>> d = tempfile.mkdtemp()
        >>> RunLogWriter(d, ModelLayout.of(torch.nn.Linear(2, 2)), {}).close()
        >>> read_log(d).ended
        True
    """
    file = find_log(path)
    runs: list[list[tuple[int, dict[str, Any]]]] = []
    problems: list[LogProblem] = []
    truncated = False
    lines = list(_lines(file))
    for number, raw, complete in lines:
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
            if not isinstance(entry, dict) or "type" not in entry:
                raise ValueError("not a gradscope log entry")
        except (ValueError, UnicodeDecodeError) as err:
            if number == len(lines) and not complete:
                truncated = True
            else:
                problems.append(LogProblem(number, f"not valid JSON ({err})"[:200]))
            continue
        if entry["type"] == "header":
            runs.append([])
        if not runs:
            problems.append(LogProblem(number, "entry before the log header"))
            continue
        runs[-1].append((number, entry))
    if not runs:
        raise GradscopeError(f"{str(file)!r} holds no gradscope run log header; is it a file "
                             "written by gradscope.watch(log_dir=...)?")
    try:
        chosen = runs[run]
    except IndexError:
        raise GradscopeError(
            f"the log holds {len(runs)} run(s); run={run} is out of range.") from None
    return _build(file, chosen, problems, truncated, len(runs))


def _build(file: Path, entries: list[tuple[int, dict[str, Any]]], problems: list[LogProblem],
           truncated: bool, runs: int) -> RunLog:
    header = entries[0][1]
    if header.get("schema") != SCHEMA:
        raise GradscopeError(f"{str(file)!r} uses log schema {header.get('schema')!r}; this "
                             f"gradscope reads schema {SCHEMA}. Read it with a matching version.")
    try:
        layout = layout_from_summary(header["layout"])
    except (KeyError, TypeError, ValueError) as err:
        raise GradscopeError(f"the header of {str(file)!r} has no readable model layout ({err})."
                             ) from err
    n = len(layout.params)
    log = RunLog(path=file, header=header, layout=layout, records=[], losses=[], events=[],
                 ended=False, problems=problems, truncated=truncated, runs=runs)
    for number, entry in entries[1:]:
        kind = entry.get("type")
        try:
            if kind == "step":
                record = decode_record(entry, n, layout.module_names)
                for name in ("grad_norm", "grad_max"):
                    if len(getattr(record, name)) != n:
                        raise ValueError(f"{name} has {len(getattr(record, name))} values for "
                                         f"{n} parameters")
                log.records.append(record)
                log.losses.append((record.step, record.loss))
                log._order.append(("step", record))
            elif kind == "loss":
                steps = [int(s) for s in entry["steps"]]
                values = [number_from_json(v) for v in entry["values"]]
                if len(steps) != len(values):
                    raise ValueError("steps and values differ in length")
                log.losses.extend(zip(steps, values))
                log._order.append(("loss", steps, values))
            elif kind == "flight":
                log._order.append(("flight", FlightLog.from_json(entry["log"])))
            elif kind == "diagnosis":
                Diagnosis.from_dict(entry["diagnosis"])
                log.events.append(entry)
            elif kind == "end":
                log.ended = True
            else:
                raise ValueError(f"unknown entry type {kind!r}")
        except (KeyError, TypeError, ValueError) as err:
            problems.append(LogProblem(number, f"unreadable {kind} entry ({err})"[:200]))
    log.losses.sort()
    return log
