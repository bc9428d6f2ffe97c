"""Data-parallel training on CPU (gloo), started by torchrun; no gradscope in it."""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(rank)
for _ in range(30):
    x = torch.randn(64, 8, generator=gen)
    # the bug: optimizer.zero_grad() is never called, gradients pile up across steps
    loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
    loss.backward()
    optimizer.step()
if rank == 0:
    print(f"ranks {dist.get_world_size()} done, pid {os.getpid()}")
dist.destroy_process_group()
