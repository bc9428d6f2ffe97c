"""How the run log writes values: JSON-safe numbers, per-parameter arrays, records.

See the package docstring for the lines of a log."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..history import StepRecord
from ..records import ActivationStats, ActivationTable, DataStats, FlightLog, OutputStats

if TYPE_CHECKING:
    pass


SCHEMA = 1
LOG_NAME = "gradscope.jsonl"


# ----------------------------------------------------------------------------- encoding
def json_number(value: float) -> float | str:
    """A float as strict JSON allows it: non-finite values as "nan", "inf", "-inf".

    Example:
        >>> json_number(float("inf")), json_number(0.5)
        ('inf', 0.5)
    """
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def number_from_json(value: Any) -> float:
    """The float json_number() wrote (None, from a null in an array, is NaN).

    Example:
        >>> number_from_json("-inf"), number_from_json(None)
        (-inf, nan)
    """
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
        return json_number(float(value))
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
    return np.array([number_from_json(v) for v in values], dtype=np.float64)


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
            values[f.name] = None if raw is None else number_from_json(raw)
        else:
            values[f.name] = number_from_json(raw)
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
            values[f.name] = number_from_json(raw)
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
        elif f.name == "output":
            values[f.name] = OutputStats.from_json(raw)
        elif f.name == "loss":
            values[f.name] = number_from_json(raw)
        elif f.name == "lrs":
            values[f.name] = [number_from_json(v) for v in raw]
        else:
            values[f.name] = raw
    return StepRecord(**values)


#: Boolean per-parameter arrays, for logs that lack one of them.
_BOOL_ARRAYS = {"grad_none", "not_in_optimizer", "requires_grad"}


# ----------------------------------------------------------------------------- writer
