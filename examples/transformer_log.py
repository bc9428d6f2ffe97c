"""A tiny GPT-2 trained with a run log, then read back by the `gradscope report` command.

The log (log_dir/gradscope.jsonl) is written line by line while training runs, so it can be
read after the run ends, and also after it crashes or is killed.

    python examples/transformer_log.py --log-dir runs/gpt2
    python examples/transformer_log.py --fast   # a few seconds (also: GRADSCOPE_FAST=1)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from torch.nn.functional import cross_entropy

try:
    from transformers import GPT2Config, GPT2LMHeadModel
except ModuleNotFoundError:
    sys.exit("This example needs transformers: pip install -e '.[transformers]'")

import gradscope

VOCAB, LENGTH = 100, 32


def batch(gen: torch.Generator, size: int = 16) -> torch.Tensor:
    """Token sequences that count upwards from a random start: easy to learn."""
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    return (start + torch.arange(LENGTH)) % VOCAB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run (for tests)")
    parser.add_argument("--log-dir", default=None, help="where to write the run log "
                        "(default: a new temporary directory)")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("GRADSCOPE_FAST") == "1"
    steps = 30 if fast else 300
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="gradscope-gpt2-")

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    with gradscope.watch(model, optimizer, log_dir=log_dir, every=5) as scope:
        for _ in range(steps):
            ids = batch(gen)
            optimizer.zero_grad()
            logits = model(input_ids=ids).logits
            loss = cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            scope.step(loss)
    print(f"run log written to {log_dir}; now: gradscope report {log_dir}\n", flush=True)
    command = [sys.executable, "-m", "gradscope", "report", log_dir, "--fail-on", "never"]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
