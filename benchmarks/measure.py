"""Timing, memory and statistics helpers for the overhead benchmark."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .methods import Method
from .workloads import Workload


class Trainer:
    """One model, its AdamW optimizer and the method watching it; `step()` times one iteration.

    Example:
        >>> from benchmarks.workloads import make_workload
        >>> w = make_workload("deep10", torch.device("cpu"))
        >>> t = Trainer(w, w.build(), Method(), torch.device("cpu")); t.step() > 0
        True
    """

    def __init__(self, workload: Workload, model: nn.Module, method: Method,
                 device: torch.device, clock: str = "auto") -> None:
        self.workload = workload
        self.model = model.to(device).train()
        self.method = method
        self.device = device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.steps = 0
        # CPU time of this process is not inflated by waiting for a core (other work); on
        # CUDA, wall time after synchronising is what the GPU work costs
        if clock == "auto":
            clock = "cpu" if device.type == "cpu" else "wall"
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        method.attach(self.model, self.optimizer)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> float:
        """Run one training iteration and return its time in seconds (see `clock`)."""
        batch = self.workload.batches[self.steps % len(self.workload.batches)]
        self._sync()
        start = self.clock()
        with self.method.around_step():
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = self.workload.loss(self.model, batch)
            loss.backward()
            self.method.after_backward(self.model)
            self.optimizer.step()
            self.method.after_step(loss)
        self._sync()
        self.steps += 1
        return self.clock() - start

    def close(self) -> None:
        self.method.close()


@dataclass
class PairTiming:
    """Per-step times of the reference and the watched model, alternated step by step."""

    reference: np.ndarray
    watched: np.ndarray
    recorded: np.ndarray  # True where the watched step was one of the method's heavy steps
    period: int
    summary: dict[str, float] = field(default_factory=dict)


def interleave(reference: Trainer, watched: Trainer, steps: int) -> PairTiming:
    """Alternate single steps (ABBA order) so that machine drift hits both sides equally."""
    ref_t, watch_t, rec = [], [], []
    for i in range(steps):
        rec.append(watched.method.recorded(watched.steps))
        if i % 2 == 0:
            ref_t.append(reference.step())
            watch_t.append(watched.step())
        else:
            watch_t.append(watched.step())
            ref_t.append(reference.step())
    timing = PairTiming(np.array(ref_t), np.array(watch_t), np.array(rec), watched.method.period)
    timing.summary = summarize(timing)
    return timing


def _overhead(diff: np.ndarray, recorded: np.ndarray, period: int) -> float:
    """Amortised extra seconds per step: per-class medians of the paired differences."""
    if period == 1 or not recorded.any() or recorded.all():
        return float(np.median(diff))
    heavy = float(np.median(diff[recorded]))
    light = float(np.median(diff[~recorded]))
    return (heavy + (period - 1) * light) / period


def summarize(timing: PairTiming, resamples: int = 500) -> dict[str, float]:
    """Median plain step, amortised watched step, their ratio and a bootstrap 90% interval."""
    diff = timing.watched - timing.reference
    plain = float(np.median(timing.reference))
    extra = _overhead(diff, timing.recorded, timing.period)
    rng = np.random.default_rng(0)
    ratios = []
    idx = np.arange(len(diff))
    for _ in range(resamples):
        pick = rng.choice(idx, size=len(idx), replace=True)
        if timing.period > 1:  # resample within each class so both stay represented
            heavy, light = idx[timing.recorded], idx[~timing.recorded]
            pick = np.concatenate([rng.choice(heavy, len(heavy)) if len(heavy) else heavy,
                                   rng.choice(light, len(light)) if len(light) else light])
        p = float(np.median(timing.reference[pick]))
        ratios.append((p + _overhead(diff[pick], timing.recorded[pick], timing.period)) / p)
    lo, hi = np.percentile(ratios, [5, 95])
    out = {
        "plain_ms": plain * 1e3,
        "method_ms": (plain + extra) * 1e3,
        "overhead_ms": extra * 1e3,
        "ratio": (plain + extra) / plain,
        "ratio_lo": float(lo),
        "ratio_hi": float(hi),
        "steps": len(diff),
    }
    if timing.period > 1 and timing.recorded.any():
        out["recorded_step_extra_ms"] = float(np.median(diff[timing.recorded])) * 1e3
        out["other_step_extra_ms"] = float(np.median(diff[~timing.recorded])) * 1e3
    return out


def peak_memory(trainer: Trainer) -> dict[str, float]:
    """Peak and retained memory (MiB) of one step, relative to the memory held just before it.

    The measured step is a heavy one for methods with a period. CUDA: the caching allocator's
    counters. CPU: allocation events of the PyTorch profiler in time order (an op's net
    allocation from its start, its net release from its end) over the second of two profiled
    steps, so that frees of the first step's tensors are seen.
    """
    while not trainer.method.recorded(trainer.steps + 1):
        trainer.step()
    if trainer.device.type == "cuda":
        trainer.step()
        torch.cuda.synchronize(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
        base = torch.cuda.memory_allocated(trainer.device)
        trainer.step()
        peak = torch.cuda.max_memory_allocated(trainer.device) - base
        retained = torch.cuda.memory_allocated(trainer.device) - base
        return {"peak_mib": peak / 2**20, "retained_mib": retained / 2**20}
    return _cpu_profile_memory(trainer)


def _cpu_profile_memory(trainer: Trainer) -> dict[str, float]:
    import warnings

    from torch.profiler import ProfilerActivity, profile, record_function

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.step()
            with record_function("benchmark:start"):  # empty ranges mark the measured step,
                pass  # so that frees between ops keep their own timestamps
            trainer.step()
            with record_function("benchmark:end"):
                pass
    events = list(prof.events())
    start = next(e for e in events if e.name == "benchmark:start").time_range.end
    end = next(e for e in events if e.name == "benchmark:end").time_range.start
    # an op's net allocation counts from its start, its net release from its end
    allocs = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
                     e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage)
    level = base = peak = 0
    started = False
    for t, delta in allocs:
        if t >= start and not started:
            base = peak = level
            started = True
        if t > end:
            break
        level += delta
        if started:
            peak = max(peak, level)
    if not started:
        base = peak = level
    return {"peak_mib": (peak - base) / 2**20, "retained_mib": (level - base) / 2**20}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares line through (xs, ys): slope, intercept and R^2."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - ss_res / ss_tot}


def history_footprint(layers: int = 200, capacity: int = 20, steps: int = 60) -> dict[str, Any]:
    """Bytes one recorded step adds to the history of a `layers`-layer model, and the cap.

    Measured two ways: numpy nbytes plus object sizes of the StepRecord, and tracemalloc growth
    while the ring fills; then tracemalloc growth once the ring is full (should be ~0).
    """
    import sys
    import tracemalloc

    import gradscope
    from gradscope.history import History
    from gradscope.options import WatchOptions

    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(8, 8), nn.ReLU())])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 8), torch.randn(16, 8)

    def run(scope: Any, n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            scope.step(loss)

    def deep_size(record: Any) -> int:
        total = sys.getsizeof(record) + sys.getsizeof(record.__dict__)
        for value in record.__dict__.values():
            if isinstance(value, np.ndarray):
                total += value.nbytes + sys.getsizeof(value) - value.nbytes * (value.base is None)
            elif isinstance(value, dict):
                total += sys.getsizeof(value)
                for k, v in value.items():
                    total += sys.getsizeof(k) + sys.getsizeof(v)
                    total += sum(sys.getsizeof(f) for f in getattr(v, "__dict__", {}).values())
            else:
                total += sys.getsizeof(value)
        return total

    keep = History.KEEP_FIRST
    with gradscope.watch(model, opt, every=1, history_size=capacity) as scope:
        run(scope, keep + 2)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        grow = capacity - 4
        run(scope, grow)
        filling = (tracemalloc.get_traced_memory()[0] - before) / grow
        run(scope, capacity)  # ring now full: older records are dropped
        full_before = tracemalloc.get_traced_memory()[0]
        run(scope, steps)
        full = (tracemalloc.get_traced_memory()[0] - full_before) / steps
        tracemalloc.stop()
        record = scope.history.last
        sizes = deep_size(record)
        arrays = sum(v.nbytes for v in record.__dict__.values() if isinstance(v, np.ndarray))
        held = len(scope.history.records())
    default_capacity = WatchOptions().history_size
    loss_capacity = History(scope.history.layout).loss_steps.maxlen or 0
    return {
        "layers": layers,
        "params": 2 * layers,
        "modules": 2 * layers,
        "record_bytes_sizeof": sizes,
        "record_array_bytes": arrays,
        "record_bytes_tracemalloc": filling,
        "growth_per_step_when_full": full,
        "records_held": held,
        "capacity": capacity,
        "default_capacity": default_capacity,
        "default_cap_mib": max(sizes, filling) * (default_capacity + keep) / 2**20,
        "loss_capacity": loss_capacity,
        # two deques of Python objects (int step + float loss), ~68 bytes per step held
        "loss_cap_mib": loss_capacity * 68 / 2**20,
    }
