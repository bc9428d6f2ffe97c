"""Cost of one rule-engine evaluation on a 200-layer model with 10,000 recorded steps.

Run: python benchmarks/rules_cost.py   (prints microseconds per evaluation)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from rulekit import act, data, record

from gradscope.history import History
from gradscope.layout import ModelLayout
from gradscope.rules import RuleEngine, builtin_rules


def main(layers: int = 200, steps: int = 10_000, evaluations: int = 200,
         flat: bool = False) -> dict:
    """Time engine.update() on a synthetic history; `flat=True` makes loss-flat fire."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(layers)])
    layout = ModelLayout.of(model)
    history = History(layout, capacity=steps)
    rng = np.random.default_rng(0)
    n = len(layout.params)
    acts = {f"{i}.1": act(dead=0.1, order=i) for i in range(layers)}
    for step in range(steps):
        loss = float((1 if flat else 10 / (1 + step)) * (1 + 0.1 * rng.random()))
        history.append(record(layout, step, loss=loss, grad_norm=rng.random(n),
                              activations=acts, data=data()))
        history.add_losses([step], [loss])
    engine = RuleEngine(builtin_rules())
    engine.update(history)
    times = []
    for i in range(evaluations):  # as in training: one new record, then one evaluation
        step = steps + i
        loss = float((1 if flat else 10 / (1 + step)) * (1 + 0.1 * rng.random()))
        history.append(record(layout, step, loss=loss, grad_norm=rng.random(n),
                              activations=acts, data=data()))
        history.add_losses([step], [loss])
        start = time.process_time()
        engine.update(history)
        times.append(time.process_time() - start)
    result = {"layers": layers, "params": n, "recorded_steps": steps,
              "diagnoses": [d.sign for d in engine.diagnoses()],
              "median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(
                  np.percentile(times, 90))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
    main(flat=True)
