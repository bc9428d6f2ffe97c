"""The saved figure: gradient norms over time, gradient flow, update ratios, dead/saturated units
and the loss with the steps where findings began. Drawn with matplotlib's Agg (no display).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..diagnosis import Diagnosis
from ..errors import GradscopeError
from ..history import History, StepRecord
from .display import SavedPlot, ShownOnce, figure_bundle, in_notebook, show_figure
from .readings import (
    UPDATE_RATIO_BAND,
    UPDATE_RATIO_REFERENCE,
    fold_name,
    layer_grad_max,
    layer_numel,
    layer_update_ratio,
    record_at,
    severity_sorted,
    total_steps,
)

FORMATS = (".png", ".svg", ".pdf")
#: Up to this many layers the norms over time are drawn as lines, above it as a heat map.
MAX_LINES = 12
#: Most tick labels on a layer axis (names are folded and thinned out beyond it).
MAX_TICKS = 40
SEVERITY_COLOR = {"error": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}

TITLES = {
    "loss": "Loss per step",
    "norms": "Gradient L2 norm per layer over recorded steps",
    "flow": "Gradient flow at step {step} (layers in model order, input → output)",
    "updates": "Update / weight ratio per layer at step {step}",
    "units": "Dead and saturated units per activation module at step {step}",
}


def common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix every name shares (e.g. 'encoder.blocks.'), '' when none.

    Example:
        >>> common_prefix(["enc.blocks.0", "enc.blocks.1.fc"])
        'enc.blocks.'
    """
    if len(names) < 2:
        return ""
    split = [name.split(".") for name in names]
    shared: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    # keep at least one component of every name
    shared = shared[: min(len(p) for p in split) - 1]
    return ".".join(shared) + "." if shared else ""


def _upright(count: int, chars: int) -> bool:
    """Whether x tick labels fit side by side unrotated."""
    return (count <= 6 and chars <= 24) or (count <= 12 and chars <= 12)


def _layer_ticks(ax: Axes, names: Sequence[str], axis: str = "x", max_ticks: int = MAX_TICKS,
                 width: int = 22) -> None:
    """Thin out and fold layer names so labels never overlap."""
    n = len(names)
    if n == 0:
        return
    every = max(1, math.ceil(n / max_ticks))
    positions = list(range(0, n, every))
    prefix = common_prefix(names)
    labels = [fold_name(names[i][len(prefix):], width) for i in positions]
    label = ax.get_xlabel() if axis == "x" else ax.get_ylabel()
    notes = []
    if prefix:
        notes.append(f"names after '{prefix}'")
    if every > 1:
        notes.append(f"1 in {every} labelled")
    if notes:
        (ax.set_xlabel if axis == "x" else ax.set_ylabel)(f"{label} ({'; '.join(notes)})")
    if axis == "x":
        upright = _upright(len(positions), max(len(t) for t in labels))
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=0 if upright else 90, fontsize=8 if upright else 7)
        ax.set_xlim(-0.6, n - 0.4)
    else:
        ax.set_yticks(positions)
        ax.set_yticklabels(labels, fontsize=7)


def _title(ax: Axes, text: str) -> None:
    # a fixed y skips matplotlib's automatic title placement, which measures every tick label
    ax.set_title(text, loc="left", fontsize=11, y=1.0, pad=6)
    ax.set_axisbelow(True)


def _bars(ax: Axes, x: np.ndarray, values: np.ndarray, width: float, bottom: float,
          color: str, label: str) -> None:
    """Bars from `bottom`; one filled outline instead of a patch per bar for long models."""
    shown = np.where(np.isfinite(values) & (values > bottom), values, bottom)
    if len(x) <= 60:
        ax.bar(x, shown - bottom, width=width, bottom=bottom, color=color, label=label)
        return
    edges = np.concatenate([x - width / 2, [x[-1] + width / 2]])
    ax.stairs(shown, edges, baseline=bottom, fill=True, color=color, label=label)


def _legend(ax: Axes) -> None:
    """The legend in the right margin, beside the panel, where it never hides data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False,
              borderaxespad=0.0)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
            color="0.4", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _positive(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values) & (values > 0)]


def draw_loss(ax: Axes, history: History, diagnoses: Sequence[Diagnosis],
              marked_step: int | None = None) -> None:
    """(e) the loss of every step held, with a vertical line where each finding began."""
    _title(ax, TITLES["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    steps, values = history.losses()
    finite = np.isfinite(values)
    if not finite.any() and np.isnan(values).all():
        # NaN alone is also how a step without a loss is stored
        _empty(ax, "no loss recorded (pass the loss to scope.step(loss))")
        return
    ax.plot(steps[finite], values[finite], color="0.2", linewidth=1.0, label="loss",
            marker="." if finite.sum() < 40 else None)
    good = values[finite]
    if good.size and good.min() > 0 and good.max() / good.min() > 100:
        ax.set_yscale("log")
    bad = ~finite
    if bad.any():
        ax.plot(steps[bad], np.full(bad.sum(), good.max() if good.size else 1.0), "x",
                color=SEVERITY_COLOR["error"], markersize=5, label="loss NaN/Inf")
    if steps.size:
        pad = max(0.5, (steps.max() - steps.min()) * 0.02)
        ax.set_xlim(steps.min() - pad, steps.max() + pad)
    for d in severity_sorted(diagnoses):
        ax.axvline(d.first_step, color=SEVERITY_COLOR.get(d.severity, "0.5"), linestyle="--",
                   linewidth=1.2, label=f"{d.sign} from step {d.first_step}")
    if marked_step is not None:
        ax.axvline(marked_step, color="0.6", linestyle=":", linewidth=1)
    ax.grid(alpha=0.3)
    _legend(ax)


def _norm_matrix(history: History, records: list[StepRecord]) -> np.ndarray:
    """[layers x records] gradient L2 norm per layer."""
    if not records:
        return np.zeros((len(history.layout.layers), 0))
    return np.column_stack([r.layer_grad_norm(history.layout) for r in records])


def draw_norms(ax: Axes, history: History, records: list[StepRecord], fig: Figure,
               marked_step: int | None = None) -> None:
    """(a) gradient norm per layer over the recorded steps: lines when few, a heat map else."""
    layout = history.layout
    _title(ax, TITLES["norms"])
    ax.set_xlabel("step")
    names = [name or "(root)" for name in layout.layers]
    norms = _norm_matrix(history, records)
    positive = _positive(norms)
    if not records or (positive.size == 0 and not (norms == 0).any()):
        _empty(ax, "no gradients recorded")
        return
    steps = np.array([r.step for r in records])
    if len(names) <= MAX_LINES:
        floor = positive.min() / 10 if positive.size else 1e-12
        ceiling = positive.max() * 10 if positive.size else 1.0
        palette = _cmap("tab10")
        for i, name in enumerate(names):
            row = norms[i]
            shown = np.where(row == 0, floor, np.where(np.isinf(row), np.nan, row))
            label = fold_name(name, 24)
            if np.isnan(row).all():
                label += " (no gradient)"
            few = np.isfinite(shown).sum() < 40
            ax.plot(steps, shown, marker="." if few else None, linewidth=1.2,
                    color=palette(i % 10), linestyle="-" if i < 10 else "--", label=label)
        blown = np.isinf(norms).any(axis=0)
        if blown.any():
            ax.plot(steps[blown], np.full(blown.sum(), ceiling), "x",
                    color=SEVERITY_COLOR["error"], markersize=5, label="NaN/Inf gradient")
        ax.set_yscale("log")
        ax.set_ylabel("gradient L2 norm (log)")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False,
                  title="layer (input → output)", title_fontsize=7)
        if (norms == 0).any():
            ax.axhline(floor, color=SEVERITY_COLOR["error"], linewidth=0.8, linestyle=":")
            ax.text(steps[0], floor, " zero gradient", color=SEVERITY_COLOR["error"],
                    fontsize=7, va="bottom")
        ax.grid(alpha=0.3, which="major")
    else:
        edges = _edges(steps)
        low = positive.min() if positive.size else 1e-12
        high = positive.max() if positive.size else 1.0
        if high <= low:
            high = low * 10
        cmap = _cmap("viridis").with_extremes(bad="#dddddd", under="black", over="#d62728")
        values = np.where(norms == 0, low / 10, np.where(np.isinf(norms), high * 10, norms))
        masked = np.ma.masked_invalid(values)
        mesh = ax.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, masked,
                             cmap=cmap, norm=LogNorm(vmin=low, vmax=high), shading="flat")
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_ylabel("layer (model order)")
        _layer_ticks(ax, names, axis="y", max_ticks=30)
        box = ax.get_position()
        cax = fig.add_axes((box.x1 + 0.01, box.y0, 0.012, box.height))
        zeros, blown = bool((norms == 0).any()), bool(np.isinf(norms).any())
        extend = {(True, True): "both", (True, False): "min", (False, True): "max"}
        bar = fig.colorbar(mesh, cax=cax, extend=extend.get((zeros, blown), "neither"))
        bar.set_label("gradient L2 norm (black: 0, red: NaN/Inf, grey: not measured)",
                      fontsize=8)
    if marked_step is not None:
        ax.axvline(marked_step, color="0.6", linestyle=":", linewidth=1)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _edges(steps: np.ndarray) -> np.ndarray:
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[:-1] + steps[1:]) / 2
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids,
                           [steps[-1] + (steps[-1] - mids[-1])]])


def draw_flow(ax: Axes, history: History, record: StepRecord | None,
              note: str = "") -> None:
    """(b) max and mean |grad| per layer in model order at one recorded step.

    Mean |grad| is estimated as the layer's L2 norm / sqrt(numel), i.e. the root mean square
    of its gradient entries, which is never below their mean absolute value.
    """
    layout = history.layout
    names = [name or "(root)" for name in layout.layers]
    _title(ax, TITLES["flow"].format(step=record.step if record else "-") + note)
    ax.set_xlabel("layer")
    ax.set_ylabel("|gradient| (log)")
    if record is None or not names:
        _empty(ax, "no recorded step")
        return
    norm = record.layer_grad_norm(layout)
    numel = np.maximum(layer_numel(layout), 1)
    mean = norm / np.sqrt(numel)
    peak = layer_grad_max(layout, record)
    x = np.arange(len(names))
    values = _positive(np.concatenate([mean, peak]))
    if values.size == 0:
        blown = np.isinf(record.grad_norm).any()
        _empty(ax, f"every gradient at step {record.step} is NaN/Inf" if blown
               else f"no non-zero gradient at step {record.step}")
        _layer_ticks(ax, names)
        return
    floor = values.min() / 10
    width = 0.8 if len(names) < 60 else 1.0
    _bars(ax, x, peak, width, floor, "#9ecae1", "max |grad|")
    _bars(ax, x, mean, width * 0.6 if len(x) <= 60 else width, floor, "#08519c",
          "mean |grad|\n≈ L2 norm / √numel")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    missing = ~np.isfinite(norm) | (norm == 0)
    if missing.any():
        ax.plot(x[missing], np.full(missing.sum(), floor * 1.5), "x",
                color=SEVERITY_COLOR["error"], label="zero, None or non-finite")
    _legend(ax)
    ax.grid(alpha=0.3, axis="y", which="major")
    _layer_ticks(ax, names)


def draw_updates(ax: Axes, history: History, record: StepRecord | None,
                 note: str = "") -> None:
    """(c) update/weight ratio per layer with the ~1e-3 reference band."""
    layout = history.layout
    names = [name or "(root)" for name in layout.layers]
    _title(ax, TITLES["updates"].format(step=record.step if record else "-") + note)
    ax.set_xlabel("layer")
    ax.set_ylabel("|Δw| / |w| (log)")
    if record is None or not names:
        _empty(ax, "no recorded step")
        return
    ratio = layer_update_ratio(layout, record)
    values = _positive(ratio)
    x = np.arange(len(names))
    if values.size == 0 and not (ratio == 0).any():
        _empty(ax, f"no finite update/weight ratio at step {record.step}" if record.lrs
               else "no update measured (pass the optimizer to watch())")
        _layer_ticks(ax, names)
        return
    low = min(values.min() if values.size else UPDATE_RATIO_BAND[0], UPDATE_RATIO_BAND[0])
    high = max(values.max() if values.size else UPDATE_RATIO_BAND[1], UPDATE_RATIO_BAND[1])
    ax.axhspan(*UPDATE_RATIO_BAND, color="#2ca02c", alpha=0.12,
               label=f"typical band {UPDATE_RATIO_BAND[0]:g}–{UPDATE_RATIO_BAND[1]:g}")
    ax.axhline(UPDATE_RATIO_REFERENCE, color="#2ca02c", linestyle="--", linewidth=1,
               label=f"reference {UPDATE_RATIO_REFERENCE:g}")
    ok = np.isfinite(ratio) & (ratio > 0)
    marker = "o" if len(names) <= 60 else "."
    ax.plot(x[ok], ratio[ok], marker, linestyle="", color="#1f77b4", markersize=5,
            label="|Δw| / |w| of the layer")
    frozen = ratio == 0
    if frozen.any():
        ax.plot(x[frozen], np.full(frozen.sum(), low / 3), "v", color=SEVERITY_COLOR["error"],
                label="did not change")
    ax.set_yscale("log")
    ax.set_ylim(low / 6, high * 3)
    _legend(ax)
    ax.grid(alpha=0.3, axis="y", which="major")
    _layer_ticks(ax, names)


def draw_units(ax: Axes, history: History, record: StepRecord | None,
               note: str = "") -> None:
    """(d) dead (ReLU family) and saturated (sigmoid/tanh family) fraction per module."""
    _title(ax, TITLES["units"].format(step=record.step if record else "-") + note)
    ax.set_xlabel("activation module")
    ax.set_ylabel("fraction of units")
    if record is None:
        _empty(ax, "no recorded step")
        return
    measured = [(stats.order, name, stats) for name, stats in record.activations.items()
                if stats.dead_frac is not None or stats.saturated_frac is not None]
    order = {name: i for i, name in enumerate(history.layout.module_names)}
    measured.sort(key=lambda item: (order.get(item[1], len(order)), item[0]))
    if not measured:
        _empty(ax, "no ReLU, sigmoid or tanh modules measured at this step")
        return
    types = history.layout.module_types
    names = [f"{name} ({types.get(name, '?')})" for _, name, _ in measured]
    dead = np.array([np.nan if s.dead_frac is None else s.dead_frac for _, _, s in measured])
    sat = np.array([np.nan if s.saturated_frac is None else s.saturated_frac
                    for _, _, s in measured])
    x = np.arange(len(names))
    width = 0.4 if len(names) < 60 else 0.5
    dead_label = "dead (never positive\nin the batch)"
    sat_label = "saturated (within 1%\nof the range's ends)"
    if len(names) <= 60:
        both = np.isfinite(dead) & np.isfinite(sat)
        _bars(ax, np.where(both, x - width / 2, x), np.nan_to_num(dead), width, 0.0,
              "#d62728", dead_label)
        _bars(ax, np.where(both, x + width / 2, x), np.nan_to_num(sat), width, 0.0,
              "#ff7f0e", sat_label)
    else:
        edges = np.arange(len(names) + 1) - 0.5
        ax.stairs(np.nan_to_num(dead), edges, fill=True, color="#d62728", label=dead_label)
        ax.stairs(np.nan_to_num(sat), edges, fill=False, color="#ff7f0e", linewidth=1.4,
                  label=sat_label)
    ax.set_ylim(0, 1.1)
    if len(names) <= 24:
        for xi, d, sv in zip(x, dead, sat):
            shift = width / 2 if np.isfinite(d) and np.isfinite(sv) else 0.0
            for offset, value in ((-shift, d), (shift, sv)):
                if np.isfinite(value):
                    ax.text(xi + offset, value + 0.01, f"{value:.0%}", ha="center",
                            va="bottom", fontsize=7)
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=0.8)
    _legend(ax)
    ax.grid(alpha=0.3, axis="y")
    _layer_ticks(ax, names, width=26)


def pick_record(history: History, step: int | None) -> tuple[StepRecord | None, str]:
    """The record the per-layer panels show, and a note for their titles.

    By default the last one; when its gradients have gone NaN/Inf, the last one before that
    (a diverged run's per-layer panels are otherwise empty).
    """
    record = record_at(history, step)
    if step is not None or record is None or not np.isinf(record.grad_norm).any():
        return record, ""
    for earlier in reversed(history.records()):
        if not np.isinf(earlier.grad_norm).any() and np.isfinite(earlier.grad_norm).any():
            return earlier, " (the last before NaN/Inf gradients)"
    return record, ""


def _label_chars(names: Sequence[str], width: int) -> int:
    prefix = common_prefix(names)
    return max((len(fold_name(n[len(prefix):], width)) for n in names), default=0)


def _tick_inches(chars: int, count: int) -> float:
    """Room for the x tick labels: upright for a few short names, else rotated."""
    if _upright(count, chars):
        return 0.25
    return 0.08 + 0.062 * chars


class ScopeFigure(ShownOnce, Figure):
    """The gradscope figure: a matplotlib `Figure` drawn with Agg, not managed by pyplot.

    Save it with `fig.savefig(path)`; in Jupyter a cell ending in it shows it inline (but not
    a second time in the cell where `scope.plot()` displayed it already).
    """

    def _bundle(self) -> dict[str, Any]:
        return figure_bundle(self)


def build_figure(history: History, diagnoses: Sequence[Diagnosis], step: int | None = None
                 ) -> ScopeFigure:
    """The five-panel figure (loss, norms over time, flow, update ratio, dead/saturated).

    Panels are placed at fixed sizes in inches, so the figure grows with the model instead
    of squeezing it, and no layout engine has to measure every label.

    Example:
        >>> import torch
        >>> from gradscope.layout import ModelLayout
        >>> fig = build_figure(History(ModelLayout.of(torch.nn.Linear(2, 2))), [])
        >>> len(fig.axes)
        5
    """
    layout = history.layout
    names = [name or "(root)" for name in layout.layers]
    layers = len(names)
    records = history.records()
    record, note = pick_record(history, step)
    heat = layers > MAX_LINES
    acts = [n for n, st in (record.activations.items() if record else ())
            if st.dead_frac is not None or st.saturated_frac is not None]
    act_names = [f"{n} ({layout.module_types.get(n, '?')})" for n in acts]
    layer_ticks = _tick_inches(_label_chars(names, 22), min(layers, MAX_TICKS))
    act_ticks = _tick_inches(_label_chars(act_names, 26), min(len(act_names), MAX_TICKS))
    # (panel height, room below it for ticks and axis label), in inches, top to bottom
    rows = [
        (2.2, 0.55),
        ((min(2.6 + layers / 40, 7.0) if heat else 2.8), 0.55),
        (2.8, layer_ticks + 0.35),
        (2.6, layer_ticks + 0.35),
        (2.4, act_ticks + 0.35),
    ]
    title_room, top, width = 0.4, 0.55, 14.0
    left = 0.85 + (0.055 * _label_chars(names, 22) if heat else 0.0)
    right = 2.4
    height = top + sum(title_room + h + below for h, below in rows) + 0.1
    fig = ScopeFigure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = []
    y = height - top
    for panel_height, below in rows:
        y -= title_room + panel_height
        axes.append(fig.add_axes((left / width, y / height, (width - left - right) / width,
                                  panel_height / height)))
        y -= below
    marked = record.step if record is not None and (step is not None or note) else None
    draw_loss(axes[0], history, diagnoses, marked)
    draw_norms(axes[1], history, records, fig, marked)
    draw_flow(axes[2], history, record, note)
    draw_updates(axes[3], history, record, note)
    draw_units(axes[4], history, record, note)
    if records:
        axes[1].set_xlim(axes[0].get_xlim())
    found = severity_sorted(diagnoses)
    headline = (f"gradscope · {total_steps(history)} steps ({history.total_recorded} recorded) · "
                f"{layers} layers")
    if found:
        headline += " · " + ", ".join(f"{d.sign} ({d.severity})" for d in found[:4])
        if len(found) > 4:
            headline += f" +{len(found) - 4} more"
    else:
        headline += " · no findings"
    fig.text(0.15 / width, 1 - 0.3 / height, headline, fontsize=13, ha="left", va="center",
             weight="bold")
    return fig


def check_plot_path(path: str | Path) -> Path:
    """`path` as a Path, or a GradscopeError saying which file names can be written."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise GradscopeError(
            f"cannot save a plot as {path.name!r}; use a file name ending in "
            f"{', '.join(FORMATS)}.")
    return path


def _check_step(step: int | None) -> None:
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise GradscopeError(f"step={step!r} must be an integer training step.")


def save_plot(history: History, diagnoses: Sequence[Diagnosis], path: str | Path,
              step: int | None = None, dpi: int = 110) -> Path:
    """Write the figure to `path` (.png, .svg or .pdf, by extension) and return the path.

    `step` picks the recorded step drawn in the per-layer panels (default: the last one).

    Example:
        >>> import tempfile, torch
        >>> from gradscope.layout import ModelLayout
        >>> h = History(ModelLayout.of(torch.nn.Linear(2, 2)))
        >>> save_plot(h, [], tempfile.mkdtemp() + "/grads.svg").suffix
        '.svg'
    """
    path = check_plot_path(path)
    _check_step(step)
    return _save(build_figure(history, diagnoses, step), path, dpi)


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format=path.suffix.lower()[1:])
    return path


def present_figure(fig: ScopeFigure, path: str | Path | None = None, dpi: int = 110
                   ) -> SavedPlot | ScopeFigure:
    """Save `fig` to `path` when given, show it inline when a notebook is running (once: the
    value returned does not display it again in that cell), and return the path (a `Path`),
    or the figure when no path is given. Every `plot()` method ends here.

    Example:
        >>> import tempfile
        >>> fig = ScopeFigure(figsize=(2, 2))
        >>> present_figure(fig) is fig, present_figure(fig, tempfile.mkdtemp() + "/f.pdf").name
        (True, 'f.pdf')
    """
    saved = None if path is None else SavedPlot(_save(fig, check_plot_path(path), dpi))
    if in_notebook():
        png = saved.read_bytes() if saved is not None and saved.suffix.lower() == ".png" else None
        show_figure(fig, png)
        if saved is not None:
            saved._mark_shown()
    return fig if saved is None else saved


def plot(history: History, diagnoses: Sequence[Diagnosis], path: str | Path | None = None,
         step: int | None = None, dpi: int = 110) -> SavedPlot | ScopeFigure:
    """What `Scope.plot` does: build the figure, then `present_figure` (save when `path` is
    given, show inline in a notebook; return the path, or the figure without a path).

    Example:
        >>> import torch
        >>> from gradscope.layout import ModelLayout
        >>> fig = plot(History(ModelLayout.of(torch.nn.Linear(2, 2))), [])
        >>> len(fig.axes)
        5
    """
    if path is not None:
        check_plot_path(path)
    _check_step(step)
    return present_figure(build_figure(history, diagnoses, step), path, dpi)
