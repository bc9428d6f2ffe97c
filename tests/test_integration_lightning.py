"""GradscopeCallback inside a real lightning.Trainer on CPU."""

from __future__ import annotations

import csv
import io
import warnings

import numpy as np
import pytest
import torch
from tolerance import gamma, model_norm_rtol, norm_rtol
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402


class Tiny(L.LightningModule):
    """Linear-ReLU-Linear regressor that keeps, per optimizer step, the reference figures."""

    def __init__(self, unused_param: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
        self.unused = nn.Linear(4, 4) if unused_param else None
        self.ref_norms: list[np.ndarray] = []
        self.micro_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.micro_losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # the accumulated (and, under AMP, unscaled) gradients the optimizer is about to use
        self.ref_norms.append(np.array([
            torch.linalg.vector_norm(p.grad.double()).item() if p.grad is not None else np.nan
            for p in self.parameters()]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 96, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, logger=False,
                   default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


def _fit(trainer: L.Trainer, module: L.LightningModule) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|LeafSpec).*")
        trainer.fit(module, _loader())


def test_accumulation_gives_one_step_per_optimizer_step(tmp_path):
    module = Tiny()
    callback = GradscopeCallback(every=1, report=False)
    _fit(_trainer(tmp_path, max_steps=3, accumulate_grad_batches=4, callbacks=[callback]), module)
    scope = callback.scope
    assert scope.closed and scope.step_count == 3
    records = scope.history.records()
    assert [r.step for r in records] == [0, 1, 2]
    assert [r.backward_count for r in records] == [4, 4, 4]
    assert all(r.stepped for r in records)
    reference = np.stack(module.ref_norms)
    measured = np.stack([r.grad_norm for r in records])
    np.testing.assert_allclose(measured, reference, rtol=model_norm_rtol(module))
    # the step's loss is the mean of its four micro-batch losses (float32: 4 sums, a division)
    micro = np.array(module.micro_losses).reshape(3, 4).mean(axis=1)
    np.testing.assert_allclose([r.loss for r in records], micro, rtol=gamma(6))
    # accumulating micro-batches on purpose is not a leftover-gradient problem
    assert not [d for d in scope.diagnose() if d.severity != "info"]
    # every hook is gone after fit
    assert not module._forward_hooks and not module._forward_pre_hooks
    assert not any(m._forward_hooks for m in module.modules())


def test_bf16_mixed_reads_the_gradients_the_optimizer_uses(tmp_path):
    module = Tiny()
    callback = GradscopeCallback(every=2, report=False)
    _fit(_trainer(tmp_path, max_steps=6, precision="bf16-mixed", callbacks=[callback]), module)
    records = callback.scope.history.records()
    assert [r.step for r in records] == [0, 2, 4]
    reference = np.stack(module.ref_norms)[[0, 2, 4]]
    np.testing.assert_allclose(np.stack([r.grad_norm for r in records]), reference,
                               rtol=model_norm_rtol(module))
    assert all(np.isfinite(r.loss) for r in records)
    assert all(r.activations for r in records)  # forward hooks saw the autocast forward


def test_logs_headline_figures_and_prints_the_report(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    module = Tiny(unused_param=True)  # `unused` never takes part in the loss
    callback = GradscopeCallback(every=1)
    logger = CSVLogger(str(tmp_path), name="run", version=0)
    # 10 steps: the rules run once per 10 training steps, and logging runs none of its own
    _fit(_trainer(tmp_path, max_steps=10, callbacks=[callback], logger=logger,
                  log_every_n_steps=1), module)
    scope = callback.scope
    names = scope.layout.param_names
    for record in scope.history.records():
        assert record.grad_none[names.index("unused.weight")]
        assert not record.grad_none[names.index("net.0.weight")]
    signs = {d.sign for d in scope.diagnose()}
    assert "grad-none" in signs
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradscope/grad_norm_total")]
    assert len(rows) == 10
    total = [float(r["gradscope/grad_norm_total"]) for r in rows]
    expected = [np.sqrt(np.nansum(r.grad_norm ** 2)) for r in scope.history.records()]
    total_numel = sum(p.numel() for p in module.parameters())
    np.testing.assert_allclose(total, expected, rtol=2 * norm_rtol(total_numel))
    assert float(rows[-1]["gradscope/warnings"]) + float(rows[-1]["gradscope/errors"]) >= 1
    out = capsys.readouterr().out
    assert "gradscope report" in out and "unused.weight" in out
    # diagnose(), report() and plot() still work on the closed scope
    text = io.StringIO()
    scope.report(file=text)
    assert text.getvalue()


def test_read_before_the_optimizer_hook_keeps_pre_clip_norms_and_updates():
    # Lightning's 16-mixed path: backward, unscale, on_before_optimizer_step (gradscope reads),
    # gradient clipping, then the optimizer step (whose pre-hook runs last)
    import gradscope

    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1)
    (model(torch.randn(8, 6)) * 100).pow(2).mean().backward()
    expected = [torch.linalg.vector_norm(p.grad).item() for p in model.parameters()]
    scope.read_gradients(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    scope.step(1.0)
    scope.close()
    record = scope.history.last
    # both sides are float32 norms: twice the bound of one
    np.testing.assert_allclose(record.grad_norm, expected, rtol=2 * model_norm_rtol(model))
    assert np.all(record.update_ratio > 0) and np.all(record.changed == 1)


class TinyGAN(L.LightningModule):
    """Manual optimization with two optimizers, as Lightning's GAN examples do."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
        self.d = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        self.ref_d: list[np.ndarray] = []
        self.returned: list[float] = []

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        fake = self.g(z)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = (bce(self.d(real), torch.ones(len(real), 1))
                  + bce(self.d(fake.detach()), torch.zeros(len(real), 1)))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        self.ref_d.append(np.array([p.grad.norm().item() for p in self.d.parameters()]))
        opt_d.step()
        g_loss = bce(self.d(fake), torch.ones(len(real), 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.returned.append(g_loss.item())
        return g_loss

    def configure_optimizers(self):
        return [torch.optim.Adam(self.g.parameters(), 1e-3),
                torch.optim.Adam(self.d.parameters(), 1e-3)]


def test_manual_optimization_with_two_optimizers(tmp_path):
    module = TinyGAN()
    callback = GradscopeCallback(every=1, report=False)
    _fit(_trainer(tmp_path, max_epochs=1, limit_train_batches=4, callbacks=[callback]), module)
    scope = callback.scope
    records = scope.history.records()
    assert scope.step_count == 4 and [r.step for r in records] == [0, 1, 2, 3]
    d_idx = [i for i, n in enumerate(scope.layout.param_names) if n.startswith("d.")]
    for r in records:
        # disc's gradients as its own optimizer saw them, before g_loss's backward added more
        np.testing.assert_allclose(r.grad_norm[d_idx], module.ref_d[r.step],
                                   rtol=2 * model_norm_rtol(module))
        assert np.all(r.update_ratio > 0)
    np.testing.assert_allclose([r.loss for r in records], module.returned, rtol=gamma(4))
