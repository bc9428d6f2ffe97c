"""gradscope in a PyTorch Lightning run: one callback, a report at the end of fit.

The model has a classic bug: `training_step` detaches the encoder's output before the head
(a leftover from a frozen-feature experiment), so the encoder gets no gradient and never
trains. gradscope names the sign (gradients are None), the layers (`encoder.*`) and the
likely cause (a detached graph).

    python examples/lightning_example.py
    python examples/lightning_example.py --fast     # a few seconds (also: GRADSCOPE_FAST=1)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

try:
    import lightning as L
except ModuleNotFoundError:
    sys.exit("This example needs lightning: pip install -e '.[lightning]'")
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradscope.integrations.lightning import GradscopeCallback


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x).detach()  # the bug: cuts the encoder out of backward
        return self.head(features)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def make_loader(n: int = 2048, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=gen)
    y = (x @ torch.randn(20, 4, generator=gen)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run (for tests)")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("GRADSCOPE_FAST") == "1"

    torch.manual_seed(0)
    callback = GradscopeCallback(every=5)          # watch(...) at fit start, report at fit end
    trainer = L.Trainer(max_steps=20 if fast else 300, accumulate_grad_batches=2,
                        callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(Classifier(), make_loader())
    # the scope stays readable after training
    for d in callback.scope.diagnose():
        print(f"{d.severity}: {d.sign} -> {d.cause} in {', '.join(d.layers[:4])}")


if __name__ == "__main__":
    main()
