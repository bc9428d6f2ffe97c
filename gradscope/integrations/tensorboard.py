"""TensorBoard: per-layer gradient norms, update ratios, dead/saturated units and diagnoses.

Live, while training (a sink fed on every recorded step)::

    from gradscope.integrations.tensorboard import TensorBoardExporter
    scope = gradscope.watch(model, optimizer)
    TensorBoardExporter("runs/exp1").attach(scope)     # or TensorBoardExporter(writer)

After training, from the history::

    from gradscope.integrations.tensorboard import export
    export(scope, "runs/exp1")

Tags: `gradscope/loss`, `gradscope/grad_norm_total`, `gradscope/warnings`,
`grad_norm/<layer>`, `update_ratio/<layer>`, `dead_units/<module>`, `saturated/<module>`
(fractions), and a text entry `gradscope/diagnosis/<sign>` for each new or changed diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GradscopeError
from ..signals.distributed import is_rank_zero

if TYPE_CHECKING:
    from ..diagnosis import Diagnosis
    from ..history import StepRecord
    from ..layout import ModelLayout
    from ..scope import Scope


def _open_writer(target: Any) -> tuple[Any, bool]:
    """A SummaryWriter for a directory (owned, closed by us) or the writer given (not owned)."""
    if isinstance(target, (str, Path)):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "writing TensorBoard logs needs the tensorboard package; install it with "
                "`pip install 'torch-gradscope[tensorboard]'` (or `pip install tensorboard`)."
            ) from err
        return SummaryWriter(log_dir=str(target)), True
    if not (hasattr(target, "add_scalar") and hasattr(target, "add_text")):
        raise GradscopeError(
            f"TensorBoardExporter needs a log directory or a SummaryWriter, got "
            f"{type(target).__name__}; pass e.g. 'runs/exp1' or SummaryWriter('runs/exp1')."
        )
    return target, False


def _tag(name: str) -> str:
    return name if name else "(root)"


def _diagnosis_text(d: Diagnosis) -> str:
    lines = [f"**{d.severity}: {d.title}** (`{d.sign}`), steps {d.first_step}-{d.last_step}"]
    if d.summary:
        lines.append(d.summary)
    if d.causes:
        lines.append("Causes: " + ", ".join(f"`{c.id}` ({c.likelihood:.2f})" for c in d.causes))
    if d.layers:
        lines.append("Layers: " + ", ".join(f"`{name}`" for name in d.layers[:12]))
    lines.extend(f"- {check}" for check in d.checks)
    return "\n\n".join(lines)


class TensorBoardExporter:
    """Writes gradscope's signals to TensorBoard; feed it a Scope with `attach(scope)`.

    Only rank 0 writes under torch.distributed (`all_ranks=True` writes on every rank).

    Example:
        >>> import torch, gradscope, tempfile
        >>> model = torch.nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
        >>> scope = gradscope.watch(model, opt, every=1)
        >>> exporter = TensorBoardExporter(tempfile.mkdtemp()).attach(scope)
        >>> loss = model(torch.randn(4, 3)).pow(2).mean(); loss.backward(); opt.step()
        >>> scope.step(loss); scope.close()
    """

    def __init__(self, writer_or_log_dir: Any, all_ranks: bool = False) -> None:
        self._active = all_ranks or is_rank_zero()
        self._writer: Any = None
        self._owned = False
        if self._active:
            self._writer, self._owned = _open_writer(writer_or_log_dir)
        self._layout: ModelLayout | None = None
        self._current: Callable[[], list[Diagnosis]] = list

    @property
    def writer(self) -> Any:
        return self._writer

    def attach(self, scope: Scope) -> TensorBoardExporter:
        """Write every recorded step of `scope` from now on; return self."""
        self._layout = scope.layout
        self._current = scope.diagnoser.diagnoses  # as of the rules' last run: runs none
        if self._active:
            scope.add_sink(self)
        return self

    # ------------------------------------------------------------------ sink protocol
    def on_record(self, record: StepRecord, diagnoses: Sequence[Diagnosis]) -> None:
        """Write one recorded step (called by the Scope)."""
        if self._writer is None or self._layout is None:
            return
        self.write_record(record, self._layout)
        active = self._current()  # the counts as of the rules' last run (see RuleCadence)
        self._writer.add_scalar("gradscope/warnings",
                                sum(d.severity in ("warning", "error") for d in active),
                                record.step)
        self.write_diagnoses(diagnoses, record.step)

    def on_diagnoses(self, step: int, diagnoses: Sequence[Diagnosis]) -> None:
        """Diagnoses found outside a recorded step (the rules catching up at close)."""
        if self._writer is not None:
            self.write_diagnoses(diagnoses, step)

    def on_close(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        if self._owned:
            self._writer.close()

    # ------------------------------------------------------------------ writing
    def write_record(self, record: StepRecord, layout: ModelLayout) -> None:
        """Write the scalars of one recorded step at `record.step`."""
        w, step = self._writer, record.step
        if w is None:
            return
        if math.isfinite(record.loss):
            w.add_scalar("gradscope/loss", record.loss, step)
        total = record.total_grad_norm()
        if not math.isnan(total):
            w.add_scalar("gradscope/grad_norm_total", total, step)
        for name, value in zip(layout.layers, record.layer_grad_norm(layout)):
            if not np.isnan(value):
                w.add_scalar(f"grad_norm/{_tag(name)}", float(value), step)
        for name, value in zip(layout.layers, record.layer_update_ratio(layout)):
            if not np.isnan(value):
                w.add_scalar(f"update_ratio/{_tag(name)}", float(value), step)
        for name, stats in record.activations.items():
            if stats.dead_frac is not None:
                w.add_scalar(f"dead_units/{_tag(name)}", float(stats.dead_frac), step)
            if stats.saturated_frac is not None:
                w.add_scalar(f"saturated/{_tag(name)}", float(stats.saturated_frac), step)

    def write_diagnoses(self, diagnoses: Sequence[Diagnosis], step: int | None = None) -> None:
        """Write each diagnosis as text under `gradscope/diagnosis/<sign>`."""
        if self._writer is None:
            return
        for d in diagnoses:
            self._writer.add_text(f"gradscope/diagnosis/{d.sign}", _diagnosis_text(d),
                                  d.last_step if step is None else step)


def export(scope: Scope, writer_or_log_dir: Any) -> TensorBoardExporter:
    """Write a scope's whole history and its diagnoses to TensorBoard (after training too).

    Example:
        >>> import torch, gradscope, tempfile
        >>> model = torch.nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
        >>> with gradscope.watch(model, opt, every=1) as scope:
        ...     loss = model(torch.randn(4, 3)).pow(2).mean(); loss.backward(); opt.step()
        ...     scope.step(loss)
        >>> _ = export(scope, tempfile.mkdtemp())
    """
    exporter = TensorBoardExporter(writer_or_log_dir)
    if exporter.writer is None:
        return exporter
    for record in scope.history.records():
        exporter.write_record(record, scope.layout)
    exporter.write_diagnoses(scope.diagnose())
    exporter.on_close()
    return exporter


__all__ = ["TensorBoardExporter", "export"]
