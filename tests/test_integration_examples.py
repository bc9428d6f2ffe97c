"""The integration examples run in fast mode and show what they promise.

They run in this process (runpy), so the heavy imports (Lightning, transformers) are shared
with the other integration tests instead of paid again in a subprocess.
"""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, "--fast", *args])
    monkeypatch.setenv("GRADSCOPE_FAST", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_lightning_example_finds_the_detached_encoder(monkeypatch, capsys):
    pytest.importorskip("lightning")
    run_example("lightning_example.py", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "gradscope report" in out
    assert "warning: grad-none -> detached-graph in encoder.0" in out


def test_hf_trainer_example_finds_the_tiny_learning_rate(monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    run_example("hf_trainer_example.py", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "gradscope report" in out
    assert "params-frozen -> lr-too-low" in out


def test_tensorboard_example_writes_event_files(monkeypatch, capsys, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_example("tensorboard_example.py", "--log-dir", str(tmp_path), monkeypatch=monkeypatch)
    assert f"TensorBoard logs written to {tmp_path}" in capsys.readouterr().out
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "grad_norm/0" in tags and "saturated/15" in tags and "update_ratio/16" in tags
    assert [e.step for e in acc.Scalars("grad_norm/0")] == [0, 5, 10, 15, 20, 25, 30, 35]
