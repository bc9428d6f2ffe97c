"""A plain training loop, with nothing of gradscope in it unless --watch is given.

--watch DIR is the reference: the same loop with gradscope.watch() written into it.
Bugs to inject: --bug no-zero-grad | lr-low | detach. --save FILE stores the final
weights and every loss (to compare runs bit for bit).
"""

import argparse
import sys

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--bug", default="none",
                    choices=["none", "no-zero-grad", "lr-low", "detach"])
parser.add_argument("--amp", action="store_true", help="bfloat16 autocast with a GradScaler")
parser.add_argument("--overflow-at", type=int, default=-1,
                    help="this step's gradients overflow (with --amp the scaler skips the step)")
parser.add_argument("--watch", default=None, metavar="LOG_DIR")
parser.add_argument("--every", type=int, default=5)
parser.add_argument("--save", default=None)
parser.add_argument("--raise-at", type=int, default=-1)
parser.add_argument("--interrupt-at", type=int, default=-1)
parser.add_argument("--exit", default=None, help="sys.exit() with this at the end")
args = parser.parse_args()

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


model = Net()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-7 if args.bug == "lr-low" else 1e-3)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if args.amp else None
gen = torch.Generator().manual_seed(1)
w_true = torch.randn(16, 4, generator=gen)

scope = None
if args.watch:
    import gradscope

    scope = gradscope.watch(model, optimizer, every=args.every, log_dir=args.watch)

losses = []
for step in range(args.steps):
    if step == args.raise_at:
        raise RuntimeError(f"data loader broke at step {step}")
    if step == args.interrupt_at:
        raise KeyboardInterrupt
    if args.bug != "no-zero-grad":
        optimizer.zero_grad()
    step_loss = 0.0
    for _ in range(args.accum):
        x = torch.randn(32, 16, generator=gen)
        y = (x @ w_true).argmax(dim=1)
        if step == args.overflow_at:
            x = x * 1e38
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            # the detach bug cuts the encoder off the loss
            out = model.head(model.encoder(x).detach()) if args.bug == "detach" else model(x)
            loss = nn.functional.cross_entropy(out.float(), y) / args.accum
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        step_loss = step_loss + loss.detach()
        losses.append(loss.detach().clone())
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scope is not None:
        scope.step(step_loss)

if scope is not None:
    scope.close()
if args.save:
    torch.save({"state": model.state_dict(), "losses": torch.stack(losses)}, args.save)
if args.exit is not None:
    sys.exit(int(args.exit) if args.exit.lstrip("-").isdigit() else args.exit)
