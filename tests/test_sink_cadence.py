"""Sinks never run the rules: with every sink attached the rules keep their cadence (once per
RULE_STEPS training steps), however many sinks read the diagnoses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.report.sinks import DiagnosisSink, Sink
from gradscope.rules.engine import RULE_STEPS
from gradscope.runlog import read_log

STEPS = 50


class Recording:
    """A sink that keeps what it was given."""

    def __init__(self) -> None:
        self.records: list[int] = []
        self.changed: list[str] = []
        self.closed = False

    def on_record(self, record, diagnoses) -> None:
        self.records.append(record.step)
        self.changed.extend(d.sign for d in diagnoses)

    def on_close(self) -> None:
        self.closed = True


def _count_evaluations(scope) -> list[int]:
    calls: list[int] = []
    update = scope.engine.update

    def counted(history, unseen=1):
        calls.append(history.last.step)
        return update(history, unseen)

    scope.engine.update = counted
    return calls


def _train(scope, model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss)


def test_every_sink_attached_keeps_the_rule_cadence(tmp_path, capsys):
    tensorboard = pytest.importorskip("gradscope.integrations.tensorboard",
                                      exc_type=ImportError)
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: a diagnosis to hand out
    scope = gradscope.watch(model, opt, every=1, live=True, log_dir=tmp_path / "log")
    calls = _count_evaluations(scope)
    exporter = tensorboard.TensorBoardExporter(str(tmp_path / "tb")).attach(scope)
    own = Recording()
    scope.add_sink(own)
    _train(scope, model, opt, STEPS)
    # 50 recorded steps at every=1: the rules ran after records 10, 20, 30, 40 and 50
    assert calls == [9, 19, 29, 39, 49]
    assert len(calls) == STEPS // RULE_STEPS
    assert scope.diagnoser.evaluations == 5
    scope.close()
    assert len(calls) == 5  # nothing unseen and no waiting loss: close() ran none either
    assert own.records == list(range(STEPS)) and own.closed
    assert "update-tiny" in own.changed or "params-frozen" in own.changed
    assert exporter.writer is not None
    assert read_log(tmp_path / "log").ended
    capsys.readouterr()


def test_lightning_logging_runs_no_rule(tmp_path):
    pytest.importorskip("lightning")
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from gradscope.integrations.lightning import GradscopeCallback

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(STEPS * 4, 4), torch.randn(STEPS * 4, 1))
    callback = GradscopeCallback(every=1, report=False)
    trainer = L.Trainer(max_steps=STEPS, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        default_root_dir=str(tmp_path))
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    scope = callback.scope
    assert scope.history.total_recorded == STEPS
    assert scope.diagnoser.evaluations == STEPS // RULE_STEPS


def test_sink_protocol_is_checked_on_add_sink():
    scope = gradscope.watch(nn.Linear(2, 1), live=False)
    assert isinstance(Recording(), Sink) and not isinstance(Recording(), DiagnosisSink)
    with pytest.raises(gradscope.GradscopeError, match="on_record"):
        scope.add_sink(object())
    scope.close()
