"""The checkup figure: overfit curve, lr sweep with the user's lr, gradient norms and output
scale per layer at initialisation. Drawn with matplotlib's Agg (no display)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg

from ..report.plots import ScopeFigure, check_plot_path, present_figure
from ..report.readings import fold_name

if TYPE_CHECKING:
    from .result import Checkup


def _empty(ax: Axes, title: str, why: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _positive_log(ax: Axes, values: np.ndarray) -> None:
    if values.size and np.all(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")


def _overfit(ax: Axes, ck: Checkup) -> None:
    title = "Overfit one batch"
    losses = np.asarray(ck["overfit"].data.get("losses", []), dtype=float)
    if losses.size == 0:
        _empty(ax, title, ck["overfit"].skipped or "not run")
        return
    ax.plot(np.arange(losses.size), losses, color="#1f77b4", marker=".", markersize=3)
    ax.axhline(losses[0] * 0.1, color="gray", linestyle=":", linewidth=1,
               label="10% of the first loss")
    _positive_log(ax, losses)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)


def _lr(ax: Axes, ck: Checkup) -> None:
    title = "Learning-rate range test"
    data = ck["lr-range"].data
    lrs, losses = np.asarray(data.get("lrs", [])), np.asarray(data.get("losses", []), float)
    if lrs.size == 0:
        _empty(ax, title, ck["lr-range"].skipped or "not run")
        return
    ok = np.isfinite(losses)
    ax.plot(lrs[ok], losses[ok], color="#1f77b4")
    ax.set_xscale("log")
    colors = {"start": "#2ca02c", "steepest": "#9467bd", "diverge": "#d62728"}
    for key, color in colors.items():
        if data.get(key) is not None:
            ax.axvline(data[key], color=color, linestyle="--", linewidth=1, label=key)
    user = data.get("user_lr")
    if user is not None and user > 0 and math.isfinite(user):
        ax.axvline(user, color="black", linewidth=2, label=f"yours ({user:.1e})")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)


def _bars(ax: Axes, rows: list[tuple[str, float]], title: str, ylabel: str) -> None:
    rows = [(n, v) for n, v in rows if math.isfinite(v) and v > 0]
    if not rows:
        _empty(ax, title, "nothing measured")
        return
    names, values = zip(*rows)
    ax.plot(np.arange(len(values)), values, marker="o", markersize=3, color="#ff7f0e")
    ax.set_yscale("log")
    step = max(1, len(names) // 24)
    ticks = np.arange(0, len(names), step)
    ax.set_xticks(ticks)
    ax.set_xticklabels([fold_name(names[i] or "(root)", 22) for i in ticks], rotation=70,
                       fontsize=7, ha="right")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def build_checkup_figure(ck: Checkup) -> ScopeFigure:
    """The four-panel checkup figure."""
    fig = ScopeFigure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    _overfit(axes[0][0], ck)
    _lr(axes[0][1], ck)
    depth = ck["depth"].data
    _bars(axes[1][0], depth.get("grad_norm", []), "Gradient norm per layer at init "
                                                  "(model order)", "L2 norm")
    _bars(axes[1][1], depth.get("scale", []), "Output std of weight layers at init "
                                              "(forward order)", "std")
    fig.suptitle("gradscope checkup", fontsize=12)
    return fig


def save_checkup_plot(ck: Checkup, path: str | Path | None = None, dpi: int = 110) -> Any:
    """Save the checkup figure to `path` (.png, .svg or .pdf) and return the path, or return
    the figure without a path; in Jupyter it is shown inline either way (as `scope.plot`)."""
    if path is not None:
        check_plot_path(path)  # a wrong suffix fails before anything is drawn
    return present_figure(build_checkup_figure(ck), path, dpi=dpi)
