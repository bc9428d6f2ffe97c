"""gradscope in a Hugging Face Trainer run: one callback, a report at the end of train().

A tiny GPT-2 (random init, synthetic tokens, no download) is trained with a learning rate far
too small: the weights barely move. gradscope reports it (parameters hardly change, learning
rate too low) with the update/weight ratio of each layer.

    python examples/hf_trainer_example.py
    python examples/hf_trainer_example.py --fast     # a few seconds (also: GRADSCOPE_FAST=1)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch.utils.data import Dataset

try:
    import accelerate  # noqa: F401  (the Trainer needs it)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
except ModuleNotFoundError:
    sys.exit("This example needs transformers and accelerate: pip install -e '.[transformers]'")

from gradscope.integrations.transformers import GradscopeCallback


class RepeatingTokens(Dataset):
    """Short sequences of a repeating pattern: easy to learn with a sane learning rate."""

    def __init__(self, n: int = 512, length: int = 16, vocab: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 1), generator=gen)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run (for tests)")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("GRADSCOPE_FAST") == "1"

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    callback = GradscopeCallback(every=2)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, max_steps=12 if fast else 400, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, learning_rate=1e-9,  # the bug: ~1e-3 would learn
            lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
            logging_steps=1000, disable_tqdm=True)
        Trainer(model=model, args=training, train_dataset=RepeatingTokens(),
                callbacks=[callback]).train()
    for d in callback.scope.diagnose():
        print(f"{d.severity}: {d.sign} -> {d.cause}")


if __name__ == "__main__":
    main()
