"""Rule on NaN/Inf in activations, gradients or weights, with where it started."""

from __future__ import annotations

import numpy as np

from .base import Finding, Threshold, rule
from .common import fmt, ranked
from .context import RuleContext
from .onset import (
    BLOWUP,
    CLIPPED_BLOWUP,
    blowup_causes,
    collect,
    early_update,
    find_onset,
    first_blowup,
    growth,
    onset_finding,
)
from .thresholds import HIGH_UPDATE

#: Steps after a smaller (clipped) loss jump before it is judged: a jump still on its way
#: to a full blow-up is judged as one, from its own step.
SETTLE_STEPS = 20
OVERFLOW_RUN = Threshold(10, "AMP overflow-skipped steps in a row tolerated: GradScaler skips a "
                             "few steps while it lowers its scale, but not for long")


@rule(sign="values-nonfinite", severity="error",
      title="NaN/Inf appeared in activations, gradients or weights",
      needs=("activations", "grad_norm", "grad_nonfinite", "param_norm", "data"),
      thresholds={"overflow_run": OVERFLOW_RUN, "high_update": HIGH_UPDATE},
      causes=("invalid-math", "data-nonfinite", "exploding-gradients", "lr-too-high"))
def values_nonfinite(ctx: RuleContext) -> Finding | None:
    """Some tensor inside the model went non-finite; names the step and place it began in."""
    records = ctx.records
    overflow_run = 0
    for r in reversed(records):
        if not (r.skipped and r.overflow):
            break
        overflow_run += 1
    onset = ctx.memo("onset", lambda: find_onset(ctx.history))
    if onset is not None and not records:
        return None
    if onset is not None and _inside(ctx, onset.step):
        return onset_finding(onset, {"overflow_run": overflow_run})
    if overflow_run < ctx.t["overflow_run"]:
        return None
    first = records[-overflow_run]
    return Finding(
        summary=f"AMP overflow every step since step {first.step}",
        causes=ranked([("exploding-gradients", 1.0, f"gradients overflowed float16 on "
                                                    f"{overflow_run} steps in a row")]),
        first_step=first.step, evidence={"step": first.step, "overflow_run": overflow_run},
        checks=["With AMP that overflows every step, check for values outside the float16 "
                "range or use bfloat16."],
    )


@rule(sign="grad-exploding", severity="error", title="Training blew up",
      needs=("loss", "grad_norm", "update_ratio"),
      thresholds={"high_update": HIGH_UPDATE},
      causes=("lr-too-high", "exploding-gradients"), id="blow-up")
def blow_up(ctx: RuleContext) -> Finding | None:
    """The loss jumped by orders of magnitude in a few steps without going NaN/Inf."""
    if ctx.memo("onset", lambda: find_onset(ctx.history)) is not None:
        return None  # the NaN/Inf rules explain it from its first bad step
    # a loss that never reached 10x its first value reached no 1000x either: one scan
    jump = first_blowup(ctx.history, CLIPPED_BLOWUP)
    if jump is None:
        return None
    jump = first_blowup(ctx.history) or jump
    step, value, start = jump
    s = collect(ctx.history)
    scores = blowup_causes(s, ctx.layout, step + 1)
    if value < BLOWUP * start:
        # a smaller jump counts only when clipping kept the gradients from growing and the
        # steps were oversized; growing gradients are judged by the full jump
        # the whole loss history, as first_blowup read it: the jump may be older than the
        # rules' recent loss window
        loss_steps, loss_values = ctx.history.losses()
        settled = loss_steps.size and int(loss_steps[-1]) - step >= SETTLE_STEPS
        if growth(s, ctx.layout, step + 1) is not None or not settled:
            return None  # growing gradients, or a jump that may still be on its way up
        after = loss_values[(loss_steps > step) & (loss_steps <= step + 3)]
        if after.size < 3 or not np.median(after) >= CLIPPED_BLOWUP * start:
            return None  # one batch's spike (an outlier batch), not the model blowing up
        scores = [c for c in scores if c[0] == "lr-too-high"]
    if not scores:
        return None  # the gradients did not blow up with it: a noisy or drifting loss
    update = early_update(s, ctx.layout, step + 1)
    later = [r for r in ctx.records if r.step > step]
    dead = sorted({m for r in later for m in r.modules_over("dead_frac", 0.5)})
    consequences = ("; later signs are its consequences: dead units in "
                    f"{', '.join(dead[:3])}" if dead else "")
    return Finding(
        summary=(f"loss jumped to {fmt(value)} at step {step} from {fmt(start)} at the start "
                 f"({fmt(value / start)}x){consequences}"),
        causes=ranked(scores), first_step=step,
        evidence={"blowup_step": step, "loss": value, "loss_start": start,
                  "update_ratio": update[0] if update else None,
                  "consequences": dead},
        checks=["Lower the learning rate (10x and more) and clip gradients "
                "(clip_grad_norm_); add warm-up.",
                "Dead ReLUs or vanishing gradients after the jump follow from it: fix the "
                "jump first."],
    )


def _inside(ctx: RuleContext, start: int) -> bool:
    """Whether NaN/Inf reached the model itself (output, activations, gradients) at or after
    `start`: a NaN loss alone is the loss rule's."""
    return any(r.step >= start and (r.nonfinite_origin is not None or r.nonfinite_grad_params
                                    or r.modules_over("nonfinite_frac", 0.0)
                                    or (r.flight is not None and r.flight.nonfinite()))
               for r in ctx.history.records()) or (
        ctx.history.flight_tail is not None and ctx.history.flight_tail.nonfinite())


RULES = [values_nonfinite, blow_up]
