"""Rule on parameters that do not change although the optimizer steps."""

from __future__ import annotations

import math

import numpy as np

from .. import records as record_views
from .base import Finding, Threshold, rule
from .common import fmt, in_lr_warmup, ranked
from .context import RuleContext

FROZEN_WINDOW = Threshold(3, "optimizer steps (recorded) in a row without any change before "
                             "a parameter is called frozen")


@rule(sign="params-frozen", severity="warning", title="Parameters do not change",
      needs=("changed", "grad_norm", "not_in_optimizer", "requires_grad", "lrs"),
      thresholds={"window": FROZEN_WINDOW,
                  "tiny_relative_grad": Threshold(
                      1e-6, "gradient/weight norm ratio below which an update at an ordinary "
                            "learning rate falls under float32 resolution (~1.2e-7 relative)")},
      causes=("missing-from-optimizer", "vanishing-gradients", "lr-too-low",
              "frozen-on-purpose", "requires-grad-off"))
def params_frozen(ctx: RuleContext) -> Finding | None:
    """Parameters keep their values across optimizer steps."""
    stepped = [r for r in ctx.records if r.stepped]
    window = int(ctx.t["window"])
    if len(stepped) < window:
        return _frozen_on_purpose(ctx)
    tail = stepped[-window:]
    if in_lr_warmup(tail) or not _may_be_frozen(tail[-1]):
        return _frozen_on_purpose(ctx)
    has_grad = np.logical_and.reduce([(r.grad_norm > 0) & np.isfinite(r.grad_norm)
                                      for r in tail])
    unchanged = np.logical_and.reduce([r.changed == 0 for r in tail])
    trainable = tail[-1].requires_grad
    frozen = unchanged & has_grad & trainable
    if not frozen.any():
        return _frozen_on_purpose(ctx)
    idx = np.flatnonzero(frozen)
    last = tail[-1]
    names = ctx.param_names(idx)
    missing = idx[last.not_in_optimizer[idx]]
    scores = []
    evidence: dict[str, object] = {"frozen_params": int(idx.size),
                                   "not_in_optimizer": int(missing.size)}
    if missing.size:
        scores.append(("missing-from-optimizer", 2.0 * missing.size / idx.size,
                       f"{missing.size} of them are in no optimizer param group (e.g. "
                       f"'{ctx.layout.params[missing[0]].name}')"))
    in_opt = idx[~last.not_in_optimizer[idx]]
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = last.grad_norm[in_opt] / last.param_norm[in_opt]
    small = relative < ctx.t["tiny_relative_grad"]
    tiny = in_opt[small]
    if tiny.size:
        # the example is the first tiny parameter, with its own ratio
        example, ratio = ctx.layout.params[tiny[0]].name, float(relative[small][0])
        evidence.update(tiny_grad_params=int(tiny.size), tiny_grad_example=example,
                        tiny_grad_ratio=ratio)
        scores.append(("vanishing-gradients", 2.0 * tiny.size / idx.size,
                       f"{tiny.size} of them get gradients below "
                       f"{fmt(ctx.t['tiny_relative_grad'])} of their weight norm (e.g. "
                       f"'{example}': {fmt(ratio)}), so each update is lost to float rounding"))
        in_opt = in_opt[~small]
    if in_opt.size:
        lrs = [lr for lr in last.lrs if np.isfinite(lr)]
        zero_lr = any(lr == 0 for lr in lrs)
        scores.append(("lr-too-low", 1.5 if zero_lr else 1.0,
                       f"{in_opt.size} of them are in the optimizer but did not move "
                       f"(learning rate(s) {', '.join(fmt(lr) for lr in lrs) or 'unknown'}): "
                       "steps below float precision or a zero learning rate"))
    order = {name: i for i, name in enumerate(ctx.layout.layers)}
    layers = sorted({ctx.layout.params[i].layer for i in idx}, key=lambda n: order.get(n, 0))
    return Finding(
        summary=(f"{idx.size} parameter(s) received gradients but did not change in {window} "
                 f"optimizer steps (e.g. '{names[0]}')"),
        causes=ranked(scores), layers=layers, first_step=tail[0].step,
        evidence=evidence,
        checks=[
            "Build the optimizer from model.parameters() after the model is complete (layers "
            "added later are not in it).",
            "Check the learning rate of each param group, including schedulers that decay to 0.",
        ],
    )


def _may_be_frozen(record) -> bool:
    """Whether some trainable parameter of `record` got a gradient and did not change (every
    record of the window must show it for that parameter; kept with the record)."""
    def compute() -> bool:
        if record.grad_norm.size <= record_views.SMALL_ARRAY:  # the same tests per value
            return any(c == 0 and 0 < g < math.inf and t for c, g, t in zip(
                record.changed.tolist(), record.grad_norm.tolist(),
                record.requires_grad.tolist()))
        return bool(np.any((record.changed == 0) & (record.grad_norm > 0)
                           & np.isfinite(record.grad_norm) & record.requires_grad))

    return record.derived("may_be_frozen", compute)


def _output_layer(ctx: RuleContext) -> str | None:
    """The parameterised module that runs last in the forward pass (registration order when
    no forward was seen): the model's output layer."""
    owners = {p.layer for p in ctx.layout.params}
    record = next((r for r in reversed(ctx.records) if r.activations), None)
    if record is not None:
        ran = [(record.activations[name].order, name) for name in record.activations
               if name in owners]
        if ran:
            return max(ran)[1]
    ordered = [name for name in ctx.layout.layers if name in owners]
    return ordered[-1] if ordered else None


def _frozen_at_watch(ctx: RuleContext) -> list:
    return ctx.layout.static("frozen_at_watch",
                             lambda: [p for p in ctx.layout.params if not p.requires_grad])


def frozen_output(ctx: RuleContext) -> tuple[str | None, int]:
    """(the output layer, how many earlier layers train) when the output layer was frozen
    before watching started while other layers train; (None, 0) otherwise. Fine-tuning
    freezes the body and trains the head: the other way round is a freezing rule that
    matched the wrong names."""
    frozen = _frozen_at_watch(ctx)
    if not frozen or not ctx.records:
        return None, 0
    output = _output_layer(ctx)
    frozen_layers = {p.layer for p in frozen}
    training = {p.layer for p in ctx.layout.params if p.requires_grad} - frozen_layers
    return (output, len(training)) if output in frozen_layers and training else (None, 0)


def frozen_output_score(ctx: RuleContext) -> tuple[str, float, str]:
    """The cause score of a frozen output layer (see frozen_output), for other signs."""
    output, _ = frozen_output(ctx)
    if output is None:
        return ("requires-grad-off", 0.0, "")
    return ("requires-grad-off", 3.0, f"the output layer '{output}' has requires_grad=False: "
                                      "the model's output cannot learn")


def _frozen_on_purpose(ctx: RuleContext) -> Finding | None:
    frozen = _frozen_at_watch(ctx)
    if not frozen or not ctx.records:
        return None
    output, training = frozen_output(ctx)
    if output is not None:
        return Finding(
            summary=(f"the output layer '{output}' was frozen (requires_grad=False) before "
                     f"watching started while {training} earlier layer(s) train"),
            causes=ranked([("requires-grad-off", 1.0,
                            f"'{output}' produces the model's output but cannot learn: "
                            "fine-tuning freezes the body and trains the head, not the "
                            "other way round")]),
            layers=[output], first_step=ctx.records[0].step,
            evidence={"frozen_params": len(frozen), "output_layer": output},
            checks=["Check the freezing code (name patterns such as 'in name' match more than "
                    "intended) and set requires_grad=True on the output layer."],
        )
    return Finding(
        summary=(f"{len(frozen)} parameter(s) were frozen (requires_grad=False) before watching "
                 "started; they are not expected to change"),
        causes=ranked([("frozen-on-purpose", 1.0,
                        f"e.g. '{frozen[0].name}' had requires_grad=False from the start")]),
        layers=sorted({p.layer for p in frozen}), severity="info",
        first_step=ctx.records[0].step,
        evidence={"frozen_params": len(frozen)},
        checks=["Nothing to do if freezing these layers is intended (fine-tuning)."],
    )


RULES = [params_frozen]
