"""The saved figure: files by extension, panel titles and labels, one series or row per layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from matplotlib.collections import QuadMesh
from matplotlib.transforms import Bbox
from test_report_fixtures import (
    deep_diagnoses,
    deep_history,
    make_record,
    small_diagnoses,
    small_history,
)

import gradscope
from gradscope.report.plots import MAX_LINES, MAX_TICKS, TITLES, build_figure, save_plot

MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.fixture(scope="module")
def small_fig():
    return build_figure(small_history(), small_diagnoses())


@pytest.fixture(scope="module")
def deep_fig():
    history = deep_history()
    fig = build_figure(history, deep_diagnoses(history))
    fig.canvas.draw()
    return history, fig


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_save_plot_writes_each_format(tmp_path, suffix):
    path = save_plot(small_history(), small_diagnoses(), tmp_path / "sub" / f"grads{suffix}",
                     dpi=40)
    assert path.exists() and path.stat().st_size > 5000
    assert path.read_bytes()[:5].startswith(MAGIC[suffix])


def test_bad_extension_is_refused(tmp_path):
    with pytest.raises(gradscope.GradscopeError, match=r"\.png, \.svg, \.pdf"):
        save_plot(small_history(), [], tmp_path / "grads.jpg")


def _titles(fig):
    return [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]


def test_five_panels_with_titles_and_labels(small_fig):
    fig = small_fig
    titles = _titles(fig)
    assert titles == [TITLES["loss"], TITLES["norms"], TITLES["flow"].format(step=35),
                      TITLES["updates"].format(step=35), TITLES["units"].format(step=35)]
    loss, norms, flow, updates, units = fig.axes[:5]
    assert loss.get_xlabel() == "step" and loss.get_ylabel() == "loss"
    assert norms.get_yscale() == "log" and flow.get_yscale() == "log"
    assert updates.get_yscale() == "log"
    assert "|gradient|" in flow.get_ylabel() and "|Δw| / |w|" in updates.get_ylabel()
    assert units.get_ylabel() == "fraction of units"


def test_few_layers_draw_one_line_per_layer_with_its_values(small_fig):
    history = small_history()
    fig = small_fig
    norms = fig.axes[1]
    lines = [line for line in norms.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["embed", "hidden", "out"]
    expected = np.array([r.layer_grad_norm(history.layout)[0] for r in history.records()])
    np.testing.assert_allclose(lines[0].get_ydata(), expected)
    np.testing.assert_array_equal(lines[0].get_xdata(), [r.step for r in history.records()])


def test_many_layers_draw_a_heat_map_with_one_row_per_layer(deep_fig):
    history, fig = deep_fig
    assert len(history.layout.layers) > MAX_LINES
    meshes = [c for c in fig.axes[1].collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    rows, cols = meshes[0].get_array().shape
    assert (rows, cols) == (201, 4)
    # heat-map values are the per-layer norms of each record
    expected = history.records()[2].layer_grad_norm(history.layout)
    np.testing.assert_allclose(meshes[0].get_array()[:, 2], expected)


def test_labels_of_200_layers_are_thinned_and_do_not_overlap(deep_fig):
    _, fig = deep_fig
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[2:5]:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert 0 < len(labels) <= MAX_TICKS
        boxes = [t.get_window_extent(renderer) for t in labels]
        for a, b in itertools.pairwise(boxes):
            assert not Bbox.intersection(a, b) or Bbox.intersection(a, b).width <= 0.5
    # no panel's labels run into the next panel
    panels = [ax.get_tightbbox(renderer) for ax in fig.axes[:5]]
    for upper, lower in itertools.pairwise(panels):
        assert upper.y0 > lower.y1
    heat_labels = [t for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert 0 < len(heat_labels) <= 30
    assert "1 in" in fig.axes[2].get_xlabel()


def test_step_picks_the_recorded_step_for_the_layer_panels():
    history = small_history()
    fig = build_figure(history, [], step=12)
    assert fig.axes[2].get_title(loc="left") == TITLES["flow"].format(step=10)


def test_flow_panel_uses_rms_estimate_and_max(small_fig):
    history = small_history()
    fig = small_fig
    flow = fig.axes[2]
    labels = [h.get_label() for h in flow.containers]
    assert labels == ["max |grad|", "mean |grad|\n≈ L2 norm / √numel"]
    record = history.last
    numel = np.array([8 * 16 + 16, 16 * 16 + 16, 16 * 4 + 4])
    mean_bars = [p.get_y() + p.get_height() for p in flow.containers[1]]
    expected = record.layer_grad_norm(history.layout) / np.sqrt(numel)
    np.testing.assert_allclose(mean_bars, expected, rtol=1e-12)  # float64 on both sides


def test_update_panel_draws_the_reference_band(small_fig):
    fig = small_fig
    updates = fig.axes[3]
    labels = [t.get_text() for t in updates.get_legend().get_texts()]
    assert "typical band 0.0001–0.01" in labels and "reference 0.001" in labels


def test_loss_panel_marks_where_findings_began(small_fig):
    fig = small_fig
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "grad-vanishing from step 20" in labels and "units-dead from step 15" in labels


def test_empty_history_still_makes_a_figure(tmp_path):
    history = gradscope.History(gradscope.scope.ModelLayout.of(torch.nn.Linear(2, 2)))
    path = save_plot(history, [], tmp_path / "empty.png")
    assert path.stat().st_size > 1000


def test_scope_plot_after_close(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, every=1) as scope:
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(8, 3)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    path = scope.plot(tmp_path / "grads.svg")
    assert path.suffix == ".svg" and "Gradient flow" in path.read_text()


def test_diverged_run_shows_the_last_finite_step_and_marks_nan():
    history = small_history()
    layout = history.layout
    n = len(layout.params)
    for step in (40, 45):
        history.add_losses([step], [float("nan")])
        history.append(make_record(layout, step, loss=float("nan"),
                                   grad_norm=np.full(n, np.inf), grad_max=np.full(n, np.inf)))
    fig = build_figure(history, [])
    note = " (the last before NaN/Inf gradients)"
    assert fig.axes[2].get_title(loc="left") == TITLES["flow"].format(step=35) + note
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "loss NaN/Inf" in labels
    marks = [line for line in fig.axes[1].get_lines() if line.get_label() == "NaN/Inf gradient"]
    assert marks and list(marks[0].get_xdata()) == [40, 45]
    # an explicit step is honoured as given
    fig = build_figure(history, [], step=45)
    assert fig.axes[2].get_title(loc="left") == TITLES["flow"].format(step=45)
