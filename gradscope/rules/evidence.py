"""Checks that several rules run to rank causes: each returns (cause id, score, evidence text).

A score of 0 means the check found nothing; scores are combined by `common.ranked`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..history import StepRecord
from .common import HEALTHY_UPDATE, fmt, median_finite, plain_median
from .context import RuleContext

Score = tuple[str, float, str]


def _window_key(name: str, records: Sequence[StepRecord]) -> str:
    """A memo key for a value of these records in this evaluation (steps are unique)."""
    return f"{name}:{','.join(str(r.step) for r in records)}"


def update_ratio_median(ctx: RuleContext, records: Sequence[StepRecord]) -> float:
    """Median update/weight ratio of every layer over the stepped records (once per
    evaluation for a window: several causes and rules ask for it)."""

    def compute() -> float:
        values = [r.layer_update_ratio(ctx.layout) for r in records if r.stepped]
        if not values:
            return float("nan")
        return float(median_finite(np.vstack(values)))

    return ctx.memo(_window_key("update_median", records), compute)


def grad_total_median(records: Sequence[StepRecord]) -> float:
    totals = [r.total_grad_norm() for r in records]
    return plain_median([t for t in totals if t == t])  # NaN: not measured


def fastest_update_ratio(ctx: RuleContext, records: Sequence[StepRecord]) -> float:
    """Update/weight ratio of the layer that moves most (median over the records).

    If even that layer barely moves, the step size is the problem; if only some layers
    barely move, their gradients are (vanishing, blocked), not the learning rate.
    """

    def compute() -> float:
        values = [r.layer_update_ratio(ctx.layout) for r in records if r.stepped]
        if not values:
            return float("nan")
        per_layer = np.asarray(median_finite(np.vstack(values), axis=0))
        finite = per_layer[np.isfinite(per_layer)]
        return float(finite.max()) if finite.size else float("nan")

    return ctx.memo(_window_key("fastest_update", records), compute)


def _some_layer_moves(ctx: RuleContext, records: Sequence[StepRecord], low: float) -> bool:
    """Whether some layer's update ratio is finite and at least `low` in every stepped record
    (then its median, and fastest_update_ratio, is at least `low`); per-record layer sets
    are kept with the records as bit masks."""
    common = -1
    stepped = False
    for r in records:
        if r.stepped:
            stepped = True
            common &= _moving_layers(ctx, r, low)
            if not common:
                return False
    return stepped


def _moving_layers(ctx: RuleContext, record: StepRecord, low: float) -> int:
    """Bit mask of the layers whose update ratio at `record` is finite and at least `low`."""

    def compute() -> int:
        ratios = record.layer_update_ratio(ctx.layout)
        with np.errstate(invalid="ignore"):
            moving = np.isfinite(ratios) & (ratios >= low)
        return int.from_bytes(np.packbits(moving, bitorder="little").tobytes(), "little")

    return record.derived(f"moving:{low}", compute)


def lr_too_low(ctx: RuleContext, records: Sequence[StepRecord], low: float,
               tiny_grad: float) -> Score:
    if _some_layer_moves(ctx, records, low):
        return ("lr-too-low", 0.0, "")  # the fastest layer's median is at least `low`
    ratio = fastest_update_ratio(ctx, records)
    grads = grad_total_median(records)
    if not np.isfinite(ratio) or ratio >= low or not grads >= tiny_grad:
        return ("lr-too-low", 0.0, "")
    lrs = records[-1].lrs
    lr_text = f" at learning rate {fmt(lrs[0])}" if lrs else ""
    score = min(1.0, np.log10(HEALTHY_UPDATE / max(ratio, 1e-30)) / 4)
    return ("lr-too-low", float(score) + 0.2,
            f"even the fastest-moving layer changes by only {fmt(ratio)} of its weight norm "
            f"per step{lr_text}, while gradients are present (total norm {fmt(grads)}); a "
            f"learning layer moves about {fmt(HEALTHY_UPDATE)}")


def _may_exceed(ctx: RuleContext, records: Sequence[StepRecord], high: float) -> bool:
    """Whether update_ratio_median(records) can be above `high` (False only when it certainly
    is not): a median over n finite values is above `high` only when at least (n + 1) // 2
    of them are, counted per record (and kept with it)."""
    if high != high:  # NaN: no early answer
        return True
    finite = above = 0
    for r in records:
        if r.stepped:
            counts = _update_counts(ctx, r, high)
            finite += counts[0]
            above += counts[1]
    return finite > 0 and above >= (finite + 1) // 2


def _update_counts(ctx: RuleContext, record: StepRecord, high: float) -> tuple[int, int]:
    """(finite layer update ratios, those above `high`) of a record."""

    def compute() -> tuple[int, int]:
        ratios = record.layer_update_ratio(ctx.layout)
        finite = np.isfinite(ratios)
        return int(finite.sum()), int(np.count_nonzero(finite & (ratios > high)))

    return record.derived(f"update_counts:{high}", compute)


def lr_too_high(ctx: RuleContext, records: Sequence[StepRecord], high: float) -> Score:
    if not _may_exceed(ctx, records, high):
        return ("lr-too-high", 0.0, "")
    ratio = update_ratio_median(ctx, records)
    if not np.isfinite(ratio) or ratio <= high:
        return ("lr-too-high", 0.0, "")
    lrs = records[-1].lrs
    lr_text = f" at learning rate {fmt(lrs[0])}" if lrs else ""
    score = min(1.0, np.log10(ratio / HEALTHY_UPDATE) / 2)
    return ("lr-too-high", float(score),
            f"median update/weight ratio {fmt(ratio)}{lr_text}, far above the healthy "
            f"~{fmt(HEALTHY_UPDATE)}: each step rewrites a large part of the weights")


def near_zero_gradients(ctx: RuleContext, records: Sequence[StepRecord], tiny: float) -> Score:
    grads = grad_total_median(records)
    if not np.isfinite(grads) or grads >= tiny:
        return ("broken-gradient-flow", 0.0, "")
    return ("broken-gradient-flow", 1.0,
            f"total gradient norm {fmt(grads)} in every recorded step: almost no signal reaches "
            "any layer")


def _worst_module(records: Sequence[StepRecord], field: str, limit: float, cause: str,
                  text: str) -> Score:
    """Score `cause` by the module with the largest `field` over `limit` in the last record.

    A blocked layer explains weak gradients better than a generic cause, so the score is
    1 + the blocked fraction.
    """
    over = records[-1].modules_over(field, limit)
    where, worst = max(over.items(), key=lambda kv: kv[1], default=("", 0.0))
    if worst <= limit:
        return (cause, 0.0, "")
    return (cause, 1.0 + worst, text.format(percent=fmt(100 * worst), module=where))


def saturation(ctx: RuleContext, records: Sequence[StepRecord], limit: float) -> Score:
    return _worst_module(records, "saturated_frac", limit, "saturated-activations",
                         "{percent}% of the outputs of '{module}' sit at the flat ends of its "
                         "activation, where its derivative is nearly zero")


def dead_units(ctx: RuleContext, records: Sequence[StepRecord], limit: float) -> Score:
    return _worst_module(records, "dead_frac", limit, "dead-units",
                         "{percent}% of the units of '{module}' never activated on a whole "
                         "batch, so no gradient flows through them")


def data_scale(records: Sequence[StepRecord], limit: float) -> Score:
    data = records[-1].data
    if data is None or not data.is_float:
        return ("data-scale", 0.0, "")
    peak = max(abs(data.min), abs(data.max))
    if not np.isfinite(peak) or peak <= limit:
        return ("data-scale", 0.0, "")
    return ("data-scale", min(1.0, float(np.log10(peak / limit)) + 0.3),
            f"input values reach {fmt(peak)} (std {fmt(data.std)}); unnormalised inputs push "
            "pre-activations far from zero")


def data_nonfinite(records: Sequence[StepRecord]) -> Score:
    bad = [(r.step, r.data) for r in records if r.data is not None and r.data.nonfinite > 0]
    if not bad:
        return ("data-nonfinite", 0.0, "")
    step, data = bad[0]
    return ("data-nonfinite", 3.0,
            f"the input batch already held {data.nonfinite} NaN/Inf values at step {step}")


def frozen_by_optimizer(ctx: RuleContext, records: Sequence[StepRecord]) -> Score:
    last = records[-1]
    missing = np.flatnonzero(last.not_in_optimizer & ~np.isnan(last.grad_norm))
    if missing.size == 0:
        return ("missing-from-optimizer", 0.0, "")
    names = ctx.param_names(missing)
    return ("missing-from-optimizer", 1.0,
            f"{len(names)} parameter(s) receive gradients but are in no optimizer param group "
            f"(e.g. '{names[0]}')")


def detached(ctx: RuleContext, records: Sequence[StepRecord]) -> Score:
    last = records[-1]
    return last.derived("detached_score", lambda: _detached(last))


def _detached(last: StepRecord) -> Score:
    trainable = last.requires_grad
    nothing = bool(trainable.any()) and bool(last.grad_none[trainable].all())
    if last.loss_requires_grad is False and nothing:
        return ("detached-graph", 2.0,
                "the loss passed to step() does not require grad: it was computed from "
                "detached tensors or under torch.no_grad()")
    if trainable.any() and last.grad_none[trainable].mean() > 0.5:
        return ("detached-graph", 1.0,
                f"{int(last.grad_none.sum())} of {int(trainable.sum())} trainable parameters "
                "got no gradient")
    return ("detached-graph", 0.0, "")


def vanishing(ctx: RuleContext, records: Sequence[StepRecord], ratio: float) -> Score:
    """First layer's gradient norm far below the last layer's (the AUTOTRAINER ratio)."""
    grads = records[-1].layer_grad_norm(ctx.layout)
    cols = np.flatnonzero(~np.isnan(grads))
    if cols.size < 2 or not grads[cols[-1]] > 0:
        return ("vanishing-gradients", 0.0, "")
    first, last = float(grads[cols[0]]), float(grads[cols[-1]])
    if first / last >= ratio:
        return ("vanishing-gradients", 0.0, "")
    return ("vanishing-gradients", 1.2,
            f"layer '{ctx.layout.layers[cols[0]]}' gets a gradient norm of {fmt(first)} vs "
            f"{fmt(last)} at '{ctx.layout.layers[cols[-1]]}' (ratio {fmt(first / last)}): the "
            "early layers barely learn")


def zero_weights(ctx: RuleContext) -> Score:
    """Weight matrices exactly zero at the first recorded step and still zero: every unit of
    such a layer computes the same output and gets the same gradient (and behind tanh or ReLU
    a zero one), so they cannot learn apart: a fact of the initialisation."""
    first = ctx.first[0] if ctx.first else None
    last = ctx.records[-1] if ctx.records else None
    if first is None or last is None:
        return ("poor-init", 0.0, "")
    # layers' weight matrices only (tokens, position tables and embeddings may start at zero
    # by design), and only those still zero now: a matrix zeroed on purpose (LoRA's B) moves
    layout = ctx.layout
    matrices = layout.static("weight_matrices", lambda: np.array([
        i for i, p in enumerate(layout.params)
        if len(p.shape) >= 2 and p.name.rpartition(".")[2] == "weight"
        and layout.module_types.get(p.layer) not in ("Embedding", "EmbeddingBag")],
        dtype=np.int64))
    zeros = matrices[(first.param_norm[matrices] == 0.0) & (last.param_norm[matrices] == 0.0)]
    zero = [layout.params[i].name for i in zeros.tolist()]
    if not zero:
        return ("poor-init", 0.0, "")
    return ("poor-init", 3.0,
            f"{len(zero)} weight matri{'x was' if len(zero) == 1 else 'ces were'} exactly zero "
            f"at the first step (e.g. '{zero[0]}'): every unit of the layer computes the same "
            "thing and gets the same gradient, so the units cannot learn apart")


def leftover_gradients(records: Sequence[StepRecord]) -> tuple[int, int] | None:
    """(records whose gradients were still there when backward began, records checked), when
    most of at least two checked records showed them; else None.

    Example:
        >>> leftover_gradients([])
    """
    flags = [_leftover(r) for r in records]
    checked = [stale for stale in flags if stale is not None]
    stale = [s for s in checked if s]
    if len(stale) < 2 or len(stale) < len(checked) // 2 + 1:
        return None
    return len(stale), len(checked)


def _leftover(record: StepRecord) -> bool | None:
    """Whether gradients were left over when backward began at `record` (None when it was not
    checked); kept with the record."""
    return record.derived("leftover", lambda: (
        bool(float(np.nansum(record.stale_grad)) > 0)
        if np.any(~np.isnan(record.stale_grad)) else None))
