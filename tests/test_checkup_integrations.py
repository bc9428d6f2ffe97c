"""checkup=True on the Lightning and transformers callbacks: a checkup on the first batch, before
any update, and training exactly as without it."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))


def test_lightning_callback_checks_the_first_batch_and_training_is_unchanged(tmp_path, capsys):
    pytest.importorskip("lightning")
    from test_integration_lightning import Tiny, _fit, _trainer

    from gradscope.integrations.lightning import GradscopeCallback

    runs = []
    for checkup in (False, {"quick": True}):
        torch.manual_seed(0)
        module = Tiny(unused_param=True)
        callback = GradscopeCallback(every=1, report=bool(checkup), checkup=checkup)
        _fit(_trainer(tmp_path, max_steps=5, callbacks=[callback]), module)
        runs.append((module, callback))
    (plain, _), (checked, callback) = runs
    assert plain.micro_losses == checked.micro_losses  # the copies' steps are not counted
    for a, b in zip(plain.parameters(), checked.parameters()):
        assert torch.equal(a, b)
    ck = callback.checkup
    assert ck is not None and ck["overfit"].data["losses"]
    found = [d for d in ck.diagnoses if d.sign == "grad-none"]
    assert found and found[0].layers == ["module.unused"]
    assert "never ran in the forward pass" in found[0].causes[0].evidence
    out = capsys.readouterr().out
    assert out.count("gradscope checkup") == 1 and "gradscope report" in out


def test_transformers_callback_checks_the_first_batch_and_training_is_unchanged(tmp_path):
    pytest.importorskip("transformers")
    from test_integration_transformers import _train

    from gradscope.integrations.transformers import GradscopeCallback

    plain_trainer, plain = _train(tmp_path, [GradscopeCallback(report=False)])
    callback = GradscopeCallback(report=False, checkup={"quick": True})
    trainer, model = _train(tmp_path, [callback])
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in plain_trainer.state.log_history if "loss" in h]
    ck = callback.checkup
    assert ck is not None and ck.ok, ck.report(file=__import__("io").StringIO())
    init = ck["init-loss"].data
    assert init["kind"] == "cross-entropy" and init["reference"] == pytest.approx(
        torch.log(torch.tensor(64.0)).item())
    assert ck["lr-range"].data["user_lr"] == pytest.approx(1e-3, rel=0.01)


def test_checkup_errors_never_stop_training(tmp_path):
    pytest.importorskip("lightning")
    from test_integration_lightning import Tiny, _fit, _trainer

    from gradscope.integrations.lightning import GradscopeCallback

    torch.manual_seed(0)
    module = Tiny()
    callback = GradscopeCallback(every=1, report=False, checkup={"checks": ["bogus"]})
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _fit(_trainer(tmp_path, max_steps=3, callbacks=[callback]), module)
    assert callback.checkup is None
    assert callback.scope.step_count == 3
    assert isinstance(module.net[0], nn.Linear)
