"""The run log: an append-only JSON-lines file written while training runs, and its reader.

Every line is one JSON object with a "type":

- ``header``: schema version, the model layout, the watch options, the record fields;
- ``step``: one recorded step (every StepRecord field);
- ``loss``: the losses of steps that were not recorded;
- ``diagnosis``: a diagnosis that is new or changed at a step;
- ``end``: written by ``close()``; its absence means the run stopped early.

Each line goes to the file in one ``os.write`` call, so a run that is killed leaves a log
that reads back up to its last complete line. Non-finite numbers are stored as the strings
"nan", "inf" and "-inf" (NaN inside per-parameter arrays as null); per-parameter float arrays
keep float32 precision, which is what the on-device statistics have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._version import __version__
from .diagnosis import Diagnosis
from .errors import GradscopeError
from .history import History, StepRecord
from .layout import ModelLayout, ParamInfo
from .records import ActivationStats, ActivationTable, DataStats, FlightLog

if TYPE_CHECKING:
    from .rules.engine import RuleEngine

SCHEMA = 1
LOG_NAME = "gradscope.jsonl"


# ----------------------------------------------------------------------------- encoding
def _float(value: float) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _unfloat(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return float(value)  # "nan", "inf", "-inf"
    return float(value)


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of `value` (numpy scalars and arrays, non-finite floats, tuples).

    Example:
        >>> jsonable({"a": np.float32(1.5), "b": [float("inf")], "c": (1, None)})
        {'a': 1.5, 'b': ['inf'], 'c': [1, None]}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return _float(float(value))
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return getattr(value, "id", None) or str(value)


def _array_kind(array: np.ndarray) -> str:
    if array.dtype == np.bool_:
        return "bool[]"
    if np.issubdtype(array.dtype, np.integer):
        return "int[]"
    return "float[]"


def _encode_array(array: np.ndarray) -> str:
    """The JSON text of a per-parameter array (float32 shortest digits, NaN as null)."""
    kind = _array_kind(array)
    if kind == "bool[]":
        return "[" + ",".join("1" if v else "0" for v in array.tolist()) + "]"
    if kind == "int[]":
        return json.dumps(array.tolist())
    items = []
    for v in array.astype(np.float32):
        if v != v:
            items.append("null")
        elif v in (np.inf, -np.inf):
            items.append('"inf"' if v > 0 else '"-inf"')
        elif v == 0:
            items.append("0")
        else:
            items.append(str(v))
    return "[" + ",".join(items) + "]"


def _short(value: Any) -> str:
    """One value of an activation row: float32 digits, "nan"/"inf" strings, null for None."""
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = np.float32(value)
    if v != v:
        return '"nan"'
    if v in (np.inf, -np.inf):
        return '"inf"' if v > 0 else '"-inf"'
    return "0" if v == 0 else str(v)


def _decode_array(values: list[Any], kind: str) -> np.ndarray:
    if kind == "bool[]":
        return np.array([bool(v) for v in values], dtype=bool)
    if kind == "int[]":
        return np.array(values, dtype=np.int64)
    return np.array([_unfloat(v) for v in values], dtype=np.float64)


ACTIVATION_FIELDS = [f.name for f in dataclasses.fields(ActivationStats)]


def _encode_activations(stats: ActivationTable, modules: dict[str, int]) -> str:
    """Module statistics as rows: [module index (or name), one value per field]."""
    rows = []
    for name, st in stats.items():
        key = str(modules[name]) if name in modules else json.dumps(name)
        rows.append("[" + ",".join([key] + [_short(getattr(st, f)) for f in ACTIVATION_FIELDS])
                    + "]")
    return ('{"fields":' + json.dumps(ACTIVATION_FIELDS, separators=(",", ":"))
            + ',"rows":[' + ",".join(rows) + "]}")


def _decode_activations(raw: dict[str, Any], module_names: list[str]) -> ActivationTable:
    names = raw["fields"]
    out = {}
    for row in raw["rows"]:
        key = row[0]
        name = module_names[key] if isinstance(key, int) else str(key)
        out[name] = _activation_from_json(dict(zip(names, row[1:])))
    return ActivationTable.of(out)


def _activation_from_json(data: dict[str, Any]) -> ActivationStats:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ActivationStats):
        raw = data.get(f.name)
        if f.name in ("input_nonfinite", "calls", "order"):
            values[f.name] = int(raw) if raw is not None else 0
        elif f.name == "leaf":
            values[f.name] = bool(raw)
        elif f.name in ("saturated_frac", "dead_frac"):
            values[f.name] = None if raw is None else _unfloat(raw)
        else:
            values[f.name] = _unfloat(raw)
    return ActivationStats(**values)


def _data_from_json(data: dict[str, Any] | None) -> DataStats | None:
    if data is None:
        return None
    values: dict[str, Any] = {}
    for f in dataclasses.fields(DataStats):
        raw = data.get(f.name)
        if f.name == "shape":
            values[f.name] = tuple(int(v) for v in (raw or ()))
        elif f.name in ("dtype",):
            values[f.name] = str(raw)
        elif f.name == "nonfinite":
            values[f.name] = int(raw or 0)
        elif f.name == "is_float":
            values[f.name] = bool(raw)
        else:
            values[f.name] = _unfloat(raw)
    return DataStats(**values)


def _is_array_field(f: dataclasses.Field) -> bool:
    return "ndarray" in str(f.type)


def encode_record(record: StepRecord, modules: dict[str, int] | None = None) -> str:
    """One "step" line (without the newline); "_bool" names the boolean arrays.

    Example:
        >>> r = StepRecord(0, 1.0, True, False, [0.1], *[np.zeros(1)] * 9, np.ones(1, bool),
        ...                1, True)
        >>> json.loads(encode_record(r))["grad_norm"]
        [0]
    """
    parts = ['"type":"step"']
    bools = []
    for f in dataclasses.fields(record):
        if f.name.startswith("_"):
            continue
        value = getattr(record, f.name)
        if isinstance(value, np.ndarray):
            if value.dtype == np.bool_:
                bools.append(f.name)
            text = _encode_array(value)
        elif f.name == "activations":
            text = _encode_activations(value, modules or {})
        elif f.name == "flight":
            text = json.dumps(value.to_json() if value is not None else None,
                              separators=(",", ":"))
        else:
            text = json.dumps(jsonable(value), separators=(",", ":"))
        parts.append(f'"{f.name}":{text}')
    parts.append('"_bool":' + json.dumps(bools, separators=(",", ":")))
    return "{" + ",".join(parts) + "}"


def decode_record(data: dict[str, Any], n_params: int, module_names: list[str] | None = None
                  ) -> StepRecord:
    """Rebuild a StepRecord from a "step" line; fields the log lacks get neutral values."""
    bools = set(data.get("_bool") or ())
    values: dict[str, Any] = {}
    for f in dataclasses.fields(StepRecord):
        if f.name.startswith("_"):
            continue
        has_default = (f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING)
        if f.name not in data:
            if has_default:
                continue
            if _is_array_field(f):
                values[f.name] = (np.zeros(n_params, dtype=bool) if f.name in _BOOL_ARRAYS
                                  else np.full(n_params, np.nan))
            else:
                values[f.name] = None
            continue
        raw = data[f.name]
        if _is_array_field(f):
            if not isinstance(raw, list):
                raise ValueError(f"{f.name} is not a list")
            kind = "bool[]" if f.name in bools else "float[]"
            values[f.name] = _decode_array(raw, kind)
        elif f.name == "activations":
            values[f.name] = (_decode_activations(raw, module_names or []) if raw
                              else ActivationTable.empty())
        elif f.name == "data":
            values[f.name] = _data_from_json(raw)
        elif f.name == "flight":
            values[f.name] = FlightLog.from_json(raw) if isinstance(raw, dict) else None
        elif f.name == "loss":
            values[f.name] = _unfloat(raw)
        elif f.name == "lrs":
            values[f.name] = [_unfloat(v) for v in raw]
        else:
            values[f.name] = raw
    return StepRecord(**values)


#: Boolean per-parameter arrays, for logs that lack one of them.
_BOOL_ARRAYS = {"grad_none", "not_in_optimizer", "requires_grad"}


# ----------------------------------------------------------------------------- writer
class RunLogWriter:
    """Appends the run log line by line; each line is on disk (in the OS) once written.

    Example:
        >>> import tempfile, torch
        >>> layout = ModelLayout.of(torch.nn.Linear(2, 2))
        >>> writer = RunLogWriter(tempfile.mkdtemp(), layout, {"every": 1})
        >>> writer.path.name
        'gradscope.jsonl'
        >>> writer.close()
    """

    def __init__(self, log_dir: str | Path, layout: ModelLayout, options: dict[str, Any],
                 history: History | None = None, name: str = LOG_NAME) -> None:
        directory = Path(log_dir)
        if directory.exists() and not directory.is_dir():
            raise GradscopeError(
                f"log_dir={str(log_dir)!r} is a file; pass a directory for the run log "
                "(it is created if missing).")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.layout = layout
        self.options = options
        self.history = history
        self._loss_upto = -1
        self._seen: set[str] = set()
        self._modules = {name: i for i, name in enumerate(layout.module_types)}
        self._header()

    def _write(self, text: str) -> None:
        if self._fd is None:
            return
        data = (text + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _header(self) -> None:
        self._write(json.dumps({
            "type": "header", "schema": SCHEMA, "gradscope": __version__,
            "time": round(time.time(), 3), "layout": self.layout.summary(),
            "options": jsonable(self.options),
        }, separators=(",", ":")))

    def _new_losses(self, exclude: int | None) -> tuple[list[int], list[float]]:
        if self.history is None:
            return [], []
        steps, values = self.history.loss_steps, self.history.loss_values
        out_s: list[int] = []
        out_v: list[float] = []
        i = len(steps) - 1
        while i >= 0 and steps[i] > self._loss_upto:
            if steps[i] != exclude:
                out_s.append(int(steps[i]))
                out_v.append(values[i])
            i -= 1
        if len(steps):
            self._loss_upto = max(self._loss_upto, int(steps[-1]))
        return out_s[::-1], out_v[::-1]

    def _write_losses(self, exclude: int | None = None) -> None:
        steps, values = self._new_losses(exclude)
        if steps:
            self._write(json.dumps({"type": "loss", "steps": steps,
                                    "values": [_float(v) for v in values]},
                                   separators=(",", ":")))

    def on_record(self, record: StepRecord, changed: Sequence[Diagnosis]) -> None:
        self._write_losses(exclude=record.step)
        self._loss_upto = max(self._loss_upto, record.step)
        self._write(encode_record(record, self._modules))
        self.on_diagnoses(record.step, changed)

    def on_diagnoses(self, step: int, changed: Sequence[Diagnosis]) -> None:
        """Write diagnosis events (new or changed) as of `step`."""
        if self._fd is None:
            return
        for d in changed:
            key = d.rule or d.sign
            event = "changed" if key in self._seen else "new"
            self._seen.add(key)
            self._write(json.dumps({"type": "diagnosis", "step": step, "event": event,
                                    "diagnosis": jsonable(d.to_dict())},
                                   separators=(",", ":")))

    def on_close(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self._write_losses()
            tail = self.history.flight_tail if self.history is not None else None
            if tail is not None:
                self._write(json.dumps({"type": "flight", "log": jsonable(tail.to_json())},
                                       separators=(",", ":")))
            self._write(json.dumps({"type": "end", "steps": self._loss_upto + 1,
                                    "time": round(time.time(), 3)}))
        finally:
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- reader
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
        from .diagnoser import Diagnoser

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
    return ModelLayout(params=params, tensors=[], layers=layers,
                       param_layer=[index[p.layer] for p in params],
                       module_names=list(module_types), module_types=module_types)


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
                values = [_unfloat(v) for v in entry["values"]]
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
