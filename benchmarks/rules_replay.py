"""Cost of one rule-engine evaluation on a real run's history, and against history length.

`replay`: trains a workload watched at default settings, then feeds its records (and the
losses up to each) one at a time to a fresh History and RuleEngine, timing each
`engine.update` with the newest record's kept values cleared, as in training (the minimum
over a few passes per record). `growth`: a 10-layer model with 60 evaluations on top of
1,000 / 10,000 / 100,000 held losses.

Run: python benchmarks/rules_replay.py [--workload deep10] [--steps 60,600] [--growth]
(prints one JSON line per case, milliseconds per evaluation)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rulekit import fed_one_by_one

from benchmarks.measure import Trainer
from benchmarks.methods import Gradscope
from benchmarks.workloads import make_workload
from gradscope.history import History
from gradscope.layout import ModelLayout
from gradscope.rules import RuleEngine, builtin_rules


def replay(workload: str, steps: int, passes: int = 3) -> dict:
    """Per-evaluation time of the rules over the records of `steps` watched training steps."""
    torch.manual_seed(0)
    w = make_workload(workload, torch.device("cpu"))
    method = Gradscope("default", "", every=10)
    trainer = Trainer(w, w.build(), method, torch.device("cpu"))
    for _ in range(steps):
        trainer.step()
    history = method.scope.history
    records = history.records()
    trainer.close()
    times = np.full((passes, len(records)), np.inf)
    signs: list[str] = []
    for p in range(passes):
        engine = RuleEngine(builtin_rules())
        for i, copy in enumerate(fed_one_by_one(history)):
            start = time.process_time()
            engine.update(copy)
            times[p, i] = time.process_time() - start
        signs = [d.sign for d in engine.diagnoses()]
    best = times.min(axis=0)
    return {"workload": workload, "steps": steps, "records": len(records), "diagnoses": signs,
            "median_ms": round(1e3 * float(np.median(best)), 4),
            "median_ms_last_half": round(1e3 * float(np.median(best[len(best) // 2:])), 4)}


def growth(held: tuple[int, ...] = (1_000, 10_000, 100_000)) -> dict:
    """Median evaluation time with `held` losses in the history (10 layers, 60 records)."""
    from rulekit import act, data, record

    layout = ModelLayout.of(nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU())
                                            for _ in range(10)]))
    rng = np.random.default_rng(0)
    acts = {f"{i}.1": act(dead=0.1, order=i) for i in range(10)}
    out = {}
    for total in held:
        history = History(layout)
        steps = np.arange(total)
        history.add_losses(steps.tolist(),
                           (10 / (1 + steps) * (1 + 0.1 * rng.random(total))).tolist())
        engine, times = RuleEngine(builtin_rules()), []
        for i in range(60):
            step = total + 10 * i
            history.add_losses(list(range(step, step + 10)),
                               [10 / (1 + s) for s in range(step, step + 10)])
            history.append(record(layout, step, loss=10 / (1 + step),
                                  grad_norm=rng.random(len(layout.params)), activations=acts,
                                  data=data()))
            start = time.process_time()
            engine.update(history)
            times.append(time.process_time() - start)
        out[total] = round(1e3 * float(np.median(times[10:])), 4)
    return {"median_ms_by_losses_held": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="deep10")
    parser.add_argument("--steps", default="60,600", help="comma-separated training lengths")
    parser.add_argument("--growth", action="store_true", help="also time against history length")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for steps in args.steps.split(","):
        print(json.dumps(replay(args.workload, int(steps))))
    if args.growth:
        print(json.dumps(growth()))


if __name__ == "__main__":
    main()
