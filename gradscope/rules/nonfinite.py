"""Rule on NaN/Inf in activations, gradients or weights, with where it started."""

from __future__ import annotations

import numpy as np

from . import evidence as ev
from .base import Finding, Threshold, rule
from .common import ranked
from .context import RuleContext
from .thresholds import HIGH_UPDATE

OVERFLOW_RUN = Threshold(10, "AMP overflow-skipped steps in a row tolerated: GradScaler skips a "
                             "few steps while it lowers its scale, but not for long")


@rule(sign="values-nonfinite", severity="error",
      title="NaN/Inf appeared in activations, gradients or weights",
      needs=("activations", "grad_norm", "grad_nonfinite", "param_norm", "data"),
      thresholds={"overflow_run": OVERFLOW_RUN, "high_update": HIGH_UPDATE},
      causes=("invalid-math", "data-nonfinite", "exploding-gradients", "lr-too-high"))
def values_nonfinite(ctx: RuleContext) -> Finding | None:
    """Some tensor inside the model went non-finite; names the module or parameter it began in."""
    records = ctx.records
    overflow_run = 0
    for r in reversed(records):
        if not r.overflow:
            break
        overflow_run += 1
    bad = [r for r in records if _nonfinite(r) and not r.overflow]
    if not bad and overflow_run < ctx.t["overflow_run"]:
        return None
    first = bad[0] if bad else records[-overflow_run]
    scores = [ev.data_nonfinite([first])]
    layers: list[str] = []
    if first.nonfinite_origin is not None:
        module = first.nonfinite_origin
        layers.append(module)
        kind = ctx.layout.module_types.get(module, "module")
        own = [i for i, p in enumerate(ctx.layout.params) if p.layer == module]
        if own and np.any(~np.isfinite(first.param_norm[own])):
            scores.append(("exploding-gradients", 1.5,
                           f"the weights of '{module}' ({kind}) were already NaN/Inf"))
        else:
            scores.append(("invalid-math", 2.0,
                           f"'{module}' ({kind}) turned finite inputs into NaN/Inf at step "
                           f"{first.step}"))
    if first.nonfinite_grad_params:
        name = first.nonfinite_grad_params[0]
        layer = next((p.layer for p in ctx.layout.params if p.name == name), "")
        layers.append(layer)
        scores.append(("exploding-gradients", 1.0,
                       f"gradients of {len(first.nonfinite_grad_params)} parameter(s) were "
                       f"non-finite at step {first.step}, nearest the loss: '{name}'"))
    before = [r for r in records if r.step < first.step][-5:]
    if before:
        scores.append(ev.lr_too_high(ctx, before, ctx.t["high_update"]))
    where = "AMP overflow every step" if not bad else _where(first)
    return Finding(
        summary=f"non-finite values at step {first.step}: {where}",
        causes=ranked(scores), layers=list(dict.fromkeys(layers)), first_step=first.step,
        evidence={"step": first.step, "origin": first.nonfinite_origin,
                  "nonfinite_grad_params": len(first.nonfinite_grad_params),
                  "overflow_run": overflow_run},
        checks=[
            "Inspect the named module's forward for log/sqrt/division/pow/exp on values that "
            "can reach 0, negatives or large magnitudes.",
            "Lower the learning rate and clip gradients if weights went non-finite after "
            "an update.",
            "With AMP that overflows every step, check for values outside the float16 range "
            "or use bfloat16.",
        ],
    )


def _nonfinite(record) -> bool:
    return record.derived("nonfinite_any", lambda: bool(
        record.nonfinite_origin is not None or record.nonfinite_grad_params
        or not record.weights_finite() or record.modules_over("nonfinite_frac", 0.0)))


def _where(record) -> str:
    parts = []
    if record.nonfinite_origin is not None:
        parts.append(f"first in the output of '{record.nonfinite_origin}'")
    if record.nonfinite_grad_params:
        parts.append(f"{len(record.nonfinite_grad_params)} parameter gradient(s)")
    bad_act = sum(1 for s in record.activations.values() if s.nonfinite_frac > 0)
    if bad_act:
        parts.append(f"{bad_act} module output(s)")
    return ", ".join(parts) or "weights"




RULES = [values_nonfinite]
