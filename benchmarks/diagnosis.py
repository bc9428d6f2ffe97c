"""How well gradscope's diagnoses hold on bugs nobody tuned the rules for.

Every base setup (benchmarks/bug_setups.py: real architectures written the way popular code
writes them) is crossed with every injector that applies to it (benchmarks/bug_injectors.py:
one small change each). For each pair the symptom is first verified with plain torch (an
unwatched run: the loss really stays flat, the gradients really are None, ...); pairs whose
symptom does not show are dropped and listed. The kept pairs then run watched, at default
options (`gradscope.watch(model, optimizer(s), live=False)`), at two lengths, and are scored
with the public API only (diagnoses, and a sink that sees when each was raised):

- sign recall: a warning or error with one of the injector's signs was raised;
- top cause: the lead diagnosis (the first warning/error of `diagnose()` at the end, or the
  earliest one raised if all were withdrawn) names one of the injector's causes first;
- latency: optimizer steps from the start of the bug to the first such warning;
- false alarms: any warning or error on the healthy setups, at both lengths.

A fixed-seed third of the pairs is held out and scored separately. Prints markdown tables
(overall, short/long, held-out, per family, per injector, per setup, healthy runs, misses)
and one JSON line starting with `{"benchmark": "gradscope-diagnosis"`.

Usage:
    python benchmarks/diagnosis.py                  # everything (~5 min on 2 idle cores)
    python benchmarks/diagnosis.py --split design   # only the pairs not held out
    python benchmarks/diagnosis.py --quick          # a small subset, short lengths
    python benchmarks/diagnosis.py --setups mlp_tanh,gan --injectors lr_low --jobs 1
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch

import gradscope
from benchmarks.bug_injectors import (
    INJECTOR_BY_NAME,
    INJECTORS,
    Injector,
    Knobs,
    Probe,
    relative_drop,
)
from benchmarks.bug_setups import SETUP_BY_NAME, SETUPS, is_outlier_step, probe_hook

SEED = 0
HOLDOUT_SEED = 13
RAISED = ("warning", "error")
QUICK_SETUPS = ("mlp_tanh", "accum", "gan")
QUICK_INJECTORS = ("lr_low", "detach_forward", "no_zero_grad", "gan_d_no_zero_grad")
#: relative cost of one step per setup (to start the slow pairs first)
COST = {"lbfgs": 6, "gpt2_nanogpt": 5, "bert": 4, "vit": 4, "resnet": 4, "mnist_net": 2,
        "lstm_lm": 2, "accum": 2}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RaisedSink:
    """Sees every diagnosis when it is raised or changes (which step, which severity)."""

    def __init__(self) -> None:
        self.step = 0
        self.events: list[tuple[int, str, str, str | None]] = []

    def _see(self, diagnoses: list[Any]) -> None:
        for d in diagnoses:
            self.events.append((self.step, d.sign, d.severity, d.cause))

    def on_record(self, record: Any, diagnoses: list[Any]) -> None:
        self._see(diagnoses)

    def on_diagnoses(self, step: int, diagnoses: list[Any]) -> None:
        self._see(diagnoses)

    def on_close(self) -> None:
        pass


def holdout(pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """A fixed third of the pairs, drawn with a fixed seed, kept aside from rule design."""
    ordered = sorted(pairs)
    random.Random(HOLDOUT_SEED).shuffle(ordered)
    return set(ordered[: len(ordered) // 3])


def all_pairs(setups: list[str], injectors: list[str]) -> list[tuple[str, str]]:
    return [(s.name, i.name) for s in SETUPS if s.name in setups
            for i in INJECTORS if i.name in injectors and i.needs in s.caps]


# ------------------------------------------------------------------------------ one run
def run(setup: str, injector: str | None, steps: int, watched: bool) -> dict[str, Any]:
    """Train `setup` (with the bug, if any) for `steps` optimizer steps, watched or plain."""
    torch.manual_seed(SEED)
    knobs = Knobs(**(INJECTOR_BY_NAME[injector].knobs if injector else {}))
    probe = Probe(active=not watched)
    started, cpu = time.perf_counter(), time.process_time()
    result: dict[str, Any] = {"setup": setup, "injector": injector, "steps": steps,
                              "watched": watched}
    sink, scope, handle = RaisedSink(), None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer = SETUP_BY_NAME[setup].build(knobs, probe, SEED)
            i = 0
            if not watched and trainer.probe_point is not None:
                handle = probe_hook(trainer.probe_point, probe,
                                    lambda: i in (0, steps - 1) and probe.active)
            if watched:
                scope = gradscope.watch(trainer.model, trainer.optimizers, live=False)
                scope.add_sink(sink)
            for i in range(steps):
                sink.step = i
                loss = trainer.step(i)
                if scope is not None:
                    scope.step(loss)
                probe.losses.append(float(loss.detach()))
            trainer.finish()
        except Exception as err:  # a bug that crashes training is no diagnosis case
            probe.error = f"{type(err).__name__}: {err}"[:200]
        finally:
            if handle is not None:
                handle.remove()
            if scope is not None:
                final = scope.diagnose()
                result["final"] = [(d.sign, d.severity, d.cause, d.first_step) for d in final]
                result["failures"] = dict(scope.failures)
                scope.close()
    if knobs.data == "outliers":
        probe.outlier_losses = [v for j, v in enumerate(probe.losses) if is_outlier_step(j)]
        probe.other_losses = [v for j, v in enumerate(probe.losses) if not is_outlier_step(j)]
    result["events"] = sink.events
    result["error"] = probe.error
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = time.process_time() - cpu
    if not watched:
        result["probe"] = asdict(probe)
    return result


def score(inj: Injector | None, result: dict[str, Any]) -> dict[str, Any]:
    """Sign hit, cause, latency (bug runs) or false alarms (healthy runs) of one watched run."""
    raised = [e for e in result["events"] if e[2] in RAISED]
    final = [f for f in result.get("final", []) if f[1] in RAISED]
    out: dict[str, Any] = {"error": result["error"], "seconds": round(result["seconds"], 2),
                           "cpu_seconds": round(result["cpu_seconds"], 2)}
    if inj is None:
        out["false_alarms"] = sorted({e[1] for e in raised} | {f[0] for f in final})
        return out
    hits = [e for e in raised if e[1] in inj.signs]
    out["sign"] = bool(hits) or any(f[0] in inj.signs for f in final)
    out["latency"] = (hits[0][0] + 1 - inj.start) if hits else None
    lead = (final[0][0], final[0][2]) if final else ((raised[0][1], raised[0][3]) if raised
                                                     else (None, None))
    out["lead"] = lead
    out["cause"] = None if inj.causes is None else lead[1] in inj.causes
    out["raised"] = sorted({f"{e[1]}:{e[3]}" for e in raised})
    return out


# ------------------------------------------------------------------------------- tasks
def healthy_task(setup: str, short: int, long: int) -> dict[str, Any]:
    """The healthy setup: verified in plain torch (it learns in the short run, and stays
    finite without blowing up over the long one), then watched at both lengths."""
    plain = run(setup, None, short, watched=False)
    drop = relative_drop(plain["probe"]["losses"])
    learns = plain["error"] is None and (setup == "gan" or drop > 0.05)
    plain_long = run(setup, None, long, watched=False)
    losses = plain_long["probe"]["losses"]
    stable = plain_long["error"] is None and all(math.isfinite(v) for v in losses) and (
        max(losses[len(losses) // 2:]) < 3 * max(losses[:5]))
    return {"setup": setup, "probe": plain["probe"], "learns": learns, "drop": drop,
            "stable": stable,
            "plain_cpu_seconds": plain["cpu_seconds"] + plain_long["cpu_seconds"],
            "short": score(None, run(setup, None, short, watched=True)),
            "long": score(None, run(setup, None, long, watched=True))}


def pair_task(setup: str, injector: str, short: int, long: int,
              healthy_probe: dict[str, Any]) -> dict[str, Any]:
    inj = INJECTOR_BY_NAME[injector]
    plain = run(setup, injector, short, watched=False)
    bug, ref = Probe(**plain["probe"]), Probe(**healthy_probe)
    try:
        verified = plain["error"] is None and bool(inj.verify(bug, ref))
    except (ValueError, ZeroDivisionError):
        verified = False
    out: dict[str, Any] = {"setup": setup, "injector": injector, "verified": verified,
                           "plain_error": plain["error"], "plain_drop": relative_drop(bug.losses),
                           "plain_cpu_seconds": plain["cpu_seconds"]}
    if verified:
        out["short"] = score(inj, run(setup, injector, short, watched=True))
        out["long"] = score(inj, run(setup, injector, long, watched=True))
    return out


def _pool(jobs: int) -> cf.Executor:
    if jobs <= 1:
        return _Inline()
    return cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                  initializer=_worker_init)


def _worker_init() -> None:
    torch.set_num_threads(1)


class _Inline(cf.Executor):
    """Runs tasks in this process (jobs=1), with the Executor interface."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


# ----------------------------------------------------------------------------- summary
def _pct(hits: list[bool]) -> str:
    return f"{100 * sum(hits) / len(hits):.0f}% ({sum(hits)}/{len(hits)})" if hits else "-"


def _ratio(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores over some kept pairs: sign recall and top cause per length, median latency."""
    out: dict[str, Any] = {"pairs": len(rows)}
    for length in ("short", "long"):
        signs = [r[length]["sign"] for r in rows]
        causes = [r[length]["cause"] for r in rows if r[length]["cause"] is not None]
        out[f"sign_{length}"] = _ratio(signs)
        out[f"cause_{length}"] = _ratio(causes)
        for kind in ("fact", "stat"):
            lat = [r[length]["latency"] for r in rows
                   if INJECTOR_BY_NAME[r["injector"]].kind == kind
                   and r[length]["latency"] is not None]
            out[f"latency_{kind}_{length}"] = _median(lat)
    return out


def _row_cells(rows: list[dict[str, Any]]) -> list[str]:
    lat = [r["long"]["latency"] for r in rows if r["long"]["latency"] is not None]
    return [_pct([r["short"]["sign"] for r in rows]), _pct([r["long"]["sign"] for r in rows]),
            _pct([r["short"]["cause"] for r in rows if r["short"]["cause"] is not None]),
            _pct([r["long"]["cause"] for r in rows if r["long"]["cause"] is not None]),
            f"{statistics.median(lat):.0f}" if lat else "-"]


HEAD = ("| sign short | sign long | cause short | cause long | median latency (long) |",
        "|---|---|---|---|---|")


def table(title: str, key: str, groups: dict[str, list[dict[str, Any]]],
          extra: dict[str, list[str]] | None = None, extra_head: list[str] | None = None
          ) -> str:
    extra_head = extra_head or []
    lines = [f"### {title}", "",
             f"| {key} | kept | " + HEAD[0][2:] + "".join(f" {h} |" for h in extra_head),
             "|---|---|" + HEAD[1][1:] + "---|" * len(extra_head)]
    for name, rows in groups.items():
        cells = _row_cells(rows) if rows else ["-"] * 5
        more = (extra or {}).get(name, [])
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells + more) + " |")
    return "\n".join(lines) + "\n"


def report(kept: list[dict[str, Any]], dropped: list[dict[str, Any]],
           healthy: list[dict[str, Any]], held: set[tuple[str, str]],
           applicable: dict[str, int]) -> str:
    parts = []
    design = [r for r in kept if (r["setup"], r["injector"]) not in held]
    heldout = [r for r in kept if (r["setup"], r["injector"]) in held]
    parts.append(table("Overall", "pairs", {"all": kept, "design (2/3)": design,
                                            "held out (1/3)": heldout}))
    lat_lines = ["| pairs | facts short | facts long | statistical short | statistical long |",
                 "|---|---|---|---|---|"]
    for name, rows in (("all", kept), ("held out", heldout)):
        s = summarise(rows)
        cells = [s[f"latency_{k}_{n}"] for k in ("fact", "stat") for n in ("short", "long")]
        lat_lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.0f}"
                                                   for c in cells) + " |")
    parts.append("### Median latency (steps from the bug's start to the first warning)\n\n"
                 + "\n".join(lat_lines) + "\n")
    fam: dict[str, list[dict[str, Any]]] = {}
    for inj in INJECTORS:
        fam.setdefault(inj.family, [])
    for r in kept:
        fam[INJECTOR_BY_NAME[r["injector"]].family].append(r)
    parts.append(table("Per family", "family", fam))
    per_inj = {i.name: [r for r in kept if r["injector"] == i.name] for i in INJECTORS
               if applicable.get(i.name)}
    parts.append(table("Per injector", "injector", per_inj,
                       {n: [f"{len(v)}/{applicable[n]}", INJECTOR_BY_NAME[n].kind]
                        for n, v in per_inj.items()}, ["verified/applicable", "kind"]))
    per_setup = {s.name: [r for r in kept if r["setup"] == s.name] for s in SETUPS
                 if any(h["setup"] == s.name for h in healthy)}
    fa = {h["setup"]: [", ".join(h["short"]["false_alarms"]) or "none",
                       ", ".join(h["long"]["false_alarms"]) or "none"] for h in healthy}
    parts.append(table("Per setup", "setup", per_setup, fa,
                       ["false alarms healthy short", "false alarms healthy long"]))
    bad = [h for h in healthy if not h["learns"]]
    if bad:
        parts.append("Healthy setups that did not drop 5% in the short plain-torch run (their "
                     "pairs are still run): " + ", ".join(h["setup"] for h in bad) + "\n")
    wild = [h for h in healthy if not h["stable"]]
    if wild:
        parts.append("Healthy setups that blew up in the long plain-torch run (their false "
                     "alarms are not counted): " + ", ".join(h["setup"] for h in wild) + "\n")
    misses = []
    for r in kept:
        for length in ("short", "long"):
            s = r[length]
            if not s["sign"] or s["cause"] is False:
                what = "missed sign" if not s["sign"] else "wrong cause"
                tag = " (held out)" if (r["setup"], r["injector"]) in held else ""
                misses.append(f"- {r['setup']} x {r['injector']} [{length}]{tag}: {what}; "
                              f"lead {s['lead'][0]}:{s['lead'][1]}; raised "
                              f"{', '.join(s['raised']) or 'nothing'}"
                              + (f"; error {s['error']}" if s["error"] else ""))
    parts.append("### Misses\n\n" + ("\n".join(misses) or "none") + "\n")
    drops = [f"- {d['setup']} x {d['injector']}: plain-torch symptom not shown "
             f"(loss drop {d['plain_drop']:.1%}"
             + (f", error {d['plain_error']}" if d["plain_error"] else "") + ")"
             for d in dropped]
    parts.append("### Dropped pairs (symptom not verified with plain torch)\n\n"
                 + ("\n".join(drops) or "none") + "\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default=None, help="comma-separated setup names")
    parser.add_argument("--injectors", default=None, help="comma-separated injector names")
    parser.add_argument("--short", type=int, default=60, help="optimizer steps, short runs")
    parser.add_argument("--long", type=int, default=600, help="optimizer steps, long runs")
    parser.add_argument("--split", choices=("all", "design", "heldout"), default="all",
                        help="run all pairs, only the design two thirds, or only the held-out")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--quick", action="store_true",
                        help=f"setups {','.join(QUICK_SETUPS)} x injectors "
                             f"{','.join(QUICK_INJECTORS)}, 30/60 steps")
    parser.add_argument("--json", default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.setups = args.setups or ",".join(QUICK_SETUPS)
        args.injectors = args.injectors or ",".join(QUICK_INJECTORS)
        args.short, args.long = 30, 60
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    setups = args.setups.split(",") if args.setups else [s.name for s in SETUPS]
    injectors = args.injectors.split(",") if args.injectors else [i.name for i in INJECTORS]
    unknown = sorted(set(setups) - set(SETUP_BY_NAME)) + sorted(
        set(injectors) - set(INJECTOR_BY_NAME))
    if unknown:
        raise SystemExit(f"unknown setup/injector name(s): {', '.join(unknown)}")
    if {"gpt2_nanogpt", "bert"} & set(setups):
        import transformers  # noqa: F401  (imported once, before the workers fork)
    pairs = all_pairs(setups, injectors)
    held = holdout(all_pairs([s.name for s in SETUPS], [i.name for i in INJECTORS]))
    if args.split != "all":
        pairs = [p for p in pairs if (p in held) == (args.split == "heldout")]
    applicable: dict[str, int] = {}
    for _, inj in pairs:
        applicable[inj] = applicable.get(inj, 0) + 1
    started = time.perf_counter()
    log(f"{len(setups)} setups, {len(pairs)} pairs, lengths {args.short}/{args.long}, "
        f"{args.jobs} worker(s)")
    with _pool(args.jobs) as pool:
        healthy_f = {s: pool.submit(healthy_task, s, args.short, args.long) for s in setups}
        healthy = {s: f.result() for s, f in healthy_f.items()}
        log(f"healthy runs done in {time.perf_counter() - started:.0f} s")
        order = sorted(pairs, key=lambda p: -COST.get(p[0], 1))
        futures = [pool.submit(pair_task, s, i, args.short, args.long, healthy[s]["probe"])
                   for s, i in order]
        results = []
        for n, f in enumerate(cf.as_completed(futures), 1):
            results.append(f.result())
            if n % 20 == 0:
                log(f"{n}/{len(futures)} pairs done ({time.perf_counter() - started:.0f} s)")
    seconds = time.perf_counter() - started
    rank = {p: n for n, p in enumerate(pairs)}
    results.sort(key=lambda r: rank[(r["setup"], r["injector"])])
    kept = [r for r in results if r["verified"]]
    dropped = [r for r in results if not r["verified"]]
    healthy_rows = [healthy[s] for s in setups]
    text = report(kept, dropped, healthy_rows, held, applicable)
    print(text)
    false_alarms = {h["setup"]: {"short": h["short"]["false_alarms"],
                                 "long": h["long"]["false_alarms"]} for h in healthy_rows}
    design = [r for r in kept if (r["setup"], r["injector"]) not in held]
    heldout = [r for r in kept if (r["setup"], r["injector"]) in held]
    result = {
        "benchmark": "gradscope-diagnosis", "quick": args.quick, "split": args.split,
        "short": args.short, "long": args.long, "setups": len(setups),
        "injectors": len({i for _, i in pairs}), "applicable": len(pairs),
        "verified": len(kept), "dropped": [f"{d['setup']}x{d['injector']}" for d in dropped],
        "overall": summarise(kept), "design": summarise(design),
        "heldout": summarise(heldout),
        "healthy_runs": 2 * len(healthy_rows),
        "false_alarm_runs": sum(bool(v["short"]) + bool(v["long"])
                                for s, v in false_alarms.items() if healthy[s]["stable"]),
        "unstable_healthy": [h["setup"] for h in healthy_rows if not h["stable"]],
        "false_alarms": false_alarms,
        "per_injector": {i: summarise([r for r in kept if r["injector"] == i])
                         for i in applicable},
        "per_setup": {s: summarise([r for r in kept if r["setup"] == s]) for s in setups},
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds(results, healthy_rows), 1),
        "pairs": [{"setup": r["setup"], "injector": r["injector"],
                   "heldout": (r["setup"], r["injector"]) in held,
                   "short": r["short"], "long": r["long"]} for r in kept],
    }
    line = json.dumps(result, default=_jsonable)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    log(f"done in {seconds:.0f} s wall, {result['cpu_seconds']:.0f} s CPU over all runs")
    return result


def cpu_seconds(results: list[dict[str, Any]], healthy: list[dict[str, Any]]) -> float:
    """CPU time of every run (plain and watched): the wall time on idle cores is about this
    divided by the number of workers."""
    total = 0.0
    for r in [*results, *healthy]:
        total += r["plain_cpu_seconds"]
        total += sum(r[n]["cpu_seconds"] for n in ("short", "long") if n in r)
    return total


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
