"""The first bad step of a run and what it and the steps before it say about the cause.

Every step is seen: recorded steps through their records, the steps in between through the
flight recorder's rows (gradient and weight maxima, input/output NaN flags) and the per-step
losses. The cause is judged from the first bad step and the steps before it, never after
(after a NaN everything is NaN).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..history import History, StepRecord
from .base import Finding
from .common import fmt, ranked
from .data import unnormalised
from .evidence import leftover_gradients

#: Growth of the largest gradient over its start that counts as a blow-up (two orders).
GROWTH = 100.0
#: Update/weight ratio above which steps are too large (ten times the healthy ~1e-3).
HIGH_UPDATE = 1e-2
HEALTHY_UPDATE = 1e-3
#: A loss this many times its first value within the run is a blow-up (three orders).
BLOWUP = 1e3
#: A smaller jump (an order of magnitude above the first loss) is a blow-up too when the
#: steps before it were oversized: gradient clipping keeps the gradients from growing, so
#: the step size is the evidence.
CLIPPED_BLOWUP = 10.0


@dataclass
class Steps:
    """Per-step signals of the whole run held in the history, in step order."""

    steps: list[int] = field(default_factory=list)
    grad: dict[int, np.ndarray] = field(default_factory=dict)  # largest |grad| per param
    input_bad: dict[int, bool] = field(default_factory=dict)
    output_bad: dict[int, bool] = field(default_factory=dict)
    overflow: set[int] = field(default_factory=set)
    origins: dict[int, dict[str, Any]] = field(default_factory=dict)
    records: dict[int, StepRecord] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)


def collect(history: History) -> Steps:
    """Gather every step's signals from the records, their flight logs and the losses."""
    out = Steps()
    loss_steps, loss_values = history.losses()
    out.losses = dict(zip(loss_steps.tolist(), loss_values.tolist()))
    logs = [(r, r.flight) for r in history.records()]
    tail = getattr(history, "flight_tail", None)
    for r, log in [*logs, (None, tail)]:
        if r is not None:
            _add_record(out, r)
        if log is None:
            continue
        for s, i_bad, o_bad in zip(log.steps, log.input_bad, log.output_bad):
            out.input_bad[s] = out.input_bad.get(s, False) or i_bad
            out.output_bad[s] = o_bad
        for s, g in zip(log.norm_steps, log.grad_max):
            out.grad[s] = np.asarray(g, dtype=float)
        if log.origin is not None and "step" in log.origin:
            out.origins[int(log.origin["step"])] = log.origin
    out.steps = sorted(set(out.grad) | set(out.losses) | set(out.output_bad))
    return out


def _add_record(out: Steps, r: StepRecord) -> None:
    out.records[r.step] = r
    if r.overflow:
        out.overflow.add(r.step)
    # records of runs without the flight recorder: a norm that overflowed is not a NaN/Inf
    grad = np.where(np.isinf(r.grad_max), np.finfo(np.float32).max, r.grad_max)
    out.grad.setdefault(r.step, np.where(r.grad_nonfinite > 0, np.inf, grad))
    if r.data is not None and r.data.nonfinite > 0:
        out.input_bad[r.step] = True


def _loss_bad(value: float | None, record: StepRecord | None) -> bool:
    if value is None:
        return False
    # a recorded step with no loss given logs NaN; between records only given losses exist
    given = (record is None or not math.isnan(value)
             or record.loss_requires_grad is not None)
    return given and not math.isfinite(value)


def first_bad_step(s: Steps) -> tuple[int, list[str]] | None:
    """(step, what went non-finite there) of the first step with NaN/Inf anywhere.

    Weights are not a trigger of their own: an update that makes them NaN/Inf shows in the
    next forward's output.
    """
    for step in s.steps:
        what = []
        if s.input_bad.get(step):
            what.append("input")
        if s.output_bad.get(step):
            what.append("output")
        if _loss_bad(s.losses.get(step), s.records.get(step)):
            what.append("loss")
        grad = s.grad.get(step)
        if grad is not None and step not in s.overflow and np.any(np.isinf(grad)):
            what.append("gradients")
        # weights: a norm of huge finite weights overflows, so a record's inf weight norm
        # proves nothing; weights made NaN/Inf by an update show in the next output instead
        if step in s.records and s.records[step].nonfinite_origin is not None:
            what.append("activations")
        if what:
            return step, what
    return None


def _totals(s: Steps, before: int) -> tuple[list[int], np.ndarray]:
    """Steps before `before` with a finite measured largest |gradient|, and those values."""
    steps, values = [], []
    for step in s.steps:
        if step >= before:
            break
        grad = s.grad.get(step)
        if grad is None or step in s.overflow:
            continue
        measured = grad[~np.isnan(grad)]
        if measured.size and np.all(np.isfinite(measured)):
            steps.append(step)
            values.append(float(measured.max()))
    return steps, np.asarray(values)


def growth(s: Steps, layout: Any, before: int) -> dict[str, Any] | None:
    """How the largest gradient grew over the steps before `before` (None if under GROWTH).

    Example: {"factor": 1e6, "from_step": 3, "steps": 40, "layer": "fc1", "start": ..., ...}
    """
    steps, values = _totals(s, before)
    if values.size < 2:
        return None
    start = float(values[0])
    peak_at = int(np.argmax(values))
    if not start > 0 or values[peak_at] < GROWTH * start:
        return None
    rising = int(np.flatnonzero(values >= 10 * start)[0])
    # the layer whose gradient first passed ten times its own start
    layer = ""
    first_cross = math.inf
    owners = layout.owners
    early = np.vstack([s.grad[st] for st in steps[:3]])
    with np.errstate(invalid="ignore"):
        base = np.nanmedian(early, axis=0)
    for k, st in enumerate(steps):
        over = np.flatnonzero(s.grad[st] >= 10 * base)
        if over.size and k < first_cross:
            first_cross = k
            layer = layout.layers[int(owners[int(over[0])])] or "(root)"
            break
    return {"factor": float(values[peak_at] / start), "start": start,
            "peak": float(values[peak_at]), "from_step": steps[rising],
            "to_step": steps[peak_at], "layer": layer}


def early_update(s: Steps, layout: Any, before: int) -> tuple[float, int] | None:
    """(median per-layer update/weight ratio, its step) of the first record before `before`
    that measured one: the size of the steps before anything grew."""
    for step in sorted(s.records):
        if step >= before:
            break
        ratios = s.records[step].layer_update_ratio(layout)
        ratios = ratios[np.isfinite(ratios)]
        if ratios.size:
            return float(np.median(ratios)), step
    return None


def _update_text(update: tuple[float, int], lrs: list[float]) -> str:
    ratio, step = update
    lr = f" at learning rate {fmt(lrs[0])}" if lrs else ""
    return (f"update/weight ratio {fmt(ratio)} at step {step}{lr}, "
            f"{fmt(ratio / HEALTHY_UPDATE)}x the healthy ~{fmt(HEALTHY_UPDATE)}: each step "
            "rewrote the weights")


def _growth_text(g: dict[str, Any]) -> str:
    return (f"largest gradient grew {fmt(g['factor'])}x (from {fmt(g['start'])} to "
            f"{fmt(g['peak'])}) from step {g['from_step']} to {g['to_step']}, first in "
            f"'{g['layer']}'")


def blowup_causes(s: Steps, layout: Any, before: int) -> list[tuple[str, float, str]]:
    """Scores for lr-too-high / exploding-gradients from the steps before `before`."""
    g = growth(s, layout, before)
    update = early_update(s, layout, before)
    lrs = next((r.lrs for r in s.records.values()), [])
    scores: list[tuple[str, float, str]] = []
    huge = _unnormalised_inputs(s, before)
    if huge is not None:
        # inputs far from normalised make outputs and gradients scale with them: the first
        # cause to fix, whatever the learning rate
        scores.append(("data-scale", 4.0,
                       f"the inputs before it were not normalised (|x| up to {fmt(huge)} in "
                       "every recorded step): the first layers' outputs and gradients scale "
                       "with them"))
    if g is None:
        if update is not None and update[0] > HIGH_UPDATE:
            scores.append(("lr-too-high", 2.0, _update_text(update, lrs) + "; the gradients "
                                               "stayed bounded (clipping), the steps did not"))
        return scores  # nothing grew: the steps before were not blowing up
    stale = leftover_gradients([r for step, r in s.records.items() if step < before])
    if stale:
        # gradients never cleared: each update follows the running sum of all gradients,
        # which grows step by step; the growth and the oversized steps are its consequences
        scores.append(("missing-zero-grad", 4.0,
                       f"the previous step's gradients were still there when backward began "
                       f"in {stale[0]} of {stale[1]} recorded steps before it: every update "
                       "follows the growing sum of all gradients so far"))
    if update is not None and update[0] > HIGH_UPDATE:
        scores.append(("lr-too-high", 3.0, _update_text(update, lrs)))
        if g is not None:
            scores.append(("exploding-gradients", 1.0, _growth_text(g) + " (a consequence "
                                                       "of the oversized steps)"))
    elif g is not None:
        scores.append(("exploding-gradients", 3.0, _growth_text(g) + " over "
                       f"{g['to_step'] - g['from_step'] + 1} steps while the first steps "
                       "were of a healthy size"))
        if update is not None:
            scores.append(("lr-too-high", 0.5, f"update/weight ratio {fmt(update[0])} at "
                           f"step {update[1]}: the learning rate may be at its stability edge"))
    return scores


def _unnormalised_inputs(s: Steps, before: int) -> float | None:
    """The largest |input| when every recorded input before `before` was far from
    normalised (see rules.data.unnormalised); else None."""
    data = [r.data for step, r in s.records.items() if step < before and r.data is not None]
    if not data or not all(unnormalised(d) for d in data):
        return None
    return max(max(abs(d.min), abs(d.max)) for d in data)


@dataclass
class Onset:
    """The first bad step, what went bad there, the ranked causes and the place named."""

    step: int
    what: list[str]
    scores: list[tuple[str, float, str]]
    place: str  # a module name, "loss", "input" or ""
    origin: dict[str, Any] | None
    summary: str


def _record_bad(r: StepRecord) -> bool:
    """Whether a record (or the flight rows it carries) shows NaN/Inf anywhere."""
    return r.derived("onset_bad", lambda: bool(
        (r.flight is not None and r.flight.nonfinite())
        or np.any(r.grad_nonfinite > 0) or r.nonfinite_origin is not None
        or (r.data is not None and r.data.nonfinite > 0)))


#: History -> how many of its records were found free of NaN/Inf (each is looked at once).
_CLEAN: weakref.WeakKeyDictionary[History, int] = weakref.WeakKeyDictionary()


def _clean(history: History) -> bool:
    """Whether nothing in `history` is NaN/Inf (records already seen clean are skipped)."""
    tail = history.flight_tail
    if not history.loss_scan.all_finite() or (tail is not None and tail.nonfinite()):
        return False
    seen = _CLEAN.get(history, 0)
    new = history.total_recorded - seen
    records = history.recent(new) if 0 <= new <= len(history) else history.records()
    if any(_record_bad(r) for r in records):
        return False
    _CLEAN[history] = history.total_recorded
    return True


def find_onset(history: History) -> Onset | None:
    """Judge the first bad step of `history` from that step and the ones before it."""
    if _clean(history):
        return None  # the common case, without building the per-step view
    s = collect(history)
    found = first_bad_step(s)
    if found is None:
        return None
    step, what = found
    layout = history.layout
    origin = s.origins.get(step)
    record = s.records.get(step)
    if origin is None and record is not None and record.nonfinite_origin is not None:
        origin = {"step": step, "kind": "module", "module": record.nonfinite_origin,
                  "type": layout.module_types.get(record.nonfinite_origin, "module")}
    scores: list[tuple[str, float, str]] = []
    place = ""
    parts = ", ".join(what)
    if "input" in what:
        where = ""
        if origin is not None and origin.get("kind") == "input":
            where = (f" (rows {origin.get('rows')}, columns {origin.get('columns')}, "
                     f"{origin.get('count')} values)")
        scores.append(("data-nonfinite", 5.0,
                       f"the input batch of step {step} held NaN/Inf{where}"))
        place = "input"
    else:
        blowup = blowup_causes(s, layout, step)
        scores += blowup
        seen = origin or {}
        kind = seen.get("kind")
        if kind in ("module", "gap") and not seen.get("weights_bad"):
            module = seen["module"]
            place = module
            if kind == "gap":
                between = " and ".join(f"'{m}'" for m in (seen.get("after"),
                                                           seen.get("before")) if m)
                # the root module has the empty name: call it the model
                owner = (f"the model's own forward ({seen.get('type')})" if not module else
                         f"the forward code of '{module}' ({seen.get('type')})")
                text = (f"{owner} itself, between its submodules {between}, turned finite "
                        f"values into NaN/Inf at step {step}" if between else
                        f"{owner} turned finite values into NaN/Inf at step {step}")
            else:
                text = (f"'{module}' ({seen.get('type')}) turned finite inputs into NaN/Inf "
                        f"at step {step}, its weights finite")
            if not blowup:  # after a blow-up the overflow there is its consequence
                scores.append(("invalid-math", 2.0, text))
        elif "output" not in what and "loss" in what:
            place = "loss"
            if not blowup:
                scores.append(("invalid-math", 2.0,
                               f"the model's output was finite at step {step} and the loss "
                               "was not: the loss computation made the NaN/Inf (log of 0, "
                               "0/0, overflow)"))
        elif "output" in what and not blowup:
            scores.append(("invalid-math", 1.0, f"the model's output went NaN/Inf at step "
                                                f"{step} from a finite input"))
        elif "gradients" in what and not blowup:
            names = record.nonfinite_grad_params if record is not None else []
            near = f", nearest the loss '{names[0]}'" if names else ""
            scores.append(("invalid-math", 1.0, f"the loss and output were finite at step "
                                                f"{step} but gradients were not{near}: a "
                                                "backward formula hit an infinite slope "
                                                "(sqrt or pow at 0, ...)"))
        if not blowup and not place and record is not None and record.overflow:
            scores.append(("exploding-gradients", 0.5, "AMP gradient overflow"))
        if blowup and not place:
            place = ""
    where = {"input": "in the input batch", "loss": "in the loss"}.get(
        place, f"first in '{place}'" if place else "")
    summary = f"first non-finite at step {step} ({parts})" + (f", {where}" if where else "")
    return Onset(step, what, scores, place, origin, summary)


def onset_finding(onset: Onset, extra: dict[str, Any] | None = None) -> Finding:
    """The Finding of a first bad step (shared by the NaN/Inf rules: same step, same cause)."""
    causes = ranked(onset.scores) or ranked([("invalid-math", 0.3, "no step before it "
                                              "shows a blow-up; look for log/sqrt/division")])
    origin = onset.origin or {}
    evidence = {"first_nonfinite_step": onset.step, "nonfinite": ", ".join(onset.what),
                "origin": onset.place or None}
    if origin.get("kind") == "gap":
        evidence["gap_after"] = origin.get("after")
        evidence["gap_before"] = origin.get("before")
    if origin.get("kind") == "input":
        evidence["input_rows"] = origin.get("rows")
        evidence["input_columns"] = origin.get("columns")
    evidence.update(extra or {})
    layers = [onset.place] if onset.place not in ("", "loss", "input") else []
    return Finding(summary=onset.summary, causes=causes, layers=layers,
                   first_step=onset.step, evidence=evidence, checks=list(CHECKS))


CHECKS = (
    "Look at the place named: guard log/sqrt/division with a small epsilon or clamp, and keep "
    "exp/softmax inputs bounded (use log_softmax / cross_entropy instead of log(softmax)).",
    "Check the input batch and targets of the first bad step for NaN/Inf and extreme values.",
    "If gradients or update sizes grew before it: lower the learning rate and clip gradients "
    "(clip_grad_norm_).",
)


def first_blowup(history: History, factor: float = BLOWUP) -> tuple[int, float, float] | None:
    """(step, loss there, loss at the start) of the first loss `factor` times the first one."""
    scan = history.loss_scan
    first = scan.first_finite()
    if first is None or not first[1] > 0 or not scan.max_finite() >= factor * first[1]:
        return None  # no loss reached it: known without reading the whole loss history
    steps, values = history.losses()
    finite = np.isfinite(values)
    if not finite.any():
        return None
    start = float(values[finite][0])
    if not start > 0:
        return None
    with np.errstate(invalid="ignore"):
        over = np.flatnonzero(finite & (values >= factor * start))
    if over.size == 0:
        return None
    i = int(over[0])
    return int(steps[i]), float(values[i]), start


__all__ = ["Onset", "blowup_causes", "find_onset", "first_blowup", "growth", "onset_finding"]
