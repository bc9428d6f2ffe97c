"""gradscope in a real Jupyter kernel: examples/notebook.ipynb executed with nbclient + ipykernel.

The kernel runs this interpreter with this checkout first on its path. The assertions read the
cells' outputs as a notebook stores them: the live panel is one output updated in place, the
report is shown once, the figure is one inline image, and no cell fails.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="needs ipykernel: pip install -e '.[test]'")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

pytestmark = pytest.mark.slow  # starts a kernel and trains: about 20 s

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"
KERNEL = "gradscope-test"

# run after the example's own cells: what a user does next with the returned values
EXTRA_CELLS = [
    # mid-cell: shown once, the text is a str for code
    "text = scope.report()\nprint('lines', len(text.splitlines()), isinstance(text, str))",
    # a variable on its own line in a later cell shows the report again, once
    "text",
    # no path: the figure is shown and returned, and not shown twice
    "fig = scope.plot()\nfig",
    "fig",
    # to a file: plain text, nothing displayed
    "import io\nbuffer = io.StringIO()\nscope.report(file=buffer);",
    "import pathlib\n"
    "print(buffer.getvalue() == str(text), isinstance(scope.plot('grads.svg'), pathlib.Path))",
    # watch in one cell, train in the next, close in a third: the panel stays in the loop's cell
    "again = gradscope.watch(model, optimizer, every=1, live='auto')",
    "for _ in range(30):\n"
    "    optimizer.zero_grad()\n"
    "    loss = loss_fn(model(inputs[:64]), targets[:64])\n"
    "    loss.backward()\n"
    "    optimizer.step()\n"
    "    again.step(loss)",
    "again.close()",
    # a checkup shows its report and its figure the same way: once each
    "ck = gradscope.checkup(model, (inputs[:64], targets[:64]), loss_fn, optimizer, quick=True)\n"
    "ck.report()",
    "ck.plot('checkup.png')",
]


class RecordingClient(nbclient.NotebookClient):
    """Keeps every iopub message type per cell (updates in place never reach the notebook)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages: dict[int, list[dict]] = {}

    def process_message(self, msg, cell, cell_index):
        self.messages.setdefault(cell_index, []).append(msg)
        return super().process_message(msg, cell, cell_index)


def _kernel(tmp_path: Path) -> KernelManager:
    """A kernel running this interpreter, with this checkout's gradscope first on its path."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gradscope test", "language": "python",
        # ipykernel's default backend (the test process exports MPLBACKEND=Agg)
        "env": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    example_cells = len(nb.cells)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in EXTRA_CELLS]
    client = RecordingClient(nb, km=_kernel(tmp_path), timeout=180, allow_errors=True,
                             resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"notebook executed in {seconds:.1f} s")
    return nb, client, example_cells, tmp_path, seconds


def _code_cell(nb, source_start: str, after: int = 0) -> int:
    for i, cell in enumerate(nb.cells):
        if i >= after and cell.cell_type == "code" and cell.source.startswith(source_start):
            return i
    raise AssertionError(f"no code cell starting with {source_start!r}")


def _kinds(outputs) -> list[str]:
    """Each output as its type plus, for displays, the richest mime type it carries."""
    kinds = []
    for out in outputs:
        if out.output_type in ("display_data", "execute_result"):
            mime = next((m for m in ("image/png", "text/html") if m in out.data), "text/plain")
            kinds.append(f"{out.output_type}:{mime}")
        else:
            kinds.append(f"{out.output_type}:{getattr(out, 'name', '')}")
    return kinds


def test_no_cell_fails(executed):
    nb, *_ = executed
    errors = [(i, out.get("ename"), out.get("evalue")) for i, cell in enumerate(nb.cells)
              if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    stderr = [out.text for cell in nb.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "stream" and out.name == "stderr"]
    assert not [text for text in stderr if "Traceback" in text]


def test_live_view_is_one_output_updated_in_place_and_left_at_the_end(executed):
    nb, client, *_ = executed
    index = _code_cell(nb, "with gradscope.watch(")
    cell = nb.cells[index]
    assert _kinds(cell.outputs) == ["display_data:text/html"]
    final = cell.outputs[0].data["text/plain"]
    assert final.startswith("╭─ gradscope · recorded 200")
    assert re.search(r"step 199\s", final)            # the last step, drawn at close
    assert "grad-none" in final and "detached-graph" in final
    messages = client.messages[index]
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    updates = [m for m in messages if m["msg_type"] == "update_display_data"]
    assert len(shown) == 1 and updates
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert {m["content"]["transient"]["display_id"] for m in updates} == {display_id}
    # first drawn at the first step, then redrawn in place up to the last one, in order
    steps = [_panel_step(m) for m in shown + updates]
    assert steps[0] == 0 and steps[-1] == 199 and steps == sorted(steps)
    # never more redraws than the refresh cap (4 a second by default) allows, plus the last
    timing = cell.metadata["execution"]
    seconds = (_time(timing["shell.execute_reply"]) - _time(timing["iopub.execute_input"]))
    assert len(updates) <= 4 * seconds + 2


def _panel_step(msg: dict) -> int:
    return int(re.search(r"step (\d+)", msg["content"]["data"]["text/plain"]).group(1))


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_report_is_shown_once(executed):
    nb, *_ = executed
    cell = nb.cells[_code_cell(nb, "scope.report()")]
    assert _kinds(cell.outputs) == ["display_data:text/html"]
    out = cell.outputs[0]
    assert out.data["text/plain"].startswith("gradscope report")
    assert "grad-none" in out.data["text/plain"] and "detached-graph" in out.data["text/plain"]
    assert "<span" in out.data["text/html"] and "gradscope report" in out.data["text/html"]


def test_plot_shows_the_figure_inline_and_saves_the_file(executed):
    nb, _, _, tmp_path, _ = executed
    cell = nb.cells[_code_cell(nb, 'scope.plot("grads.png")')]
    assert _kinds(cell.outputs) == ["display_data:image/png"]
    png = (tmp_path / "grads.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert cell.outputs[0].data["image/png"].startswith("iVBORw0KGgo")  # base64 of a PNG


def test_returned_values_show_once_per_cell_and_keep_the_text(executed):
    nb, _, example_cells, tmp_path, _ = executed
    cells = nb.cells[example_cells:]
    kinds = [_kinds(cell.outputs) for cell in cells]
    assert kinds[0] == ["display_data:text/html", "stream:stdout"]  # mid-cell report
    lines = int(re.search(r"lines (\d+) True", cells[0].outputs[1].text).group(1))
    assert lines > 10
    assert kinds[1] == ["display_data:text/html"]                   # `text` in a later cell
    assert cells[1].outputs[0].data["text/plain"] == cells[0].outputs[0].data["text/plain"]
    assert kinds[2] == ["display_data:image/png"]                   # plot() then `fig`
    assert kinds[3] == ["display_data:image/png"]                   # `fig` again, later
    assert kinds[4] == []                                           # report(file=...)
    assert kinds[5] == ["display_data:image/png", "stream:stdout"]  # plot(path) mid-cell
    assert cells[5].outputs[1].text == "True True\n"
    assert (tmp_path / "grads.svg").stat().st_size > 10_000
    assert kinds[6:9] == [[], ["display_data:text/html"], []]
    final = cells[7].outputs[0].data["text/plain"]          # updated by close() in cell 9
    assert final.startswith("╭─ gradscope · recorded 30") and re.search(r"step 29\s", final)



def test_checkup_report_and_plot_show_once(executed):
    nb, _, _, tmp_path, _ = executed
    report = nb.cells[_code_cell(nb, "ck = gradscope.checkup(")]
    assert _kinds(report.outputs) == ["display_data:text/html"]
    assert report.outputs[0].data["text/plain"].startswith("gradscope checkup")
    figure = nb.cells[_code_cell(nb, "ck.plot(")]
    assert _kinds(figure.outputs) == ["display_data:image/png"]
    assert (tmp_path / "checkup.png").read_bytes().startswith(b"\x89PNG")
