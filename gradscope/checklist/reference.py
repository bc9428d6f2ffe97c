"""Check 1: the loss at initialisation against what the task implies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..diagnosis import Diagnosis
from ..rules.common import fmt
from .inputs import Batch, model_logits
from .result import CheckResult, finding

#: Excess of the initial cross-entropy over ln C (nats) beyond which the start is called far
#: off: for small logit spreads the excess is about var(logits)/2, so 1 nat means logits that
#: already differ by ~1.4 units between classes before any learning.
CE_EXCESS = 1.0
#: Initial cross-entropy below this fraction of ln C: the untrained model already predicts the
#: labels, which points at targets leaking into the inputs.
CE_LOW = 0.5
#: Initial regression loss above this multiple of the constant-mean loss (the target variance
#: for MSE): the outputs' error at init is twice the targets' spread or more.
REGRESSION_HIGH = 4.0
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Reference:
    """The loss an uninformed model should start at, and the assumption behind it."""

    kind: str  # "cross-entropy", "binary-cross-entropy" or "regression"
    value: float
    assumption: str
    classes: int | None = None


def class_count(logits: torch.Tensor, targets: torch.Tensor) -> int | None:
    """The class dimension's size when `targets` holds class ids for `logits`, else None.

    Example:
        >>> class_count(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
        10
    """
    if targets.is_floating_point() or targets.is_complex() or logits.dim() != targets.dim() + 1:
        return None
    if logits.shape[:-1] == targets.shape:
        return int(logits.shape[-1])
    if logits.shape[0] == targets.shape[0] and logits.shape[2:] == targets.shape[1:]:
        return int(logits.shape[1])
    return None


def reference(batch: Batch, output: Any) -> Reference | None:
    """What the loss should be at initialisation for this task, or None when unknown."""
    logits, targets = model_logits(output), batch.target
    if logits is None or targets is None:
        return None
    logits = logits.detach()
    classes = class_count(logits, targets)
    if classes is not None and classes > 1:
        value = math.log(classes)
        assumption = (f"{classes}-class cross-entropy with near-uniform outputs at init: "
                      f"ln {classes} = {value:.3f}")
        if batch.loss_fn is not None and isinstance(output, torch.Tensor):
            uniform = torch.full_like(logits, -value)  # log(1/C): right for CE and NLL alike
            with torch.no_grad():
                measured = float(batch.loss_fn(uniform, targets))
            if math.isfinite(measured) and abs(measured - value) > 1e-3:
                value = measured
                assumption = f"loss_fn on uniform class probabilities: {fmt(measured)}"
        return Reference("cross-entropy", value, assumption, classes)
    if not targets.is_floating_point() or logits.numel() != targets.numel():
        return None
    shaped = targets.reshape(logits.shape).to(logits.dtype)
    if batch.loss_fn is not None and isinstance(output, torch.Tensor):
        with torch.no_grad():
            at_zero = float(batch.loss_fn(torch.zeros_like(logits), targets))
        # with logits of 0, binary cross-entropy is ln 2 whatever the targets (an MSE equals
        # it only by coincidence): targets outside [0, 1] are then the data check's finding
        if abs(at_zero - math.log(2)) < 1e-4:
            return Reference("binary-cross-entropy", math.log(2),
                             "binary cross-entropy with p = 0.5 outputs at init: ln 2 = 0.693")
        mean = shaped.mean(dim=0, keepdim=True).expand_as(shaped)
        with torch.no_grad():
            value = float(batch.loss_fn(mean.reshape(logits.shape), targets))
        return Reference("regression", value,
                         f"loss_fn when predicting the target mean (for MSE the target "
                         f"variance): {fmt(value)}")
    value = float(shaped.var(dim=0, unbiased=False).mean())
    return Reference("regression", value, f"MSE when predicting the target mean (the target "
                                          f"variance): {fmt(value)}")


def check_init_loss(batch: Batch, output: Any, loss: float,
                    data_scale_flagged: bool) -> CheckResult:
    """Compare the first loss with the reference; a far-off start is a warning."""
    result = CheckResult("init-loss")
    ref = reference(batch, output)
    if ref is None:
        result.summary = f"loss {fmt(loss)}; no reference (outputs or targets of unknown form)"
        result.data = {"loss": loss}
        return result
    result.data = {"loss": loss, "reference": ref.value, "kind": ref.kind,
                   "assumption": ref.assumption}
    result.summary = f"loss {fmt(loss)} vs expected {fmt(ref.value)} ({ref.assumption})"
    if not math.isfinite(loss):
        return result  # the gradients check reports the non-finite loss with its origin
    logits = model_logits(output)
    spread = float(logits.detach().float().std()) if logits is not None and logits.numel() > 1 \
        else float("nan")
    evidence = {"loss": loss, "expected": ref.value, "output_std": spread}
    checks_high = [
        "Initialise the last layer smaller (or zero its weights) so outputs start near "
        "neutral.",
        "Check the output scaling (e.g. a missing 1/sqrt(d) or temperature) and that the loss "
        "matches the outputs (logits into cross-entropy, not probabilities).",
    ]
    if ref.kind == "regression":
        if ref.value > 0 and loss > REGRESSION_HIGH * ref.value:
            assert batch.target is not None  # a reference needs targets
            target = batch.target.detach().float()
            offset = abs(float(target.mean())) > 2 * float(target.std()) if target.numel() > 1 \
                else False
            causes = [("poor-init", 0.5 if offset or data_scale_flagged else 2.0,
                       f"outputs at init have std {fmt(spread)}, large against the targets")]
            if offset:
                causes.append(("data-scale", 2.0,
                               f"targets have mean {fmt(float(target.mean()))} and std "
                               f"{fmt(float(target.std()))}: standardise them or start the "
                               "output bias at their mean"))
            if data_scale_flagged:
                causes.append(("data-scale", 2.0, "unnormalised inputs blow up the outputs"))
            result.diagnoses.append(finding(
                "loss-init-off", "warning", "Loss at initialisation is far off",
                f"initial loss {fmt(loss)} is {fmt(loss / ref.value)}x {ref.assumption}",
                causes, "init-loss", evidence=evidence, checks=checks_high))
        return result
    mismatch = probabilities_into_logit_loss(batch, output, ref)
    if mismatch is not None:
        result.diagnoses.append(mismatch)
    excess = loss - ref.value
    if excess > CE_EXCESS:
        causes = [("poor-init", 2.0 if spread > 1 else 1.0,
                   f"logits at init have std {fmt(spread)}: the model is confident before it "
                   "has learned anything")]
        if data_scale_flagged:
            causes.append(("data-scale", 1.5, "unnormalised inputs blow up the logits"))
        result.diagnoses.append(finding(
            "loss-init-off", "warning", "Loss at initialisation is far off",
            f"initial loss {fmt(loss)} is {fmt(excess)} nats above {ref.assumption}",
            causes, "init-loss", evidence=evidence, checks=checks_high))
    elif loss < CE_LOW * ref.value:
        result.diagnoses.append(finding(
            "loss-init-off", "warning", "Loss at initialisation is far below chance",
            f"initial loss {fmt(loss)} is under half of {ref.assumption}: the untrained model "
            "already predicts the labels",
            [("label-leak", 1.0, "the targets (or a function of them) are among the inputs")],
            "init-loss", evidence=evidence,
            checks=["Check that the labels are not fed to the model (a leaked column, the "
                    "target token in the input sequence)."]))
    return result


#: How far the outputs' class rows may sum from 1 and still be read as probabilities.
ROW_SUM_SLACK = 1e-3


def _looks_like_probabilities(logits: torch.Tensor, ref: Reference,
                              targets: torch.Tensor) -> bool:
    if logits.numel() < 8 or not logits.is_floating_point():
        return False
    values = logits.detach().float()
    if float(values.min()) < 0.0 or float(values.max()) > 1.0:
        return False
    if ref.kind == "binary-cross-entropy":
        return True  # every output in [0, 1]: a sigmoid already applied
    dim = -1 if values.shape[:-1] == targets.shape else 1
    return float((values.sum(dim=dim) - 1.0).abs().max()) <= ROW_SUM_SLACK


def probabilities_into_logit_loss(batch: Batch, output: Any,
                                  ref: Reference) -> Diagnosis | None:
    """A warning when the model already outputs probabilities (softmax or sigmoid applied)
    and the loss applies its own softmax/sigmoid to them, as `cross_entropy` and
    `binary_cross_entropy_with_logits` do: the outputs can then never become confident, the
    loss has a high floor and learning crawls.

    A loss that takes logits is told apart from one written for probabilities (NLL of
    log-probabilities, a hand-written -log p): for cross-entropy it does not change when a
    constant is added to every logit of a row; for binary cross-entropy it is ln 2 at 0.

    Example:
        >>> import torch.nn.functional as F
        >>> probs = torch.rand(8, 3).softmax(-1)
        >>> b = Batch.of((torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)), F.cross_entropy)
        >>> probabilities_into_logit_loss(b, probs, reference(b, probs)).cause
        'probabilities-as-logits'
    """
    logits, targets = model_logits(output), batch.target
    if (batch.loss_fn is None or not isinstance(output, torch.Tensor) or logits is None
            or targets is None or ref.kind == "regression"
            or not _looks_like_probabilities(logits, ref, targets)):
        return None
    values = logits.detach()
    if ref.kind == "cross-entropy":
        with torch.no_grad():
            plain = float(batch.loss_fn(values, targets))
            shifted = float(batch.loss_fn(values + 1.0, targets))
        if not (math.isfinite(plain) and abs(plain - shifted) <= 1e-4 * max(1.0, abs(plain))):
            return None  # a loss written for probabilities: nothing wrong
        what = "softmax"
        fix = ("Remove the softmax at the end of the model (cross_entropy applies log-softmax "
               "itself), or use nll_loss on log_softmax outputs.")
    else:
        what = "sigmoid"
        fix = ("Remove the sigmoid at the end of the model (binary_cross_entropy_with_logits "
               "applies it itself), or use binary_cross_entropy on the probabilities.")
    return finding(
        "loss-init-off", "warning", "Outputs are probabilities, the loss expects logits",
        f"every output is in [0, 1]{' and each row sums to 1' if what == 'softmax' else ''}: "
        f"a {what} is applied before a loss that applies its own, so predictions cannot "
        "become confident and the loss stays high",
        [("probabilities-as-logits", 1.0,
          f"outputs in [{fmt(float(values.min()))}, {fmt(float(values.max()))}] fed to a "
          f"loss that applies {what} itself")],
        "init-loss",
        evidence={"output_min": float(values.min()), "output_max": float(values.max())},
        checks=[fix])
