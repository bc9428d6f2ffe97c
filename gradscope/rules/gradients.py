"""Rules on gradients: None, vanishing, exploding, accumulating, and layers that stall."""

from __future__ import annotations

import math

import numpy as np

from .. import records as record_views
from . import evidence as ev
from .base import Finding, Threshold, rule
from .common import (
    WARMUP,
    WINDOW,
    fast_median,
    fmt,
    in_lr_warmup,
    persistent,
    plain_median,
    ranked,
)
from .context import RuleContext
from .onset import blowup_causes, collect
from .thresholds import HIGH_UPDATE, SATURATED

NONE_WINDOW = Threshold(3, "recorded steps a parameter must lack a gradient before it is "
                           "reported (a branch skipped once by control flow is not a bug)")


@rule(sign="grad-none", severity="warning", title="Gradients are None for trainable parameters",
      needs=("grad_none", "requires_grad", "loss_requires_grad", "activations"),
      thresholds={"window": NONE_WINDOW},
      causes=("detached-graph", "requires-grad-off"))
def grad_none(ctx: RuleContext) -> Finding | None:
    """Parameters that should train get no gradient at all."""
    records = [r for r in ctx.records if not (r.skipped and r.overflow)]
    window = int(ctx.t["window"])
    if len(records) < window:
        return None
    tail = records[-window:]
    watched_trainable = ctx.layout.static("watched_trainable", lambda: np.array(
        [p.requires_grad for p in ctx.layout.params], dtype=bool))
    if not _may_lack_grads(tail[-1], watched_trainable):
        return None  # each of the signs below must hold on the last record too
    none = np.logical_and.reduce([r.grad_none for r in tail])
    turned_off = np.logical_and.reduce([watched_trainable & ~r.requires_grad for r in tail])
    # A detached loss passed to step() is only a problem when nothing got a gradient (a loop
    # that accumulates micro-batch losses may pass their detached sum on purpose).
    loss_detached = all(r.loss_requires_grad is False and _no_grads(r) for r in tail)
    if not none.any() and not turned_off.any() and not loss_detached:
        return None
    last = tail[-1]
    scores = []
    layers: list[str] = []
    if loss_detached:
        scores.append(ev.detached(ctx, tail))
    if none.any():
        idx = np.flatnonzero(none)
        names = ctx.param_names(idx)
        layers += _layers_of(ctx, idx)
        ran = [layer for layer in _layers_of(ctx, idx)
               if (layer in last.activations and last.activations[layer].calls > 0)]
        where = (f"their modules ran in the forward pass ({', '.join(ran[:3])}), so the path "
                 "from them to the loss is cut (.detach(), .item()/.numpy(), torch.no_grad, "
                 "a non-differentiable op)") if ran else (
                 "their modules never ran in a training forward: unused layers, or a path "
                 "that leaves the autograd graph")
        scores.append(("detached-graph", 1.0 + len(idx) / max(1, len(none)),
                       f"{len(idx)} parameter(s) with requires_grad=True got no gradient in "
                       f"{window} recorded steps (e.g. '{names[0]}'); {where}"))
    if turned_off.any():
        idx = np.flatnonzero(turned_off)
        names = ctx.param_names(idx)
        layers += _layers_of(ctx, idx)
        scores.append(("requires-grad-off", 2.0,
                       f"{len(idx)} parameter(s) that required grad when watching started now "
                       f"have requires_grad=False (e.g. '{names[0]}')"))
    all_none = (bool(last.requires_grad.any()) and bool(
        last.grad_none[last.requires_grad].all())) or loss_detached
    order = {name: i for i, name in enumerate(ctx.layout.layers)}
    return Finding(
        summary=(f"{int(none.sum() + turned_off.sum())} parameter(s) that should train have no "
                 "gradient"),
        causes=ranked(scores), severity="error" if all_none else None,
        layers=sorted(set(layers), key=lambda name: order.get(name, 0)),
        first_step=tail[0].step,
        evidence={"params_without_grad": int(none.sum()),
                  "params_requires_grad_turned_off": int(turned_off.sum()),
                  "loss_requires_grad": last.loss_requires_grad},
        checks=[
            "Follow the tensor from the named layers to the loss: look for .detach(), .data, "
            ".item(), .numpy(), torch.no_grad() or ops on Python numbers in between.",
            "Check that requires_grad was not switched off (freezing code that runs too early "
            "or on the wrong layers).",
            "If the layer is meant to be unused, remove it or freeze it before watching.",
        ],
    )


def _may_lack_grads(record, watched_trainable: np.ndarray) -> bool:
    """Whether `record` shows a parameter without a gradient, one whose requires_grad was
    turned off, or a detached loss with no gradient anywhere (kept with the record)."""
    return record.derived("may_lack_grads", lambda: bool(
        record.grad_none.any() or (watched_trainable & ~record.requires_grad).any()
        or (record.loss_requires_grad is False and _no_grads(record))))


def _no_grads(record) -> bool:
    trainable = record.requires_grad
    return bool(trainable.any()) and bool(record.grad_none[trainable].all())


def _layers_of(ctx: RuleContext, param_indices) -> list[str]:
    return [ctx.layout.params[int(i)].layer for i in param_indices]


@rule(sign="grad-vanishing", severity="warning", title="Gradients vanish toward the early layers",
      needs=("grad_norm", "activations", "param_norm"),
      thresholds={"ratio": Threshold(1e-3, "first/last layer gradient-norm ratio below which "
                                           "early layers have vanished (AUTOTRAINER)"),
                  "first_norm": Threshold(1e-4, "first-layer gradient norm below which it "
                                                "learns practically nothing (AUTOTRAINER)"),
                  "window": WINDOW, "warmup": WARMUP, "saturated": SATURATED},
      causes=("saturated-activations", "dead-units", "poor-init", "lr-too-high"))
def grad_vanishing(ctx: RuleContext) -> Finding | None:
    """Early layers receive orders of magnitude less gradient than the last ones."""
    records = ctx.usable(ctx.t["warmup"])
    window = int(ctx.t["window"])
    if len(records) < window:
        return None
    recs = records[-window:]
    if not _may_vanish(ctx, recs[-1]):
        return None  # the condition must hold on every record of the window, the last too
    found = [_first_last_grad(ctx, r) for r in recs]
    ends = [e for e in found if e is not None]
    if len(ends) < len(found):
        return None
    first = np.array([e[0] for e in ends])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = first / np.array([e[1] for e in ends])
    if not (np.all(ratio < ctx.t["ratio"]) and np.all(first < ctx.t["first_norm"])):
        return None
    grads = recs[-1].layer_grad_norm(ctx.layout)
    cols = np.flatnonzero(~np.isnan(grads))
    latest = grads[cols]
    vanished = [int(c) for c, g in zip(cols, latest) if g < latest[-1] * ctx.t["ratio"]]
    # oversized steps saturate gates and kill units on the way: the cause, named first
    scores = [ev.zero_weights(ctx), ev.saturation(ctx, recs, ctx.t["saturated"]),
              ev.dead_units(ctx, recs, ctx.t["saturated"]), _small_init(ctx, recs),
              _squashing_depth(ctx), _oversized(ev.lr_too_high(ctx, recs, HIGH_UPDATE.default))]
    if not any(s > 0 for _, s, _ in scores):
        scores.append(("poor-init", 0.3, "no saturated or dead activations were seen: the "
                       "per-layer gain of the initialisation/architecture shrinks the signal"))
    causes = ranked(scores)
    first_name = ctx.layout.layers[cols[0]] or "(root)"
    last_name = ctx.layout.layers[cols[-1]] or "(root)"
    return Finding(
        summary=(f"layer '{first_name}' grad norm {fmt(latest[0])} vs '{last_name}' "
                 f"{fmt(latest[-1])}, ratio {fmt(latest[0] / latest[-1])}"),
        causes=causes, layers=ctx.layer_names(vanished or [cols[0]]),
        first_step=recs[0].step,
        evidence={"first_layer": first_name, "first_layer_grad_norm": float(latest[0]),
                  "last_layer": last_name, "last_layer_grad_norm": float(latest[-1]),
                  "ratio": float(latest[0] / latest[-1])},
        checks=["Add skip (residual) connections so early layers get a direct gradient path.",
                "Compare per-layer gradient norms after each change: the first/last ratio "
                "should move toward 1."],
    )


def _first_last_grad(ctx: RuleContext, record) -> tuple[float, float] | None:
    """Gradient norm of the first and of the last layer that has one (cached per record)."""

    def compute():
        measured = [g for g in record.layer_grad_norm(ctx.layout).tolist() if g == g]
        return (measured[0], measured[-1]) if len(measured) >= 2 else None

    return record.derived("first_last_grad", compute)


def _may_vanish(ctx: RuleContext, record) -> bool:
    """Whether the first/last gradient-norm test of grad-vanishing can hold on `record`
    (False only when it certainly does not)."""
    ends = _first_last_grad(ctx, record)
    if ends is None:
        return False
    first, last = ends
    if not first < ctx.t["first_norm"]:
        return False
    return last == 0 or first / last < ctx.t["ratio"]


SQUASHING = ("Sigmoid", "Tanh", "Hardsigmoid", "Hardtanh", "Softsign", "LogSigmoid")


def _squashing_depth(ctx: RuleContext) -> tuple[str, float, str]:
    """Stacked sigmoid/tanh layers: each scales the backward signal by its slope (<= 1/4 for
    sigmoid), so a deep stack shrinks early gradients geometrically."""
    kinds = [t for t in ctx.layout.module_types.values() if t in SQUASHING]
    if len(kinds) < 3:
        return ("saturated-activations", 0.0, "")
    return ("saturated-activations", min(1.5, 0.5 + 0.1 * len(kinds)),
            f"{len(kinds)} stacked {kinds[0]}-like activations: their slope is at most "
            f"{'0.25' if 'Sigmoid' in kinds[0] else '1'} and smaller away from 0, so each one "
            "shrinks the gradient passed to the layers before it")


#: Weight RMS below this fraction of 1/sqrt(fan_in) counts as a too-small initialisation.
#: Deliberately small inits (GPT-2 scales residual projections by 1/sqrt(2 * n_layer)) stay
#: well above it.
SMALL_INIT = 0.05


def _small_init(ctx: RuleContext, records) -> tuple[str, float, str]:
    weights = records[-1].layer_param_norm(ctx.layout)
    sizes = np.zeros(len(ctx.layout.layers))
    for p, layer in zip(ctx.layout.params, ctx.layout.param_layer):
        sizes[layer] += p.numel
    with np.errstate(divide="ignore", invalid="ignore"):
        rms = weights / np.sqrt(np.maximum(sizes, 1))
    fan = np.array([max(1, _fan_in(ctx, i)) for i in range(len(ctx.layout.layers))])
    expected = 1.0 / np.sqrt(fan)
    small = np.flatnonzero(rms < SMALL_INIT * expected)
    if small.size == 0:
        return ("poor-init", 0.0, "")
    return ("poor-init", 0.8 * small.size / len(rms),
            f"{small.size} layer(s) have weights over {fmt(1 / SMALL_INIT)} times smaller than "
            f"a 1/sqrt(fan_in) initialisation (e.g. '{ctx.layout.layers[small[0]]}')")


def _fan_in(ctx: RuleContext, layer: int) -> int:
    for p, owner in zip(ctx.layout.params, ctx.layout.param_layer):
        if owner == layer and len(p.shape) >= 2:
            return int(np.prod(p.shape[1:]))
    return 1


@rule(sign="grad-exploding", severity="warning", title="Gradient norms explode",
      needs=("grad_norm", "update_ratio", "stale_grad"),
      thresholds={"growth": Threshold(100, "growth of the total gradient norm over its early "
                                           "median that counts as exploding (two orders)"),
                  "spike": Threshold(10, "a recorded step whose total gradient norm is ten "
                                         "times the window median is a spike"),
                  "spikes": Threshold(2, "spikes within the window before it is reported"),
                  "window": WINDOW, "warmup": WARMUP, "high_update": HIGH_UPDATE},
      causes=("lr-too-high", "exploding-gradients", "poor-init", "missing-zero-grad",
              "outlier-batches"))
def grad_exploding(ctx: RuleContext) -> Finding | None:
    """Total gradient norm grows by orders of magnitude or spikes repeatedly."""
    records = [r for r in ctx.healthy_records if not (r.skipped and r.overflow)]
    listed = [r.total_grad_norm() for r in records]
    if len(listed) < ctx.t["window"]:
        return None
    first = ctx.history.kept(("early_grad_totals", len(ctx.first)), lambda: [
        t for t in (_total(r) for r in ctx.first if not r.overflow)
        if math.isfinite(t) and t > 0][:3])
    if not first:
        return None
    early = plain_median(first)  # fast_median's value (finite values)
    if not _may_explode(listed, early, ctx.t):
        return None
    totals = np.array(listed)
    tail = totals[-int(ctx.t["window"]):]
    measured = np.isfinite(tail)
    # growth only: every measured norm of the window that far above the start (a window
    # without a finite norm, or one that shrank, is no explosion)
    grew = bool(measured.any() and np.all(tail[measured] >= ctx.t["growth"] * early))
    spikes = 0
    if not grew:
        finite = totals[np.isfinite(totals)]
        med = fast_median(finite)
        if not med > 0 or not np.any(tail >= ctx.t["spike"] * med):
            return None
        spiking = tail >= ctx.t["spike"] * med
        # A gradient spike that the loss does not feel is a rare informative batch, not an
        # explosion: count only spikes where the loss jumped too (>= 2x the window median).
        tail_loss = np.array([r.loss for r in records[-tail.size:]])
        finite_loss = tail_loss[np.isfinite(tail_loss)]
        loss_med = fast_median(finite_loss)
        with np.errstate(invalid="ignore"):
            spikes = int(np.sum(spiking & ((tail_loss >= 2 * loss_med)
                                           | ~np.isfinite(tail_loss))))
        late = [r for r in records if r.step >= ctx.t["warmup"]]
        if spikes < ctx.t["spikes"] or len(late) < ctx.t["window"]:
            return None
    recs = records[-int(ctx.t["window"]):]
    scores = [ev.lr_too_high(ctx, recs, ctx.t["high_update"])]
    if grew:  # judged from where the growth began, not from the oversized steps it caused
        scores = blowup_causes(collect(ctx.history), ctx.layout, recs[-1].step + 1) or scores
    stale = [r for r in recs if _stale_total(r) > 0]
    if stale:
        scores.append(("missing-zero-grad", 2.0,
                       f"gradients were not cleared before {len(stale)} of the last "
                       f"{len(recs)} recorded steps, so they add up step after step"))
    if early > 1e3:
        scores.append(("poor-init", 0.6, f"gradient norm was already {fmt(early)} at the "
                                         "first steps: weights start too large"))
    layer = recs[-1].layer_grad_norm(ctx.layout)
    worst = int(np.nanargmax(np.where(np.isfinite(layer), layer, -1))) if layer.size else 0
    peak = float(np.nanmax(np.where(np.isfinite(tail), tail, np.nan))) if np.isfinite(
        tail).any() else float("inf")
    return Finding(
        summary=(f"total gradient norm {fmt(peak)} vs {fmt(early)} at the start "
                 f"({fmt(peak / early)}x)" + (f", {spikes} spikes" if spikes else "")),
        causes=ranked(scores) or ranked([("lr-too-high", 0.3, "no other cause found; large "
                                          "steps are the usual reason")]),
        layers=ctx.layer_names([worst]), first_step=recs[0].step,
        evidence={"grad_norm_start": early, "grad_norm_peak": peak,
                  "growth": peak / early, "spikes": spikes},
        checks=[
            "Clip gradients (torch.nn.utils.clip_grad_norm_) and lower the learning rate.",
            "Check that optimizer.zero_grad() runs every step.",
            "Add normalisation layers or rescale the initialisation of the largest layers.",
        ],
    )


def _may_explode(totals: list[float], early: float, t: dict) -> bool:
    """Whether the window of total gradient norms grew `growth` times over `early` or holds a
    spike over the median of the finite ones: the preconditions of grad-exploding, in plain
    floats (the window is a few values)."""
    tail = totals[-int(t["window"]):]
    measured = [v for v in tail if math.isfinite(v)]
    if measured and all(v >= t["growth"] * early for v in measured):
        return True
    med = plain_median([v for v in totals if math.isfinite(v)])
    return med > 0 and any(v >= t["spike"] * med for v in tail)


def _total(record) -> float:
    return record.total_grad_norm()


@rule(sign="grad-accumulating", severity="warning",
      title="Gradients accumulate across optimizer steps",
      needs=("stale_grad",),
      thresholds={"window": Threshold(2, "recorded steps with uncleared gradients before it is "
                                         "reported: twice rules out a one-off manual step")},
      causes=("missing-zero-grad",))
def grad_accumulating(ctx: RuleContext) -> Finding | None:
    """Gradients from the previous optimizer step were still there when backward ran again."""
    latest = next((total for total in map(_stale_total, reversed(ctx.records))
                   if not math.isnan(total)), math.nan)
    if not latest > 0:
        return None  # the last checked record had no leftover gradients (or none was checked)
    checked = [r for r in ctx.records if not math.isnan(_stale_total(r))]
    tail = persistent(checked, ctx.t["window"], lambda r: _stale_total(r) > 0)
    if tail is None:
        return None
    last = tail[-1]
    idx = np.flatnonzero(np.nan_to_num(last.stale_grad) > 0)
    stale = float(np.sqrt(np.nansum(last.stale_grad ** 2)))
    grad = _total(last)
    return Finding(
        summary=(f"{idx.size} parameter(s) still held the previous step's gradient (norm "
                 f"{fmt(stale)}) when backward started; the gradient used was {fmt(grad)}"),
        causes=ranked([("missing-zero-grad", 1.0,
                        f"at the first backward after an optimizer step the old gradients had "
                        f"norm {fmt(stale)} instead of 0 in {len(tail)} recorded steps in a row")]),
        layers=ctx.layer_names({ctx.layout.param_layer[i] for i in idx}),
        first_step=tail[0].step,
        evidence={"stale_grad_norm": stale, "grad_norm": grad, "params": int(idx.size)},
        checks=[
            "Call optimizer.zero_grad() (or model.zero_grad()) once per optimizer step, before "
            "the first backward of the step.",
            "If you accumulate on purpose over micro-batches, clear after each optimizer.step().",
        ],
    )


def _stale_total(record) -> float:
    """Sum of leftover gradient norms at backward start (NaN when it was not checked)."""

    def compute() -> float:
        checked = ~np.isnan(record.stale_grad)
        return float(record.stale_grad[checked].sum()) if checked.any() else float("nan")

    return record.derived("stale_total", compute)


@rule(sign="layers-stalled", severity="warning", title="Some layers learn and others do not",
      needs=("update_ratio", "grad_norm", "activations", "param_norm"),
      thresholds={"stall": Threshold(1e-3, "a layer whose update ratio is below this fraction "
                                           "of the median layer's has stalled (1000x slower)"),
                  "window": WINDOW, "warmup": WARMUP, "saturated": SATURATED},
      causes=("vanishing-gradients", "saturated-activations", "dead-units", "poor-init",
              "missing-from-optimizer"))
def layers_stalled(ctx: RuleContext) -> Finding | None:
    """A part of the model barely moves while the rest trains normally."""
    records = [r for r in ctx.usable(ctx.t["warmup"]) if r.stepped]
    if len(records) < ctx.t["window"] or in_lr_warmup(records[-int(ctx.t["window"]):]):
        return None
    recs = records[-int(ctx.t["window"]):]
    if not _may_stall(recs[-1], ctx.t["stall"]):
        return None
    last_view = _stall_view(ctx, recs[-1], ctx.t["stall"])
    if last_view is None or not last_view[2].any() or not last_view[1] > 1e-5:
        return None  # a layer must be stalled, and the median healthy, in every record
    views = [_stall_view(ctx, r, ctx.t["stall"]) for r in recs]
    if any(v is None for v in views):
        return None
    trainable = views[-1][0]
    if any(not np.array_equal(v[0], trainable) for v in views):
        return None  # the set of training layers changed inside the window
    stalled = np.logical_and.reduce([v[2] for v in views])
    healthy = all(v[1] > 1e-5 for v in views)
    if not stalled.any() or stalled.all() or not healthy:
        return None
    ratios = np.vstack([r.layer_update_ratio(ctx.layout)[trainable] for r in recs])
    median = np.array([[v[1]] for v in views])
    layers = np.asarray(trainable)[stalled]
    grads = recs[-1].layer_grad_norm(ctx.layout)
    ref = float(np.nanmedian(grads[trainable]))
    scores = []
    small = [i for i in layers if grads[i] < ctx.t["stall"] * ref]
    if small:
        scores.append(("vanishing-gradients", 1.0,
                       f"layer '{ctx.layout.layers[small[0]]}' grad norm {fmt(grads[small[0]])} "
                       f"vs median layer {fmt(ref)}"))
    scores += [ev.saturation(ctx, recs, ctx.t["saturated"]),
               ev.dead_units(ctx, recs, ctx.t["saturated"]),
               ev.frozen_by_optimizer(ctx, recs), _small_init(ctx, recs)]
    names = ctx.layer_names(layers)
    worst = float(np.nanmin(ratios[-1, stalled])) if stalled.any() else float("nan")
    return Finding(
        summary=(f"{len(names)} layer(s) update {fmt(worst)} of their weights per step vs "
                 f"{fmt(float(median[-1, 0]))} for the median layer"),
        causes=ranked(scores) or ranked([("vanishing-gradients", 0.3,
                                          "no specific blockage found")]),
        layers=names, first_step=recs[0].step,
        evidence={"stalled_layers": len(names), "stalled_update_ratio": worst,
                  "median_update_ratio": float(median[-1, 0])},
        checks=[
            "Compare per-layer gradient norms: a gap of orders of magnitude means the signal "
            "is blocked between the loss and these layers.",
            "Check initialisation, skip connections and activation saturation around them.",
            "Check that these layers' parameters are in the optimizer with a non-zero lr.",
        ],
    )


def _may_stall(record, stall: float) -> bool:
    """Whether a layer of `record` can update less than `stall` times the median layer (False
    only when none can; kept with the record). A layer's ratio is a weighted RMS of its
    parameters' ratios, so it lies between their smallest and largest: when the smallest
    parameter ratio is above `stall` times the largest, with a margin far above rounding and
    values far from under- or overflow, no layer is that far below any other."""

    def compute() -> bool:
        ratio, weight = record.update_ratio, record.param_norm
        if ratio.size <= record_views.SMALL_ARRAY:
            return _may_stall_small(ratio.tolist(), weight.tolist(), stall)
        ok = np.isfinite(ratio) & np.isfinite(weight)
        if not ok.any():
            return True
        moved, sizes = np.abs(ratio[ok]), np.abs(weight[ok])
        sizes = sizes[sizes > 0]
        low, high = float(moved.min()), float(moved.max())
        if not (low >= 1e-50 and high <= 1e50 and (sizes.size == 0 or (
                float(sizes.min()) >= 1e-50 and float(sizes.max()) <= 1e50))):
            return True
        return not stall * high * (1 + 1e-6) <= low * (1 - 1e-6)

    return record.derived(f"may_stall:{stall}", compute)


def _may_stall_small(ratio: list[float], weight: list[float], stall: float) -> bool:
    """_may_stall's test on Python floats (the same comparisons; no arithmetic on the values
    but the final one, which is written the same)."""
    moved = [abs(r) for r, w in zip(ratio, weight) if math.isfinite(r) and math.isfinite(w)]
    if not moved:
        return True
    sizes = [abs(w) for r, w in zip(ratio, weight)
             if math.isfinite(r) and math.isfinite(w) and abs(w) > 0]
    low, high = min(moved), max(moved)
    if not (low >= 1e-50 and high <= 1e50 and (not sizes or (
            min(sizes) >= 1e-50 and max(sizes) <= 1e50))):
        return True
    return not stall * high * (1 + 1e-6) <= low * (1 - 1e-6)


def _stall_view(ctx: RuleContext, record, stall: float):
    """(trainable layer indices, their median update ratio, stalled mask), cached per record."""

    def compute():
        trainable = np.asarray(_trainable_layers(ctx, record), dtype=np.int64)
        ratios = record.layer_update_ratio(ctx.layout)[trainable]
        finite = ratios[np.isfinite(ratios)]
        if trainable.size < 2 or finite.size == 0:
            return None
        median = plain_median(finite.tolist())  # fast_median's value (finite values)
        with np.errstate(invalid="ignore"):
            return trainable, median, ratios < stall * median

    return record.derived(f"stall:{stall}", compute)


def _trainable_layers(ctx: RuleContext, record) -> list[int]:
    keep = record.requires_grad & ~np.isnan(record.grad_norm)
    if keep.all():  # every parameter trains and has a gradient: the layout's answer
        return ctx.layout.static("trainable_layers_all", lambda: _layers_training(ctx, keep))
    return _layers_training(ctx, keep)


def _layers_training(ctx: RuleContext, keep: np.ndarray) -> list[int]:
    """The layers, embeddings left out, that own a parameter where `keep` holds."""
    counts = np.bincount(ctx.layout.owners[keep], minlength=len(ctx.layout.layers))
    embeddings = _embeddings(ctx)
    return [i for i in np.flatnonzero(counts).tolist() if i not in embeddings]


def _embeddings(ctx: RuleContext) -> set[int]:
    """Embedding layers: only the rows of the batch's tokens move, so their whole-table update
    ratio is small by nature and says nothing about a stall."""
    return ctx.layout.static("embedding_layers", lambda: {
        i for i, name in enumerate(ctx.layout.layers)
        if ctx.layout.module_types.get(name) in ("Embedding", "EmbeddingBag")})


def _oversized(score: tuple[str, float, str]) -> tuple[str, float, str]:
    """lr-too-high evidence weighed above the signs it produces (saturation, dead units)."""
    cause, value, text = score
    return (cause, 2.0 * value, text + " (saturated or dead units downstream are its "
                                       "consequence)" if value > 0 else text)


RULES = [grad_none, layers_stalled, grad_vanishing, grad_exploding, grad_accumulating]

