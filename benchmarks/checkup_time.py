"""Time gradscope.checkup() per check on GPT-2 configs, full and quick mode, on the CPU.

    python benchmarks/checkup_time.py                  # tiny and small configs
    python benchmarks/checkup_time.py --configs gpt2   # GPT-2 small (124M): minutes on a CPU

Prints one line per run: config, parameters, mode, total seconds and seconds per check.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import gradscope

CONFIGS = {
    # the test suite's GPT-2: 2 blocks, 32 wide, 100 tokens; batch 4 x 12
    "tiny": ({"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, "n_positions": 32},
             (4, 12)),
    # a small config: 4 blocks, 128 wide, 1000 tokens; batch 4 x 32
    "small": ({"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 1000,
               "n_positions": 64}, (4, 32)),
    # GPT-2 small as released (124M parameters); batch 2 x 32
    "gpt2": ({"n_positions": 128}, (2, 32)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    for name in args.configs:
        settings, shape = CONFIGS[name]
        vocab = settings.get("vocab_size", 50257)
        config = GPT2Config(**settings, bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
        for quick in (False, True):
            started = time.perf_counter()
            ck = gradscope.checkup(model, {"input_ids": ids, "labels": ids}, None, opt,
                                   quick=quick)
            total = time.perf_counter() - started
            print(json.dumps({
                "config": name, "params": params, "mode": "quick" if quick else "full",
                "threads": args.threads, "seconds": round(total, 2),
                "per_check": {k: round(v, 2) for k, v in ck.times.items()},
                "findings": [d.sign for d in ck.diagnoses if d.severity != "info"],
            }), flush=True)


if __name__ == "__main__":
    main()
