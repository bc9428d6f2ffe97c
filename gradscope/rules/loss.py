"""Rules on the loss curve: flat from the start, non-finite, unstable across batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import evidence as ev
from .base import Finding, Threshold, rule
from .common import WARMUP, WINDOW, fast_median, fmt, in_lr_warmup, ranked
from .context import RuleContext
from .onset import find_onset, onset_finding
from .params import frozen_output_score
from .thresholds import DATA_SCALE, HIGH_UPDATE, SATURATED

MIN_STEPS = Threshold(30, "steps before a loss can be called flat: the start level (first "
                          "10 losses) and the recent level (last 20) must not overlap")
FLAT_CHANGE = Threshold(
    0.05, "relative drop from the start level that counts as real progress: a model that "
    "learns anything drops well over 5% in its first few dozen steps")
HORIZON = Threshold(
    2000, "steps within which a learning run makes that drop: a loss whose fastest plausible "
    "pace (its recent trend plus two standard errors) needs longer makes no practical "
    "progress, however steady its tiny drop")
FLAT_T = Threshold(
    -2.0, "t statistic of the recent loss trend (slope over its standard error) above which "
    "the loss is not going down: no significant downward trend (about the 95% level)")
START_STEPS = 10  # losses averaged for the starting level
TINY_BATCH = 2  # batch sizes at or below this make a flat-looking loss plausible by noise alone
RECENT_STEPS = 20  # losses averaged for the recent level
LOW_UPDATE = Threshold(
    1e-5, "update/weight ratio below which steps are too small to move the loss: two orders "
    "under the ~1e-3 of healthy training (CS231n)")
TINY_GRAD = Threshold(
    1e-7, "total gradient L2 norm below which no layer gets a usable signal (float32 weights "
    "cannot even register steps that small at ordinary learning rates)")
VANISHING_RATIO = 1e-3  # first/last layer gradient-norm ratio of vanishing (AUTOTRAINER)
UNSTABLE_SPAN = 200  # recent steps the instability rule looks at

def _rolling_mean(values: np.ndarray, width: int) -> np.ndarray:
    """Mean of each run of `width` consecutive values (len(values) - width + 1 of them)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[width:] - sums[:-width]) / width


def _rolling_typical(values: np.ndarray, width: int) -> np.ndarray:
    """Typical level of each run of `width` values: the geometric mean for positive losses
    (a single spike moves it far less than the arithmetic mean), else the median."""
    if np.all(values > 0):
        return np.exp(_rolling_mean(np.log(values), width))
    return np.median(sliding_window_view(values, width), axis=1)


@dataclass(frozen=True)
class Progress:
    """How far the loss has come since the start, and how fast it can plausibly go on.

    `drop` is (start level - recent level) / |start level|, `drop_hi` its optimistic bound
    (two standard errors up); `pace_hi` the fastest plausible relative drop per step from
    the trend of the recent losses (least-squares slope plus two standard errors) and
    `trend_t` that slope over its standard error (negative: going down).
    """

    start: float
    late: float
    drop: float
    drop_hi: float
    pace_hi: float
    trend_t: float
    count: int
    first_step: int

    def steps_to(self, change: float) -> float:
        """Steps the loss would need, at its fastest plausible pace, to drop by `change`."""
        return change / self.pace_hi if self.pace_hi > 0 else math.inf


def mean_of(values: np.ndarray) -> np.floating:
    """values.mean() of a 1-D array (float64 for integers), the same sum and division
    without the method's wrapper (this runs on every evaluation).

    >>> import numpy as np
    >>> a = np.random.default_rng(0).random(37)
    >>> mean_of(a) == a.mean(), mean_of(np.arange(9)) == np.arange(9).mean()
    (np.True_, np.True_)
    """
    dtype = np.float64 if values.dtype.kind in "biu" else None
    mean: np.floating = np.add.reduce(values, dtype=dtype) / values.size
    return mean


def variance_of(values: np.ndarray) -> np.floating:
    """values.var(ddof=1) of a 1-D float array, the same steps without the wrapper.

    >>> import numpy as np
    >>> a = np.random.default_rng(0).random(20)
    >>> variance_of(a) == a.var(ddof=1)
    np.True_
    """
    deviations = values - np.add.reduce(values, keepdims=True) / values.size
    variance: np.floating = np.add.reduce(np.square(deviations)) / (values.size - 1)
    return variance


def _trend(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of `values` over `steps` and its standard error."""
    x = steps.astype(np.float64) - mean_of(steps)
    sxx = float(np.dot(x, x))
    if values.size < 3 or sxx <= 0:
        return 0.0, math.inf
    mean = mean_of(values)
    slope = float(np.dot(x, values - mean) / sxx)
    resid = values - mean - slope * x
    return slope, float(np.sqrt(np.dot(resid, resid) / (values.size - 2) / sxx))


def _start_level(history, count: int) -> tuple[float, np.floating, int]:
    """(mean, variance (ddof 1), size) of the first `count` losses the history keeps for good
    (worked out once: they never change)."""

    def compute() -> tuple[float, np.floating, int]:
        first = np.asarray(history.first_losses, dtype=np.float64)[:count]
        return float(first.mean()), first.var(ddof=1), first.size

    return history.kept(("start_level", len(history.first_losses), count), compute)


def _progress(ctx: RuleContext) -> Progress | None:
    """The loss's progress, judged the same live and on a replayed log: from the first losses
    the history keeps for good and the recent loss window, never from when the rules ran."""
    history = ctx.history
    held = len(history.first_losses)
    steps, tail = ctx.losses
    n = len(history.loss_values)
    if held < START_STEPS or n < START_STEPS + RECENT_STEPS:
        return None
    # the start level never reaches into the recent level's steps
    start, start_var, start_size = _start_level(
        history, max(START_STEPS, min(held, n - RECENT_STEPS)))
    recent = tail[-RECENT_STEPS:]
    late = float(mean_of(recent))
    if not (np.isfinite(start) and np.isfinite(late)) or abs(start) < 1e-12:
        return None
    se = float(np.sqrt(start_var / start_size + variance_of(recent) / recent.size))
    slope, slope_se = _trend(steps, tail)
    return Progress(start=start, late=late, drop=(start - late) / abs(start),
                    drop_hi=(start - late + 2 * se) / abs(start),
                    pace_hi=max(0.0, -slope + 2 * slope_se) / abs(start),
                    trend_t=slope / slope_se if slope_se > 0 else math.copysign(math.inf, slope),
                    count=n,
                    first_step=int(history.loss_steps[0]))


def _flat_causes(ctx: RuleContext, records: list) -> list:
    """The causes of a loss that does not go down, ranked by what the records show."""
    t = ctx.t
    return ranked([
        ev.zero_weights(ctx),
        ev.lr_too_low(ctx, records, t["low_update"], t["tiny_grad"]),
        ev.lr_too_high(ctx, records, HIGH_UPDATE.default),  # bouncing, clipped: no descent
        ev.near_zero_gradients(ctx, records, t["tiny_grad"]),
        ev.vanishing(ctx, records, VANISHING_RATIO),
        ev.saturation(ctx, records, t["saturated"]),
        ev.dead_units(ctx, records, t["saturated"]),
        ev.frozen_by_optimizer(ctx, records),
        frozen_output_score(ctx),
        ev.detached(ctx, records),
        _penalty_only(records),
        _stale_gradients(records),
        _tiny_batch(records),
        _outliers(records, set()),  # a few batches far off the others keep undoing progress
    ])


def several_optimizers(ctx: RuleContext) -> bool:
    """Whether several optimizers were given to watch() (e.g. a GAN's D and G): their losses
    may oppose each other, so the loss alone says little; the signals must back a finding."""
    return int(ctx.layout.static("optimizers", lambda: 1)) > 1


@rule(sign="loss-flat", severity="warning", title="Loss is flat from the start",
      needs=("loss", "grad_norm", "update_ratio", "activations"),
      thresholds={"min_steps": MIN_STEPS, "change": FLAT_CHANGE, "horizon": HORIZON,
                  "t": FLAT_T, "warmup": WARMUP,
                  "low_update": LOW_UPDATE, "tiny_grad": TINY_GRAD, "saturated": SATURATED},
      causes=("lr-too-low", "broken-gradient-flow", "vanishing-gradients",
              "saturated-activations", "dead-units", "missing-from-optimizer", "detached-graph",
              "missing-zero-grad", "small-batch", "probabilities-as-logits", "outlier-batches",
              "poor-init", "lr-too-high", "requires-grad-off"))
def loss_flat(ctx: RuleContext) -> Finding | None:
    """The loss has not moved since the start, cannot, or stalled high under huge steps.

    Cannot: probabilities go into a loss that applies its own softmax (a floor it cannot
    pass).
    Stalled high: it came down at first, then stopped improving far above its start's half
    while steps stayed far larger than healthy ones (a learning rate too high, hidden by
    gradient clipping)."""
    _, tail = ctx.losses
    if not np.isfinite(tail).all():
        return None
    floor = _probabilities_as_logits(ctx)
    if floor is not None:
        return floor
    progress = _progress(ctx)
    if progress is None or progress.count < ctx.t["min_steps"]:
        return None
    change = ctx.t["change"]
    drop = progress.drop
    if -drop > 0.5:
        return None  # diverging: other rules cover that
    # Flat: it has not dropped by `change` since the start, and it is not going down now, or
    # so slowly that even its most optimistic pace needs more than `horizon` steps for it.
    slow = progress.steps_to(change) > ctx.t["horizon"]
    stalled = progress.trend_t > ctx.t["t"] or slow
    if drop >= change and stalled:
        return _stalled_high(ctx, progress)
    if not (drop < change and stalled):
        return None
    records = ctx.usable(ctx.t["warmup"]) or ctx.records
    if not records or in_lr_warmup(ctx.records[-int(WINDOW.default):]):
        return None  # no records yet, or the learning rate is still ramping up
    causes = _flat_causes(ctx, records)
    if several_optimizers(ctx) and not causes:
        return None  # opposing objectives (a GAN): their summed loss need not go down
    ratio = ev.update_ratio_median(ctx, records)
    return Finding(
        summary=(f"loss averaged {fmt(progress.start)} over the first steps and "
                 f"{fmt(progress.late)} over the last {RECENT_STEPS} (of {progress.count}): "
                 f"{_change_text(drop)}; "
                 + (f"at its fastest plausible recent pace a {fmt(100 * change)}% drop would "
                    f"take {fmt(progress.steps_to(change))} steps" if slow else
                    f"its recent trend is not downward (t = {fmt(progress.trend_t)})")),
        causes=causes,
        evidence={"loss_early": progress.start, "loss_recent": progress.late,
                  "relative_change": drop, "relative_change_bound": progress.drop_hi,
                  "steps_to_meaningful_drop": min(progress.steps_to(change), 1e12),
                  "steps": progress.count, "update_ratio_median": ratio,
                  "grad_norm_median": ev.grad_total_median(records)},
        checks=[
            "Print the update/weight ratio per layer: ~1e-3 is healthy; far below means the "
            "learning rate (or its schedule) is too small.",
            "Check that gradient norms are not ~0 in every layer (a broken graph, saturated or "
            "dead activations).",
            "Overfit a single small batch: if the loss cannot go down there, the model, loss or "
            "optimizer wiring is broken.",
        ],
        first_step=progress.first_step,
    )


@rule(sign="loss-nonfinite", severity="error", title="Loss became NaN or Inf",
      needs=("loss", "grad_norm", "activations", "data"),
      thresholds={"growth": Threshold(100, "growth of the total gradient norm over its early "
                                           "median that counts as exploding (two orders)"),
                  "high_update": HIGH_UPDATE, "data_scale": DATA_SCALE},
      causes=("invalid-math", "data-nonfinite", "exploding-gradients", "lr-too-high",
              "data-scale"))
def loss_nonfinite(ctx: RuleContext) -> Finding | None:
    """A loss value is NaN or Inf; explained from the first bad step and the ones before."""
    if ctx.history.loss_scan.all_finite():
        return None  # no held loss is NaN/Inf, the recent ones included
    steps, losses = ctx.losses
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size == 0:
        return None
    onset = ctx.memo("onset", lambda: find_onset(ctx.history))
    first_bad = int(steps[bad[0]])
    extra = {"first_nonfinite_loss_step": first_bad, "nonfinite_steps": int(bad.size)}
    if onset is None:  # the losses are older than any record: nothing else to go by
        return Finding(summary=f"loss is {losses[bad[0]]} from step {first_bad}",
                       causes=ranked([("invalid-math", 0.3, "no record covers the step")]),
                       first_step=first_bad, evidence=extra)
    finding = onset_finding(onset, extra)
    finding.summary = (f"loss is {losses[bad[0]]} from step {first_bad} "
                       f"({bad.size} of the last {len(losses)} steps); {onset.summary}")
    return finding


def _change_text(drop: float) -> str:
    """A relative drop as words: 'a 3.2% drop', or 'a 5.28% rise' when the loss went up."""
    return f"a {fmt(100 * abs(drop))}% {'drop' if drop >= 0 else 'rise'}"


@rule(sign="training-unstable", severity="warning", title="Training is unstable across batches",
      needs=("loss", "grad_norm", "update_ratio", "data"),
      thresholds={"spike": Threshold(2.0, "a step whose loss is at least twice the median of "
                                          "the 20 steps before it is a spike"),
                  "jump": Threshold(0.1, "a spike must also rise by at least this fraction "
                                         "of the loss at the start of training"),
                  "mad": Threshold(6, "a spike must also exceed the median of the 20 losses "
                                      "before it by this many median absolute deviations "
                                      "(about 4 standard deviations of Gaussian noise)"),
                  "noise": Threshold(8, "a spike's rise over its local level must also exceed "
                                        "the median rise of all steps in the window by this "
                                        "many of their median absolute deviations (judged on "
                                        "log ratios: relative jitter of the loss's own noise)"),
                  "recover": Threshold(2.0, "a spike after which the median of the next 3 "
                                            "losses is back below this multiple of the level "
                                            "before it was recovered from at once: it counts "
                                            "only if it stands out from the window's noise"),
                  "spikes": Threshold(3, "spikes within the recent window before training is "
                                         "called unstable (a single outlier is not a pattern)"),
                  "warmup": WARMUP, "high_update": HIGH_UPDATE,
                  "grad_spike": Threshold(10, "a total gradient norm ten times the window "
                                              "median counts as a gradient spike"),
                  "small_batch": Threshold(8, "batch size at or below which batch statistics "
                                              "and gradient estimates are very noisy")},
      causes=("lr-too-high", "outlier-batches", "bad-batch-statistics", "small-batch"))
def training_unstable(ctx: RuleContext) -> Finding | None:
    """The loss swings or spikes from batch to batch instead of trending down."""
    steps, losses = ctx.losses
    keep = (steps >= ctx.t["warmup"]) & np.isfinite(losses)
    steps, losses = steps[keep][-UNSTABLE_SPAN:], losses[keep][-UNSTABLE_SPAN:]
    if len(losses) < 40 or not _may_spike(losses, ctx.t):
        return None
    base = _rolling_typical(losses[:-1], 20)
    ratio = np.where(base > 0, losses[20:] / np.where(base > 0, base, 1.0), 0.0)
    # A jump must also matter on the scale of the whole run: once a loss is near zero,
    # doubling it is noise (0.01 -> 0.02), not instability.
    first = ctx.history.first_losses
    scale = abs(fast_median(first[:5]))
    big = (losses[20:] - base) >= ctx.t["jump"] * scale
    candidates = (np.flatnonzero((ratio >= ctx.t["spike"]) & big) + 20).tolist()
    # ... and stand out from the spread of the 20 losses before it (median + k * MAD), so
    # the skewed batch-to-batch noise of a converging classifier is not taken for spikes.
    # ... and stand out from the loss's own noise over the whole window: a converged loss
    # is skewed (a few hard examples per batch), so its isolated jumps of several local MADs
    # are ordinary; rises are judged against the spread of every step's rise in the window.
    # A loss that bounces all the time has a wide spread itself: there a spike counts when
    # the loss does not come straight back down after it (isolated jumps are batch noise).
    # Oversized steps (update/weight ratio far above healthy) explain a loss that bounces
    # all the time while it is still high: then a spike need not stand out from that
    # bouncing, which is the sign. A loss that came down by over 90% and jitters there has
    # converged (BatchNorm with weight decay keeps the ratio high in healthy training).
    if len(candidates) < ctx.t["spikes"]:
        return None  # the filters below only remove candidates
    records = ctx.usable(ctx.t["warmup"]) or ctx.records
    oversized = ev.lr_too_high(ctx, records, ctx.t["high_update"]) if records else None
    if fast_median(losses[-20:]) < ctx.t["jump"] * scale or _descending(losses):
        oversized = None
    rise = _rise_z(losses[20:], base)
    spikes = [i for i in candidates if _outlier(losses[i - 20:i], losses[i], ctx.t["mad"])
              and ((oversized is not None and oversized[1] > 0)
                   or rise[i - 20] >= ctx.t["noise"]
                   or _lingers(losses[i + 1:i + 4], base[i - 20], ctx.t["recover"]))]
    if len(spikes) < ctx.t["spikes"]:
        return None
    scores = []
    if records:
        if oversized is not None:
            scores.append(oversized)
        totals = np.array([r.total_grad_norm() for r in records])
        totals = totals[np.isfinite(totals)]
        if totals.size >= 3 and np.median(totals) > 0:
            jump = float(totals.max() / np.median(totals))
            if jump >= ctx.t["grad_spike"]:
                scores.append(("lr-too-high", 0.5,
                               f"gradient norm spikes to {fmt(jump)}x its median"))
        scores.append(_outliers(records, {int(steps[i]) for i in spikes}))
        scores.append(_batch_stats(ctx, records, ctx.t["small_batch"]))
    causes = ranked(scores)
    return Finding(
        summary=(f"{len(spikes)} loss spikes (>= {fmt(ctx.t['spike'])}x the recent median) in "
                 f"the last {len(losses)} steps"),
        causes=causes, first_step=int(steps[spikes[0]]),
        evidence={"spikes": len(spikes), "steps": len(losses),
                  "largest_spike": float(ratio.max())},
        checks=[
            "Lower the learning rate (try 3-10x smaller) or add warm-up; clip gradient norms.",
            "Look at the batches of the spike steps for outliers or bad labels.",
            "With BatchNorm and small batches, increase the batch size or use GroupNorm/"
            "LayerNorm.",
        ],
    )


def _may_spike(losses: np.ndarray, t: dict) -> bool:
    """Whether `spikes` of the losses after the first 20 can be `spike` times their local
    level (False only when they certainly cannot): a level, the geometric mean or median of
    20 losses before, is at least their minimum, so a spike is at least `spike` times the
    smallest loss (with a margin far above the level's rounding).

    >>> import numpy as np
    >>> t = {"spike": 2.0, "spikes": 3}
    >>> _may_spike(np.ones(40), t), _may_spike(np.array([1.0, 3.0] * 20), t)
    (False, True)
    """
    spike = t["spike"]
    low = float(losses[:-1].min())
    if not (spike > 0 and low > 0):
        return True
    return int(np.count_nonzero(losses[20:] >= spike * low * (1 - 1e-9))) >= t["spikes"]


#: Steps of loss history before a loss that stopped improving can be called stalled.
STALL_STEPS = 100
#: A loss still above this fraction of its start level has not converged.
STALL_LEVEL = 0.5


def _stalled_high(ctx: RuleContext, progress: Progress) -> Finding | None:
    """The loss came down at first, then stopped improving while still high, and every step
    still changes the weights by a large fraction of their norm: steps that large bounce
    around the valley instead of going down into it (a learning rate far too high that
    gradient clipping keeps from blowing up)."""
    if progress.count < STALL_STEPS or progress.drop > 1 - STALL_LEVEL:
        return None  # too early to tell, or it came down by over half: near its floor
    if several_optimizers(ctx):
        return None  # opposing objectives (a GAN) settle into a stalemate by design
    records = ctx.usable(ctx.t["warmup"])
    if len(records) < 5 or in_lr_warmup(ctx.records[-int(WINDOW.default):]):
        return None
    oversized = ev.lr_too_high(ctx, records, HIGH_UPDATE.default)
    if oversized[1] <= 0:
        return None
    # what makes the steps oversized or the loss stall comes first when the records show it
    # (gradients never cleared, an output layer that cannot learn, only a weight penalty
    # reaching the parameters): the same causes as a flat loss, ranked the same way
    causes = _flat_causes(ctx, records)
    ratio = ev.update_ratio_median(ctx, records)
    return Finding(
        summary=(f"loss averaged {fmt(progress.start)} over the first steps and "
                 f"{fmt(progress.late)} over the last {RECENT_STEPS} (of {progress.count}): "
                 f"{_change_text(progress.drop)}, then no further progress (recent trend "
                 f"t = {fmt(progress.trend_t)}) while each step still moves the weights by "
                 f"{fmt(ratio)} of their norm"),
        causes=causes,
        evidence={"loss_early": progress.start, "loss_recent": progress.late,
                  "relative_change": progress.drop, "steps": progress.count,
                  "update_ratio_median": ratio},
        checks=["Lower the learning rate 3-10x: with clipping on, a rate far too high shows "
                "as a loss that stalls early, not as a blow-up."],
        first_step=progress.first_step,
    )


#: Recorded steps that must all show probability rows fed to a softmax-applying loss.
PROBABILITY_RECORDS = 3


def _probabilities_as_logits(ctx: RuleContext) -> Finding | None:
    """Probabilities go into a loss that applies its own softmax (or sigmoid): a fact of the
    code, true from the first batch. Seen in the loss's graph (a softmax node feeding
    `cross_entropy`'s log-softmax, wherever the softmax was applied), or from the model's
    outputs (rows in [0, 1] summing to 1) and the gradient the loss sends them (summing to
    zero along every row, as a loss applying its own softmax does). Such a loss cannot go
    below ln(1 + (C - 1) / e) and the double activation damps every gradient."""
    records = ctx.records[-PROBABILITY_RECORDS:]
    if len(records) < PROBABILITY_RECORDS:
        return None
    kinds = {r.activation_before_loss for r in records}
    outputs = [r.output for r in records if r.output is not None]
    # the loss's graph decides where it was read (it sees the loss itself: a loss written
    # for probabilities, like a Brier score, also sends back rows that sum to zero); the
    # output rows only where no graph was given (a detached loss, compiled code)
    by_output = (None in kinds and len(outputs) == len(records)
                 and all(o.probability_rows and o.shift_invariant_loss for o in outputs))
    if by_output:
        kind = "softmax"
        how = (f"the model's outputs are probabilities ({outputs[-1].classes} per row, in "
               f"[{fmt(outputs[-1].min)}, {fmt(outputs[-1].max)}], each row summing to 1) and "
               "the loss applies its own softmax to them (its gradient sums to zero along "
               "every row)")
    elif len(kinds) == 1 and not kinds & {None, ""}:
        kind = str(kinds.pop())
        how = (f"the loss's graph shows a {kind} applied to the model's output right before a "
               f"loss that applies its own {kind} ("
               + ("cross_entropy's log-softmax" if kind == "softmax" else
                  "binary_cross_entropy_with_logits") + ")")
    else:
        return None
    classes = outputs[-1].classes if outputs else 0
    floor = (math.log1p(math.exp(-1.0)) if kind == "sigmoid" else
             math.log1p((classes - 1) / math.e) if classes >= 2 else math.nan)
    _, tail = ctx.losses
    recent = float(np.mean(tail[-RECENT_STEPS:])) if tail.size else math.nan
    if recent < 0.98 * floor:
        return None  # below the floor: the loss is not only that cross-entropy
    floor_text = f"it cannot go below {fmt(floor)}, " if math.isfinite(floor) else ""
    return Finding(
        summary=(f"{how}: predictions can never become confident; {floor_text}and learning "
                 f"crawls (recent loss {fmt(recent)})"),
        causes=ranked([("probabilities-as-logits", 3.0,
                        f"a {kind} feeds a loss that expects logits in the last "
                        f"{len(records)} recorded steps")]),
        evidence={"activation": kind, "classes": classes, "loss_floor": floor,
                  "loss_recent": recent},
        checks=[f"Remove the {kind} before the loss (" + (
            "cross_entropy applies log-softmax itself), or use nll_loss on log_softmax "
            "outputs." if kind == "softmax" else "binary_cross_entropy_with_logits applies "
            "the sigmoid itself), or use binary_cross_entropy on the probabilities.")],
        first_step=records[0].step,
    )


def _stale_gradients(records) -> tuple[str, float, str]:
    """Gradients never cleared: each step follows the running sum of all gradients so far,
    the cause behind a loss that does not go down (a fact, checked on every record)."""
    found = ev.leftover_gradients(records)
    if found is None:
        return ("missing-zero-grad", 0.0, "")
    return ("missing-zero-grad", 3.0,
            f"the previous step's gradients were still there when backward began in "
            f"{found[0]} of {found[1]} recorded steps: every update follows the sum of "
            "all gradients so far, not this batch's")


def _penalty_only(records) -> tuple[str, float, str]:
    """Every gradient a fixed multiple of its weights, in every record: only a weight penalty
    (an L2 term added to the loss) reaches the parameters; the data term has no gradient."""
    ratios = []
    for r in records[-5:]:
        ratio = r.derived("penalty_ratio", lambda r=r: _penalty_ratio(r))
        if ratio is None:
            return ("detached-graph", 0.0, "")
        ratios.append(ratio)
    if not ratios:
        return ("detached-graph", 0.0, "")
    return ("detached-graph", 2.0,
            f"every parameter's gradient is {fmt(ratios[-1])} x its weights in "
            f"{len(ratios)} recorded steps: only a weight penalty reaches them, the data term "
            "of the loss carries no gradient (computed under torch.no_grad(), detached, or "
            "rebuilt from .item())")


def _penalty_ratio(r) -> float | None:
    """The gradient/weight ratio shared by every parameter of a record, None when the ratios
    differ or the weights are alike in size (which proves nothing)."""
    g, w = r.grad_norm, r.param_norm
    ok = np.isfinite(g) & np.isfinite(w) & (w > 0) & (g > 0)
    if ok.sum() < 2 or w[ok].max() < 1.5 * w[ok].min():
        return None
    ratio = g[ok] / w[ok]
    if (ratio.max() - ratio.min()) > 1e-3 * ratio.mean():
        return None
    return float(ratio.mean())


def _tiny_batch(records) -> tuple[str, float, str]:
    size = next((r.data.shape[0] for r in reversed(records)
                 if r.data is not None and r.data.shape), None)
    if size is None or size > TINY_BATCH:
        return ("small-batch", 0.0, "")
    return ("small-batch", 0.5, f"batch size {size}: each step follows one or two examples, so "
                                "progress is slow and buried in noise")


#: A loss whose typical level over the second half of the window is below this fraction of
#: the first half's is still coming down fast: it learns, whatever it bounces.
DESCENT = 0.5


def _descending(losses: np.ndarray) -> bool:
    """Whether the loss's typical level at least halved from the first half of `losses` to
    the second (geometric means of a positive loss, medians otherwise).

    >>> import numpy as np
    >>> from gradscope.rules.loss import _descending
    >>> _descending(np.array([4.0, 3.0, 1.0, 0.5])), _descending(np.array([3.0, 1.0, 4.0, 2.0]))
    (True, False)
    """
    half = len(losses) // 2
    first, second = losses[:half], losses[half:]
    if half == 0:
        return False
    if np.all(losses > 0):
        return bool(np.exp(np.mean(np.log(second)) - np.mean(np.log(first))) < DESCENT)
    return bool(fast_median(second) < DESCENT * fast_median(first))


def _lingers(after: np.ndarray, level: float, factor: float) -> bool:
    """The loss stays up after a spike: the median of the (three) losses after it is still
    above `factor` times the level before it; False while too few steps have followed.

    >>> import numpy as np
    >>> from gradscope.rules.loss import _lingers
    >>> _lingers(np.array([3.0, 2.5, 0.9]), 1.0, 2), _lingers(np.array([1.0, 1.2, 3.0]), 1.0, 2)
    (True, False)
    """
    return len(after) == 3 and float(np.median(after)) > factor * level


def _rise_z(values: np.ndarray, base: np.ndarray) -> np.ndarray:
    """How far each value's rise over its local level stands out from the rises of all the
    values, in median absolute deviations: rises are log ratios for a positive loss (its
    jitter is relative), plain differences otherwise.

    >>> import numpy as np
    >>> from gradscope.rules.loss import _rise_z
    >>> bool(_rise_z(np.array([1.0, 1.1, 0.9, 1.0, 5.0]), np.ones(5))[-1] > 8)
    True
    """
    relative = bool(np.all(values > 0) and np.all(base > 0))
    rise = np.log(values / base) if relative else values - base
    median = fast_median(rise)
    mad = fast_median(np.abs(rise - median))
    return (rise - median) / max(mad, 1e-12)


def _outlier(window: np.ndarray, value: float, k: float) -> bool:
    """`value` above the window's median by more than k median absolute deviations."""
    median = fast_median(window)
    mad = fast_median(np.abs(window - median))
    return bool(value > median + k * max(mad, 1e-12))


def _outliers(records, spike_steps: set[int]) -> tuple[str, float, str]:
    stds = [(r.step, r.data.std) for r in records if r.data is not None and r.data.is_float]
    if len(stds) < 5:
        return ("outlier-batches", 0.0, "")
    values = np.array([s for _, s in stds])
    med = np.median(values)
    mad = np.median(np.abs(values - med)) or (abs(med) * 0.05 + 1e-12)
    odd = [step for step, s in stds if abs(s - med) / mad > 10]
    if not odd:
        return ("outlier-batches", 0.0, "")
    hit = len([s for s in odd if s in spike_steps or s - 1 in spike_steps])
    score = 0.5 + hit
    return ("outlier-batches", score,
            f"{len(odd)} batch(es) with input spread far from the usual (e.g. step {odd[0]})")


def _batch_stats(ctx: RuleContext, records, small: float) -> tuple[str, float, str]:
    size = next((r.data.shape[0] for r in reversed(records)
                 if r.data is not None and r.data.shape), None)
    if size is None or size > small:
        return ("small-batch", 0.0, "")
    has_bn = any("BatchNorm" in t for t in ctx.layout.module_types.values())
    if has_bn:
        return ("bad-batch-statistics", 1.0,
                f"batch size {size} with BatchNorm layers: per-batch mean/var are very noisy")
    return ("small-batch", 0.7, f"batch size {size}: gradient estimates are very noisy")


RULES = [loss_flat, loss_nonfinite, training_unstable]
