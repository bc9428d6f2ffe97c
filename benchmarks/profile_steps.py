"""Where a watched step's time goes: cProfile (Python) or torch.profiler (kernels).

Runs one workload watched by gradscope for a number of steps after warm-up and prints the
top functions by cumulative (cProfile) or self CPU time (torch.profiler), with the time per
step of plain and watched training for scale.

    python benchmarks/profile_steps.py deep100 --every 10 --steps 200
    python benchmarks/profile_steps.py deep1000 --every 1 --steps 20 --torch
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.measure import Trainer
from benchmarks.methods import Gradscope, Method
from benchmarks.workloads import make_workload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--every", type=int, default=10, help="0: profile the plain copy")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--torch", action="store_true", help="torch.profiler instead of cProfile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    workload = make_workload(args.workload, device)
    model = workload.build()
    plain = Trainer(workload, workload.build(), Method(), device)
    method = Gradscope("default", "", every=args.every) if args.every else Method()
    watched = Trainer(workload, model, method, device)
    for _ in range(args.warmup):
        plain.step()
        watched.step()
    t_plain = sum(plain.step() for _ in range(args.steps)) / args.steps
    if args.torch:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.process_time()
            for _ in range(args.steps):
                watched.step()
            t_watched = (time.process_time() - start) / args.steps
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    else:
        profiler = cProfile.Profile()
        start = time.process_time()
        profiler.enable()
        for _ in range(args.steps):
            watched.step()
        profiler.disable()
        t_watched = (time.process_time() - start) / args.steps
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())
    print(f"{args.workload} every={args.every}: plain {t_plain * 1e3:.3f} ms/step, "
          f"watched (under the profiler) {t_watched * 1e3:.3f} ms/step over {args.steps} steps")
    watched.close()


if __name__ == "__main__":
    main()
