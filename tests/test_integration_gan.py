"""Several optimizers on one watched model (a tiny GAN), and an unwatched EMA copy."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from tolerance import norm_rtol
from torch import nn

import gradscope


def _norms(module: nn.Module) -> np.ndarray:
    return np.array([torch.linalg.vector_norm(p.grad.double()).item() for p in module.parameters()])


def test_each_optimizer_reads_its_own_gradients_and_ema_forwards_are_ignored():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    disc = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    gan = nn.ModuleDict({"g": gen, "d": disc})
    ema = copy.deepcopy(gen)
    opt_g = torch.optim.Adam(gen.parameters(), 1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), 1e-3)
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(32, 1), torch.zeros(32, 1)
    g = torch.Generator().manual_seed(1)
    ref_d, ref_g = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradscope.GradscopeWarning)
        scope = gradscope.watch(gan, [opt_g, opt_d], every=2)
        for _ in range(12):
            real = torch.randn(32, 2, generator=g) * 0.5 + 2
            z = torch.randn(32, 4, generator=g)
            opt_d.zero_grad()
            fake = gen(z)
            d_loss = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
            d_loss.backward()
            ref_d.append(_norms(disc))
            opt_d.step()
            opt_g.zero_grad()
            g_loss = bce(disc(fake), ones)  # also adds into disc's gradients, after its step
            g_loss.backward()
            ref_g.append(_norms(gen))
            opt_g.step()
            with torch.no_grad():  # EMA of the generator, run in train mode with grad on
                for pe, p in zip(ema.parameters(), gen.parameters()):
                    pe.lerp_(p, 0.1)
            with torch.enable_grad():
                ema(z).sum()
            scope.step(g_loss.detach() + d_loss.detach())
        scope.close()
    names = scope.layout.param_names
    d_idx = [i for i, n in enumerate(names) if n.startswith("d.")]
    g_idx = [i for i, n in enumerate(names) if n.startswith("g.")]
    records = scope.history.records()
    assert [r.step for r in records] == [0, 2, 4, 6, 8, 10]
    for r in records:
        # each optimizer's parameters were read at its own pre-hook: disc's norms are those of
        # d_loss alone, not polluted by g_loss's backward that ran after opt_d.step()
        rtol = norm_rtol(max(p.numel() for p in gan.parameters()))  # float32 norms
        np.testing.assert_allclose(r.grad_norm[d_idx], ref_d[r.step], rtol=rtol)
        np.testing.assert_allclose(r.grad_norm[g_idx], ref_g[r.step], rtol=rtol)
        assert np.all(r.update_ratio > 0) and not r.not_in_optimizer.any()
        # the EMA copy is not part of the watched model: its forwards leave no trace
        assert set(r.activations) <= {n for n, _ in gan.named_modules()}
        assert r.activations["g.1"].calls == 1  # gen ran once per step, the EMA not counted
    assert not [d for d in scope.diagnose() if d.severity != "info"]
