"""What the reporters read: per-layer rows, the loss summary, and the text helpers (number
and name folding, sparklines) that the live view, the report and the plots share.

Nothing here draws; the live view, the report and the plots read the same numbers from here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..diagnosis import Diagnosis, by_severity
from ..history import History, StepRecord
from ..layout import ModelLayout
from ..numbers import fmt as fmt  # the one number style, for the reporters

#: Update/weight ratio around which training usually moves at a healthy pace.
UPDATE_RATIO_REFERENCE = 1e-3
#: The band drawn around that reference (one decade either side).
UPDATE_RATIO_BAND = (1e-4, 1e-2)

SPARK_CHARS = "▁▂▃▄▅▆▇█"


def fmt_frac(value: float | None) -> str:
    """A fraction as a percentage ('-' when not measured).

    Example:
        >>> fmt_frac(0.5), fmt_frac(None), fmt_frac(0.0004)
        ('50%', '-', '<1%')
    """
    if value is None or math.isnan(value):
        return "-"
    if 0 < value < 0.01:
        return "<1%"
    return f"{value * 100:.0f}%"


def fold_name(name: str, width: int = 28) -> str:
    """Shorten a qualified module name to `width` characters, keeping its head and tail.

    Example:
        >>> fold_name("transformer.h.11.mlp.c_proj", 20)
        'tran…h.11.mlp.c_proj'
    """
    name = name or "(root)"
    if len(name) <= width:
        return name
    tail = max(width * 3 // 4, 1)
    head = max(width - tail - 1, 0)
    return name[:head] + "…" + name[-tail:]


def fold_list(names: Sequence[str], limit: int = 8) -> str:
    """Names joined by ', ', cut after `limit` with how many were left out.

    Example:
        >>> fold_list(["a", "b", "c"], limit=2)
        'a, b … (+1 more)'
    """
    names = [n or "(root)" for n in names]
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" … (+{len(names) - limit} more)"


def sparkline(values: Iterable[float], width: int = 24) -> str:
    """A one-line trend of the last values (bucketed to `width`); '×' marks NaN/Inf.

    Example:
        >>> sparkline([3, 2, 1, 0])
        '█▆▃▁'
    """
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return ""
    if data.size > width:
        edges = np.linspace(0, data.size, width + 1).astype(int)
        buckets = [data[a:b] for a, b in itertools.pairwise(edges) if b > a]
        data = np.array([b.mean() if np.isfinite(b).all() else np.nan for b in buckets])
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return "×" * data.size
    low, high = float(finite.min()), float(finite.max())
    span = high - low
    out = []
    for v in data:
        if not np.isfinite(v):
            out.append("×")
        elif span <= 0:
            out.append(SPARK_CHARS[len(SPARK_CHARS) // 2])
        else:
            out.append(SPARK_CHARS[round((v - low) / span * (len(SPARK_CHARS) - 1))])
    return "".join(out)


def log_bar(value: float, low: float, high: float, width: int = 12) -> str:
    """A bar whose length is log10(value) placed between log10(low) and log10(high).

    Example:
        >>> log_bar(1e-2, 1e-4, 1.0, width=4)
        '██'
    """
    if not (np.isfinite(value) and value > 0 and low > 0 and high > low):
        return ""
    position = (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low))
    eighths = round(min(max(position, 0.0), 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    bar = "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")
    return bar or "▏"


def severity_sorted(diagnoses: Iterable[Diagnosis]) -> list[Diagnosis]:
    """Most severe first, then the earliest."""
    return by_severity(diagnoses)


def _static(layout: ModelLayout, key: str, compute):
    """A value derived once per layout (layouts never change)."""
    static = getattr(layout, "static", None)
    return static(key, compute) if static is not None else compute()


def activation_owners(layout: ModelLayout) -> dict[str, int]:
    """For every module, the parameter layer it belongs to: itself, or the nearest before it."""

    def compute() -> dict[str, int]:
        layers = {name: i for i, name in enumerate(layout.layers)}
        owners: dict[str, int] = {}
        current: int | None = None
        for name in layout.module_names:
            if name in layers:
                owners[name] = layers[name]
                if name != "":
                    current = layers[name]
            elif current is not None:
                owners[name] = current
        return owners

    return _static(layout, "report.activation_owners", compute)


def activation_owner(layout: ModelLayout, module: str) -> int | None:
    """The parameter layer an activation module belongs to: the nearest one before it.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> activation_owner(ModelLayout.of(m), "1")
        0
    """
    return activation_owners(layout).get(module)


def layer_param_names(layout: ModelLayout) -> list[set[str]]:
    """The qualified parameter names of every layer."""

    def compute() -> list[set[str]]:
        out: list[set[str]] = [set() for _ in layout.layers]
        for info, layer in zip(layout.params, layout.param_layer):
            out[layer].add(info.name)
        return out

    return _static(layout, "report.layer_param_names", compute)


def activation_fractions(layout: ModelLayout, record: StepRecord | None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(dead, saturated) fraction per layer from the activation modules that follow each layer.

    NaN where the layer has no such activation (or none was measured at this step).
    """
    n = len(layout.layers)
    dead = np.full(n, np.nan)
    saturated = np.full(n, np.nan)
    if record is None:
        return dead, saturated
    for name, stats in record.activations.items():
        if stats.dead_frac is None and stats.saturated_frac is None:
            continue
        owner = activation_owner(layout, name)
        if owner is None:
            continue
        if stats.dead_frac is not None:
            dead[owner] = np.fmax(dead[owner], stats.dead_frac)
        if stats.saturated_frac is not None:
            saturated[owner] = np.fmax(saturated[owner], stats.saturated_frac)
    return dead, saturated


def layer_numel(layout: ModelLayout) -> np.ndarray:
    """Number of elements of every layer (all its parameters together)."""
    out = np.zeros(len(layout.layers))
    for info, layer in zip(layout.params, layout.param_layer):
        out[layer] += info.numel
    return out


def layer_grad_max(layout: ModelLayout, record: StepRecord) -> np.ndarray:
    """Largest |grad| per layer (NaN when none of its parameters was measured)."""
    out = np.full(len(layout.layers), np.nan)
    for value, layer in zip(record.grad_max, layout.param_layer):
        if not np.isnan(value):
            out[layer] = np.fmax(out[layer], value)
    return out


def layer_update_ratio(layout: ModelLayout, record: StepRecord) -> np.ndarray:
    """|Δw| / |w| of each layer as a whole: the tensors' sampled ratios weighted by their norms.

    A zero-initialised bias has a huge ratio of its own; weighting by the norm keeps it from
    hiding a weight matrix that does not move. NaN where no ratio was measured. This is
    `StepRecord.layer_update_ratio`, the number the rules read.

    Example:
        >>> import torch
        >>> layout = ModelLayout.of(torch.nn.Linear(2, 2))
        >>> r = StepRecord(0, 1.0, True, False, [], *[np.zeros(2)] * 4,
        ...                np.array([3.0, 0.1]), np.array([1e-3, 1.0]), *[np.zeros(2)] * 3,
        ...                np.ones(2, bool), 1, True)
        >>> round(float(layer_update_ratio(layout, r)[0]), 4)
        0.0333
    """
    return record.layer_update_ratio(layout)


@dataclass(frozen=True)
class LayerRow:
    """One layer's numbers at one recorded step."""

    index: int
    name: str
    kind: str
    grad_norm: float
    update_ratio: float
    dead: float
    saturated: float
    flagged: bool


def layer_rows(history: History, record: StepRecord | None,
               diagnoses: Sequence[Diagnosis] = ()) -> list[LayerRow]:
    """Every layer's row at `record`, in model order."""
    layout = history.layout
    n = len(layout.layers)
    if record is None:
        nan = np.full(n, np.nan)
        grad, ratio, dead, sat = nan, nan, nan, nan
    else:
        grad = record.layer_grad_norm(layout)
        ratio = layer_update_ratio(layout, record)
        dead, sat = activation_fractions(layout, record)
    involved = {name for d in diagnoses for name in d.layers}
    names = layer_param_names(layout)
    rows = []
    for i, name in enumerate(layout.layers):
        params = names[i]
        rows.append(LayerRow(
            index=i, name=name or "(root)", kind=layout.module_types.get(name, ""),
            grad_norm=float(grad[i]), update_ratio=float(ratio[i]), dead=float(dead[i]),
            saturated=float(sat[i]),
            flagged=(name or "(root)") in involved or bool(params & involved),
        ))
    return rows


def offender_score(row: LayerRow, median_grad: float) -> float:
    """How unusual a layer looks (0 = ordinary); diagnosed layers always rank first."""
    score = 0.0
    if row.flagged:
        score += 100.0
    if np.isfinite(row.grad_norm) and row.grad_norm > 0 and median_grad > 0:
        score = score + abs(math.log10(row.grad_norm / median_grad)) / 2
    elif row.grad_norm == 0 or (not np.isnan(row.grad_norm) and np.isinf(row.grad_norm)):
        score += 50.0
    if np.isfinite(row.update_ratio) and row.update_ratio > 0:
        score += abs(math.log10(row.update_ratio / UPDATE_RATIO_REFERENCE)) / 4
    for frac in (row.dead, row.saturated):
        if np.isfinite(frac):
            score += 3 * frac
    return score


def fold_rows(rows: list[LayerRow], limit: int) -> tuple[list[LayerRow], int]:
    """At most `limit` rows, in model order, and how many were cut: the first and last layer
    (for scale) and the top offenders (diagnosed layers first, then the most unusual)."""
    if len(rows) <= limit:
        return rows, 0
    grads = np.array([r.grad_norm for r in rows])
    positive = grads[np.isfinite(grads) & (grads > 0)]
    median = float(np.median(positive)) if positive.size else 0.0
    ends = [rows[0], rows[-1]] if limit >= 4 else []
    rest = [r for r in rows if r not in ends]
    ranked = sorted(rest, key=lambda r: (-offender_score(r, median), r.index))
    chosen = ends + ranked[: limit - len(ends)]
    return sorted(chosen, key=lambda r: r.index), len(rows) - limit


def loss_summary(history: History) -> dict[str, tuple[int, float] | None]:
    """First, last and best (lowest finite) loss with their steps; None when unknown. With
    NaN/Inf losses also "last finite" and "first non-finite"."""
    steps, values = history.losses()
    if not np.any(~np.isnan(values)) and not _losses_given(history, steps.size):
        return {"first": None, "last": None, "best": None}
    # NaN is a NaN loss once a loss was passed (a recorded step without one also logs NaN)
    finite = np.isfinite(values)
    best = None
    if finite.any():
        i = int(np.argmin(np.where(finite, values, np.inf)))
        best = (int(steps[i]), float(values[i]))
    summary = {"first": (int(steps[0]), float(values[0])),
               "last": (int(steps[-1]), float(values[-1])), "best": best}
    if not finite.all():
        bad = np.flatnonzero(~finite)
        summary["first non-finite"] = (int(steps[bad[0]]), float(values[bad[0]]))
        if finite.any():
            i = int(np.flatnonzero(finite)[-1])
            summary["last finite"] = (int(steps[i]), float(values[i]))
    return summary


def _losses_given(history: History, count: int) -> bool:
    """Whether NaN losses were passed to step() (not left out): a recorded step knows if a
    loss tensor was given; a loss held for a step that was not recorded was given."""
    records = history.records()
    return count > len(records) or any(r.loss_requires_grad is not None for r in records)


def total_steps(history: History) -> int:
    """How many training steps the history covers (from the losses and the records)."""
    steps, _ = history.losses()
    last = history.last
    candidates = [int(steps.max()) + 1] if steps.size else []
    if last is not None:
        candidates.append(last.step + 1)
    return max(candidates, default=0)


def record_at(history: History, step: int | None) -> StepRecord | None:
    """The recorded step at or just before `step` (the last one when `step` is None)."""
    records = history.records()
    if not records:
        return None
    if step is None:
        return records[-1]
    earlier = [r for r in records if r.step <= step]
    return earlier[-1] if earlier else records[0]


def unmeasured_signals(history: History) -> list[str]:
    """The signals this run could not measure at all, each with the reason: named once in
    the report rather than silently missing.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> unmeasured_signals(History(ModelLayout.of(model)))
        []
    """
    records = history.records()
    if not records:
        return []
    missing = []
    if all(not len(r.activations) for r in records):
        missing.append("activations (dead and saturated units, where NaN/Inf began): none "
                       "recorded (activations=False, or compiled code, which runs no module "
                       "hooks)")
    if all(r.data is None for r in records):
        missing.append("input batches: no tensor reached the forward of the watched model in "
                       "training mode (its parts called directly, or trained in eval mode)")
    stepped = [r for r in records[1:] if r.stepped]
    if stepped and all(np.isnan(r.stale_grad).all() for r in stepped):
        missing.append("leftover gradients (a missing zero_grad()): no backward went through "
                       "the output of the watched model's forward")
    if all(not r.stepped for r in records):
        missing.append("update sizes and frozen parameters: no optimizer step was seen (pass "
                       "the optimizer to watch())")
    return missing
