"""A tiny GAN: two models, two optimizers, no gradscope unless --watch is given."""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=24)
parser.add_argument("--watch", default=None, metavar="LOG_DIR")
parser.add_argument("--every", type=int, default=2)
parser.add_argument("--save", default=None)
args = parser.parse_args()

torch.manual_seed(0)
gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
disc = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
opt_g = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.999))
opt_d = torch.optim.Adam(disc.parameters(), 1e-3, betas=(0.5, 0.999))
bce = nn.BCEWithLogitsLoss()
ones, zeros = torch.ones(32, 1), torch.zeros(32, 1)
data = torch.Generator().manual_seed(1)

scope = None
if args.watch:
    import gradscope

    scope = gradscope.watch(nn.ModuleDict({"gen": gen, "disc": disc}), [opt_g, opt_d],
                            every=args.every, log_dir=args.watch)

losses = []
for _ in range(args.steps):
    real = torch.randn(32, 2, generator=data) * 0.5 + 2
    z = torch.randn(32, 4, generator=data)
    opt_d.zero_grad()
    fake = gen(z)
    d_loss = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
    d_loss.backward()
    opt_d.step()
    opt_g.zero_grad()
    g_loss = bce(disc(fake), ones)
    g_loss.backward()
    opt_g.step()
    losses += [d_loss.detach(), g_loss.detach()]
    if scope is not None:
        scope.step(d_loss.detach() + g_loss.detach())

if scope is not None:
    scope.close()
if args.save:
    torch.save({"gen": gen.state_dict(), "disc": disc.state_dict(),
                "losses": torch.stack(losses)}, args.save)
