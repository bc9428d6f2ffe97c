"""Check 6: the learning-rate range test (Smith 2015) on a fresh copy of the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..rules.common import fmt
from .inputs import Batch
from .isolation import base_lr, model_copy, optimizer_copy, scale_lrs
from .result import CheckResult, finding

#: The sweep runs over these learning rates, exponentially spaced (8 decades: from far too
#: small for any optimizer to far too large for any).
LR_LOW, LR_HIGH = 1e-7, 10.0
#: The loss has started falling once it is this fraction below its start, and below the
#: start's noise: NOISE_SIGMAS robust standard deviations of the first BASELINE_STEPS losses
#: (taken at learning rates of 1e-7 to ~1e-6, where no optimizer moves the weights, so their
#: spread is the batch noise of dropout and the like). The start is their median.
START_DROP = 0.05
BASELINE_STEPS = 5
NOISE_SIGMAS = 3.0
#: The sweep stops as diverged when the loss rises above this multiple of its start, or climbs
#: back above the start (plus its noise) after it had lost LEARNED of it, or loses half of the
#: progress it made while also exceeding 4x its best value (fastai's stopping rule), or
#: becomes NaN/Inf. Rises and falls are judged on a running median of 3 losses.
DIVERGE_RISE = 1.5
LEARNED = 0.25
DIVERGE_BEST = 4.0
#: The user's learning rate counts as too low when it is this factor below the start.
TOO_LOW = 10.0


@dataclass
class Sweep:
    lrs: list[float]
    losses: list[float]


def sweep(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer | None,
          steps: int, low: float = LR_LOW, high: float = LR_HIGH) -> Sweep:
    """Train a fresh copy on the batch while the learning rate grows from `low` to `high`
    (every param group scaled alike); stop at divergence."""
    copy, params = model_copy(model)
    opt = optimizer_copy(optimizer, params, copy)
    bases = [float(g["lr"]) for g in opt.param_groups]
    main = bases[0] if bases[0] > 0 else 1.0
    bases = [b / main if main else 1.0 for b in bases]  # group ratios relative to the first
    lrs = np.geomspace(low, high, steps).tolist()
    done = Sweep([], [])
    for lr in lrs:
        scale_lrs(opt, bases, lr)
        opt.zero_grad(set_to_none=True)
        _, loss = batch.forward(copy)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        done.lrs.append(lr)
        done.losses.append(value)
        if _diverged(done.losses):
            break
    return done


def _baseline(losses: list[float]) -> tuple[float, float]:
    """(start, margin): the median of the first losses, and how far below it counts as a fall
    (the larger of START_DROP of it and NOISE_SIGMAS robust standard deviations).

    Example:
        >>> _baseline([2.0, 2.2, 1.8, 2.0, 2.0, 1.0])
        (2.0, 0.1)
    """
    head = np.asarray(losses[:BASELINE_STEPS], dtype=float)
    start = float(np.median(head))
    spread = 1.4826 * float(np.median(np.abs(head - start))) if head.size >= 3 else 0.0
    return start, max(START_DROP * abs(start), NOISE_SIGMAS * spread)


def _running_median(losses: list[float]) -> list[float]:
    """The median of each loss and the (up to) two before it."""
    return [float(np.median(losses[max(0, i - 2): i + 1])) for i in range(len(losses))]


def _diverged(losses: list[float]) -> bool:
    """Whether the sweep has diverged at its latest loss. Rising and falling are judged on the
    median of the last 3 losses against the start's noise, so noisy steps (dropout on a small
    batch) do neither.

    Example:
        >>> _diverged([1, 1, 1, 1, 1, 2, 2]), _diverged([1, .9, 1.1, 1, 1, .9, 1.1, 1])
        (True, False)
        >>> _diverged([1, 1, 1, 1, 1, .5, .4, 1.1, 1.2])
        True
        >>> _diverged([1, 1, 1, 1, 1, .9, .9, 1.1, 1.2])  # a 10% dip is not learning
        False
    """
    if not math.isfinite(losses[-1]):
        return True
    start, margin = _baseline(losses)
    recent = _running_median(losses)
    if recent[-1] > DIVERGE_RISE * start:
        return True
    best = min(recent)
    if best < (1 - LEARNED) * start and recent[-1] > start + margin:
        return True  # it had learned, and lost all of it
    return recent[-1] > DIVERGE_BEST * best and recent[-1] > best + 0.5 * (start - best)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Running median of 3 (one noisy step does not move the landmarks)."""
    if values.size < 3:
        return values
    padded = np.concatenate([values[:1], values, values[-1:]])
    return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def landmarks(result: Sweep) -> dict[str, float | None]:
    """Where the loss starts falling, falls fastest, and diverges (None where not seen)."""
    lrs = np.asarray(result.lrs)
    losses = np.asarray(result.losses, dtype=float)
    finite = np.isfinite(losses)
    out: dict[str, float | None] = {"start": None, "steepest": None, "diverge": None,
                                    "best": None}
    if not finite.any():
        return out
    stop = int(np.argmin(finite)) if not finite.all() else losses.size
    start, margin = _baseline(losses[:stop].tolist())
    smooth = _smooth(losses[:stop])
    diverged = stop < losses.size or _diverged(losses[:stop].tolist())
    if diverged:
        out["diverge"] = float(lrs[min(stop, losses.size - 1)] if stop < losses.size
                               else lrs[stop - 1])
    best = int(np.argmin(smooth))
    below = smooth[: best + 1] < start - margin
    if below[-1]:
        # the loss starts falling where it goes below the start for good (until its minimum):
        # a dip of noise that comes back up does not count
        above = np.flatnonzero(~below)
        first = int(above[-1]) + 1 if above.size else 0
        out["start"] = float(lrs[first])
        out["best"] = float(lrs[best])
        if best > first:
            slope = np.gradient(smooth[: best + 1], np.log(lrs[: best + 1]))
            slope[:first] = 0.0  # the steepest fall comes after the start
            out["steepest"] = float(lrs[int(np.argmin(slope))])
        else:
            out["steepest"] = float(lrs[best])
    return out


def check_lr_range(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer | None,
                   steps: int) -> CheckResult:
    """Sweep the learning rate and place the user's on the scale."""
    result = CheckResult("lr-range")
    done = sweep(model, batch, optimizer, steps)
    marks = landmarks(done)
    user = base_lr(optimizer) if optimizer is not None else None
    result.data = {"lrs": done.lrs, "losses": done.losses, "user_lr": user, **marks}
    where = []
    if marks["start"] is not None:
        where.append(f"the loss starts falling at {fmt(marks['start'])}")
        where.append(f"falls fastest at {fmt(marks['steepest'] or marks['start'])}")
    else:
        where.append(f"the loss did not fall anywhere from {fmt(done.lrs[0])} to "
                     f"{fmt(done.lrs[-1])}")
    where.append(f"diverges at {fmt(marks['diverge'])}" if marks["diverge"] is not None
                 else f"no divergence up to {fmt(done.lrs[-1])}")
    yours = f"yours is {fmt(user)}; " if user is not None else "no optimizer given (Adam); "
    result.summary = yours + ", ".join(where)
    if user is None or not user > 0:
        return result
    if marks["diverge"] is not None and user >= marks["diverge"]:
        result.diagnoses.append(finding(
            "training-unstable", "warning", "The learning rate is past the divergence point",
            f"{result.summary}", [("lr-too-high", 1.0,
                                   f"at {fmt(marks['diverge'])} the loss already blew up in the "
                                   f"sweep; yours is {fmt(user)}")], "lr-range",
            evidence={"user_lr": user, **{k: v for k, v in marks.items() if v is not None}},
            checks=[f"Try a learning rate near {fmt(marks['steepest'] or marks['diverge'] / 10)}"
                    " (where the loss fell fastest), well below the divergence point."]))
    result.data["too_low"] = bool(marks["start"] is not None
                                  and user < marks["start"] / TOO_LOW)
    return result
