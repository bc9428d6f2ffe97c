"""GradscopeCallback inside a real transformers.Trainer on a tiny random GPT-2, on CPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from tolerance import model_norm_rtol
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")

from gradscope.integrations.transformers import GradscopeCallback  # noqa: E402


class Tokens(Dataset):
    """Random token sequences; the labels are the inputs (causal LM)."""

    def __init__(self, n: int = 32, length: int = 12, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Reference(transformers.TrainerCallback):
    """Per-parameter gradient norms where the optimizer is about to read them."""

    def __init__(self) -> None:
        self.norms: list[np.ndarray] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(np.array([
            torch.linalg.vector_norm(p.grad.double()).item() if p.grad is not None else np.nan
            for p in model.parameters()]))


def _train(tmp_path, callbacks, **args):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                   learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                   logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    options.update(args)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**options),
                                   train_dataset=Tokens(), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    return trainer, model


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_steps_and_gradients(tmp_path, accumulation):
    callback, reference = GradscopeCallback(every=1, report=False), Reference()
    trainer, model = _train(tmp_path, [callback, reference],
                            gradient_accumulation_steps=accumulation)
    scope = callback.scope
    assert scope.closed and scope.step_count == 4
    records = scope.history.records()
    assert [r.step for r in records] == [0, 1, 2, 3]
    assert [r.backward_count for r in records] == [accumulation] * 4
    assert all(r.stepped for r in records)
    # tied weights are one parameter: gradscope's layout follows model.parameters()
    measured = np.stack([r.grad_norm for r in records])
    np.testing.assert_allclose(measured, np.stack(reference.norms), rtol=model_norm_rtol(model))
    # the step's loss is the one the Trainer logs for that step (which it rounds to 4 digits)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose([r.loss for r in records], logged, rtol=1e-3, atol=1e-4)
    assert all(np.nanmax(r.update_ratio) > 0 for r in records)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_healthy_run_is_quiet_and_zero_learning_rate_is_diagnosed(tmp_path, capsys):
    # the Trainer's default optimizer is the fused AdamW, whose kernel writes the weights
    # without moving their version counter: updates must still be seen
    healthy = GradscopeCallback(every=1)
    _train(tmp_path, [healthy], max_steps=8)
    assert "gradscope report" in capsys.readouterr().out  # printed at the end of train()
    assert not [d for d in healthy.scope.diagnose() if d.severity != "info"]
    frozen = GradscopeCallback(every=1, report=False)
    _train(tmp_path, [frozen], max_steps=8, learning_rate=0.0, lr_scheduler_type="constant")
    assert "gradscope report" not in capsys.readouterr().out  # report=False
    diagnoses = {d.sign: d for d in frozen.scope.diagnose()}
    assert "params-frozen" in diagnoses
    assert diagnoses["params-frozen"].cause == "lr-too-low"
