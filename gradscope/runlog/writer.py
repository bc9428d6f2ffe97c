"""Writing the run log: one line per event, each on disk once written."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..diagnosis import Diagnosis
from ..errors import GradscopeError
from ..history import History, StepRecord
from ..layout import ModelLayout

if TYPE_CHECKING:
    pass

from .encoding import (
    LOG_NAME,
    SCHEMA,
    encode_record,
    json_number,
    jsonable,
)


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
                                    "values": [json_number(v) for v in values]},
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
