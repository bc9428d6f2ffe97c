"""gradscope's overhead against plain training and against other tools, in one process.

For each workload, a reference copy and a watched copy of the same model (identical weights)
are trained side by side, alternating single steps after warm-up, so that machine drift hits
both equally. Prints a markdown table and one JSON line (starting with `{"benchmark"`).

Usage:
    python benchmarks/overhead.py                       # everything, CPU (~10 minutes)
    python benchmarks/overhead.py --workloads mlp,cnn --methods default,every1
    python benchmarks/overhead.py --device cuda         # bf16 autocast, 124M-parameter GPT-2
    python benchmarks/overhead.py --smoke               # one tiny workload, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.measure import Trainer, history_footprint, interleave, linear_fit, peak_memory
from benchmarks.methods import METHODS, make_method
from benchmarks.workloads import WORKLOADS, Workload, make_workload

DEEP = ("deep10", "deep100", "deep1000")
SMOKE_METHODS = ("plain", "default", "run", "every1", "naive", "anomaly")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)} (or deepN)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}, every1_no_origin")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per side (default: sized to --seconds per method)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="target measured time per workload and method (both sides)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per model")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="step timer: process CPU time or wall time (auto: CPU time on "
                             "--device cpu, wall time with synchronisation on cuda)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--no-history", action="store_true", help="skip the history footprint")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny workload, a few methods, few steps (checks the script runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.workloads = "deep10"
        if args.methods == ",".join(METHODS):
            args.methods = ",".join(SMOKE_METHODS)
        args.steps = args.steps or 20
        args.warmup = 2
        args.no_history = True
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch.cuda.is_available() is False; "
                     "run on a machine with a GPU or use --device cpu.")
    return args


def choose_steps(args: argparse.Namespace, per_step: float, period: int) -> int:
    """Measured steps per side: fixed by --steps, else enough for --seconds (at least 8)."""
    if args.steps is not None:
        steps = args.steps
    else:
        steps = max(8, min(400, math.ceil(args.seconds / max(per_step, 1e-6))))
    if period > 1:  # whole periods, at least three, so every phase is represented
        steps = max(steps, 3 * period)
        steps = math.ceil(steps / period) * period
    return steps


def warm(trainer: Trainer, steps: int) -> float:
    times = [trainer.step() for _ in range(steps)]
    return min(times[-2:]) if len(times) >= 2 else times[-1]


def run_workload(args: argparse.Namespace, name: str, methods: list[str],
                 device: torch.device) -> list[dict[str, Any]]:
    """Every method on one workload; each gets two fresh copies of the same initial model."""
    workload: Workload = make_workload(name, device)
    torch.manual_seed(0)
    master = workload.build()
    params = sum(p.numel() for p in master.parameters())
    log(f"[{name}] {workload.description}: {params / 1e6:.2f}M params, {workload.modules} "
        f"leaf modules")
    rows = []
    plain_memory: dict[str, float] | None = None
    for method_name in methods:
        started = time.perf_counter()
        method = make_method(method_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # both sides are copies made the same way, so memory layout favours neither
            base = Trainer(workload, copy.deepcopy(master),
                           make_method(method.baseline or "plain"), device, args.clock)
            watched = Trainer(workload, copy.deepcopy(master), method, device, args.clock)
            per_step = warm(base, args.warmup) + warm(watched, args.warmup)
            steps = choose_steps(args, per_step, method.period)
            timing = interleave(base, watched, steps)
            row: dict[str, Any] = {"workload": name, "method": method_name,
                                   "label": method.label, **timing.summary}
            if not args.no_memory and method.baseline is None:
                if plain_memory is None:
                    plain_memory = peak_memory(base)
                mem = peak_memory(watched)
                row["peak_mem_delta_mib"] = mem["peak_mib"] - plain_memory["peak_mib"]
                row["retained_delta_mib"] = mem["retained_mib"] - plain_memory["retained_mib"]
            watched.close()
            base.close()
        row["modules"] = workload.modules
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        log(f"  {method_name:<18} ratio {row['ratio']:.3f} "
            f"[{row['ratio_lo']:.3f}, {row['ratio_hi']:.3f}]  "
            f"{row['plain_ms']:.2f} -> {row['method_ms']:.2f} ms  ({steps} steps, "
            f"{row['seconds']:.0f} s)")
        del watched, base, method
        gc.collect()
    return rows


def per_module_cost(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Microseconds per module per step from the deepN workloads, and a straight-line fit."""
    out: dict[str, Any] = {}
    for method in ("default", "every1"):
        points = sorted((r["modules"], r["overhead_ms"] * 1e3) for r in rows
                        if r["workload"].startswith("deep") and r["method"] == method)
        if not points:
            continue
        entry: dict[str, Any] = {
            "us_per_module": {str(n): us / n for n, us in points},
            "ratio": {str(r["modules"]): r["ratio"] for r in rows
                      if r["workload"].startswith("deep") and r["method"] == method},
        }
        if len(points) >= 2:
            entry["fit"] = linear_fit([n for n, _ in points], [us for _, us in points])
        out[method] = entry
    return out


def budget(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check each budget item that the measured rows cover."""
    ratio = {(r["workload"], r["method"]): r["ratio"] for r in rows}
    checks = []

    def check(item: str, value: float, limit: float, ok: bool | None = None) -> None:
        checks.append({"item": item, "value": value, "limit": limit,
                       "met": bool(value <= limit if ok is None else ok)})

    for w in ("mlp", "gpt2", "cnn"):
        if (w, "default") in ratio:
            check(f"default ratio, {w}", ratio[w, "default"], 1.03)
    for w in ("gpt2", "mlp"):
        if (w, "every1") in ratio:
            check(f"every=1 ratio, {w}", ratio[w, "every1"], 1.10)
    for w in sorted({r["workload"] for r in rows}):
        if (w, "every1") in ratio and (w, "hf_debug") in ratio:
            check(f"every=1 cheaper than HF DebugUnderflowOverflow, {w}", ratio[w, "every1"],
                  ratio[w, "hf_debug"])
        if (w, "origin") in ratio and (w, "anomaly") in ratio:
            limit = (ratio[w, "anomaly"] - 1) / 10
            check(f"NaN-origin overhead <= detect_anomaly overhead / 10, {w}",
                  ratio[w, "origin"] - 1, limit)
    if ("deep1000", "default") in ratio:
        check("default ratio, 1000 modules", ratio["deep1000", "default"], 1.10)
    return checks


def markdown(rows: list[dict[str, Any]]) -> str:
    has_mem = any("peak_mem_delta_mib" in r for r in rows)
    head = "| workload | method | plain ms | method ms | ratio (90% CI) |"
    rule = "|---|---|---:|---:|---|"
    if has_mem:
        head += " peak mem delta MiB | retained delta MiB |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['workload']} | {r['label']} | {r['plain_ms']:.2f} | {r['method_ms']:.2f} | "
                f"{r['ratio']:.3f} ({r['ratio_lo']:.3f}-{r['ratio_hi']:.3f}) |")
        if has_mem:
            for key in ("peak_mem_delta_mib", "retained_delta_mib"):
                line += f" {r[key]:.2f} |" if key in r else " - |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        make_method(m)  # fail early on a typo
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in workloads:
        rows.extend(run_workload(args, name, methods, device))
    result: dict[str, Any] = {
        "benchmark": "gradscope-overhead",
        "device": args.device,
        "machine": (torch.cuda.get_device_name(device) if args.device == "cuda"
                    else f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch thread(s)"),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "rows": rows,
        "per_module": per_module_cost(rows),
    }
    if not args.no_history:
        log("[history] footprint of a 200-layer model ...")
        result["history"] = history_footprint()
    result["budget"] = budget(rows)
    result["seconds"] = time.perf_counter() - started
    print(markdown(rows))
    for name, entry in result["per_module"].items():
        costs = ", ".join(f"{n}: {us:.1f}" for n, us in entry["us_per_module"].items())
        fit = entry.get("fit")
        extra = (f"; fit {fit['slope']:.1f} us/module + {fit['intercept'] / 1e3:.2f} ms, "
                 f"R^2 {fit['r2']:.3f}") if fit else ""
        print(f"\nper-module cost ({name}), us per module per step: {costs}{extra}")
    if "history" in result:
        h = result["history"]
        print(f"\nhistory: {h['record_bytes_sizeof']} bytes per recorded step "
              f"({h['record_bytes_tracemalloc']:.0f} by tracemalloc) for a {h['layers']}-layer "
              f"model; growth once full {h['growth_per_step_when_full']:.0f} B/step; cap "
              f"{h['default_capacity']} records ~{h['default_cap_mib']:.1f} MiB")
    if result["budget"]:
        print("\n| budget item | value | limit | met |\n|---|---:|---:|---|")
        for c in result["budget"]:
            print(f"| {c['item']} | {c['value']:.3f} | {c['limit']:.3f} | "
                  f"{'yes' if c['met'] else 'NO'} |")
    line = json.dumps(result, default=float)
    print(line)
    if args.json is not None:
        args.json.write_text(line + "\n")
    log(f"total {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
