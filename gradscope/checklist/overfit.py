"""Check 5: can the model memorise one batch? And if not, which other finding explains it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..diagnosis import Diagnosis
from ..rules.common import fmt
from .result import CheckResult, finding

#: The batch counts as memorised once the loss is this fraction of its first value.
MEMORISED = 0.1
#: Training stops early below this fraction (nothing more to learn about the pipeline).
STOP = 0.05
#: At or below this fraction at the end the loss is heading to zero, only slower than the
#: budget (a healthy LSTM at Adam's default 1e-3 loses ~45% in 100 steps on one small batch).
HEADING = 0.5
#: Between HEADING and this fraction, the loss counts as falling when the least-squares slope of
#: log(loss) over the steps is negative with a t-statistic of at most TREND_T: a few steps at a
#: small learning rate (12% in 30 Adam steps at 1e-3 for a small MLP) are a clear trend while
#: dropout noise on a model that does not learn is not. A loss that keeps more than 98% of its
#: first value has not started to learn, however steady its creep (a healthy two-layer LSTM at
#: Adam's 1e-3 loses ~5% in 30 steps).
FALLING = 0.98
TREND_T = -4.0
#: A loss ending above this multiple of its first value went the wrong way.
ROSE = 1.5

#: The cause each earlier finding offers when the batch cannot be memorised.
EXPLAINS = {
    "grad-none": "detached-graph",
    "layers-stalled": "broken-gradient-flow",
    "values-nonfinite": "invalid-math",
    "units-dead": "dead-units",
    "activations-saturated": "saturated-activations",
    "activations-scale": "poor-init",
    "grad-vanishing": "vanishing-gradients",
    "grad-exploding": "exploding-gradients",
    "loss-init-off": "poor-init",
    "data-suspect": "data-scale",
    "params-frozen": "missing-from-optimizer",
}


def _explanations(earlier: Sequence[Diagnosis], lr_too_low: bool, user_lr: float | None,
                  start: float | None) -> list[tuple[str, float, str]]:
    causes: list[tuple[str, float, str]] = []
    for d in earlier:
        if d.severity == "info":
            continue
        cause = d.cause or EXPLAINS.get(d.sign, "poor-init")
        weight = 2.0 if d.severity == "error" else 1.0
        causes.append((cause, weight, f"{d.sign}: {d.summary or d.title}"))
    if lr_too_low and user_lr is not None and start is not None:
        causes.append(("lr-too-low", 2.0, f"your learning rate {fmt(user_lr)} is below "
                                          f"{fmt(start)}, where the loss starts falling in the "
                                          "range test"))
    return causes


def trend(values: np.ndarray) -> tuple[float, float]:
    """(slope of log(loss) per step, its t-statistic) by least squares.

    Example:
        >>> slope, t = trend(np.exp(-0.1 * np.arange(10.0)))
        >>> round(slope, 6), t
        (-0.1, -inf)
    """
    steps = np.arange(values.size, dtype=float)
    logs = np.log(np.maximum(values, 1e-12))
    if values.size < 3:
        return 0.0, 0.0
    centred = steps - steps.mean()
    slope = float(np.sum(centred * (logs - logs.mean())) / np.sum(centred ** 2))
    residual = logs - logs.mean() - slope * centred
    se = math.sqrt(float(np.sum(residual ** 2)) / (values.size - 2) / float(np.sum(centred ** 2)))
    if se < 1e-12:
        return slope, -math.inf if slope < 0 else (math.inf if slope > 0 else 0.0)
    return slope, slope / se


def check_overfit(losses: Sequence[float], steps: int, earlier: Sequence[Diagnosis],
                  lr: dict | None) -> CheckResult:
    """Judge the overfit curve; a batch that is not memorised gets the causes found earlier."""
    result = CheckResult("overfit")
    values = np.asarray(losses, dtype=float)
    result.data = {"losses": values.tolist(), "budget": steps}
    first = values[0]
    lr = lr or {}
    user, start = lr.get("user_lr"), lr.get("start")
    causes = _explanations(earlier, bool(lr.get("too_low")), user, start)
    if not math.isfinite(first):
        result.summary = "the first loss is already NaN/Inf"
        result.diagnoses.append(finding(
            "loss-nonfinite", "error", "Loss is NaN/Inf before any update",
            "the loss at initialisation is not finite",
            causes or [("invalid-math", 1.0, "a log/division of zero or an overflow in the "
                                             "forward or the loss")], "overfit",
            evidence={"loss": float(first)}))
        return result
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        result.summary = f"loss became NaN/Inf at step {int(bad[0])}"
        diverge = lr.get("diverge")
        high = [("lr-too-high", 2.0, f"the learning rate {fmt(user)} is at or past "
                                     f"{fmt(diverge)}, where the range test diverged")
                ] if user is not None and diverge is not None and user >= diverge else []
        result.diagnoses.append(finding(
            "loss-nonfinite", "error", "Loss became NaN/Inf while overfitting one batch",
            result.summary, high + causes or [("exploding-gradients", 1.0, "the updates "
                                                                           "grew until they "
                                                                           "overflowed")],
            "overfit", evidence={"step": int(bad[0]), "first_loss": float(first)},
            checks=["Lower the learning rate; clip gradients (clip_grad_norm_)."]))
        return result
    end = float(np.median(values[-3:]))
    ratio = end / first if first > 0 else 0.0
    reached = np.flatnonzero(values <= MEMORISED * first)
    half = np.flatnonzero(values <= 0.5 * first)
    result.data.update({"final_ratio": ratio, "steps_run": int(values.size),
                        "memorised_at": int(reached[0]) if reached.size else None,
                        "halved_at": int(half[0]) if half.size else None})
    trend_text = f"loss {fmt(float(first))} -> {fmt(end)} in {values.size} steps"
    if reached.size:
        result.summary = (f"{trend_text}: memorised (under {fmt(100 * MEMORISED)}% of the start "
                          f"at step {int(reached[0])}"
                          + (f", halved at step {int(half[0])})" if half.size else ")"))
        return result
    slope, t = trend(values)
    result.data.update({"slope": slope, "t": t})
    if ratio <= HEADING or (ratio <= FALLING and slope < 0 and t <= TREND_T):
        to_memorise = math.log(MEMORISED) / slope if slope < 0 else math.inf
        result.data["projected_steps"] = to_memorise
        halved = f"halved at step {int(half[0])}" if half.size else \
            f"down {fmt(100 * (1 - ratio))}%"
        result.summary = (f"{trend_text}: heading to 0 ({halved}; about "
                          f"{fmt(to_memorise)} steps to memorise at this rate)")
        return result
    if ratio >= ROSE:
        result.summary = f"{trend_text}: the loss rose"
        result.diagnoses.append(finding(
            "training-unstable", "warning", "Loss rises while overfitting one batch",
            result.summary,
            [("lr-too-high", 2.0,
              f"learning rate {fmt(user) if user is not None else '1e-3 (Adam)'}"),
             *causes], "overfit",
            evidence={"first_loss": float(first), "last_loss": end},
            checks=["Lower the learning rate; check the sign of the loss (minimise, not "
                    "maximise)."]))
        return result
    result.summary = f"{trend_text}: the model cannot memorise one batch"
    if not causes:
        causes = [("lr-too-low", 0.5, f"the learning rate {fmt(user)} moves the weights too "
                                      "little" if user is not None else "the learning rate"),
                  ("model-mismatch", 0.5, "no other check found a problem: the outputs or the "
                                          "loss may not fit the task (e.g. probabilities fed to "
                                          "a loss that expects logits)")]
    result.diagnoses.append(finding(
        "loss-flat", "warning", "Cannot overfit one batch",
        f"{result.summary} (the loss fell by only {fmt(100 * (1 - ratio))}%)", causes,
        "overfit", evidence={"first_loss": float(first), "last_loss": end,
                             "steps": int(values.size)},
        checks=["A model that cannot memorise a single batch has a bug: fix the findings "
                "above first.",
                "Then tune the learning rate (see the range test) before changing the model."]))
    return result
