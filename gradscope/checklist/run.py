"""checkup(): run the checklist on copies of the model and optimizer, in seconds."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import GradscopeError, GradscopeWarning
from ..scope import watch
from .data import EMBEDDINGS, check_data, labels_out_of_range
from .depth import check_depth
from .gradients import check_gradients
from .graph import ForwardTracer, reached_nodes
from .inputs import Batch, LossFn, model_logits
from .isolation import model_copy, optimizer_copy, preserved_rng
from .lr_range import check_lr_range
from .overfit import STOP, check_overfit
from .reference import check_init_loss, class_count, reference
from .result import CHECK_TITLES, CheckResult, Checkup, finding

#: Steps of the overfit and range tests: full and quick mode.
OVERFIT_STEPS, LR_STEPS = 100, 60
QUICK_OVERFIT_STEPS, QUICK_LR_STEPS = 30, 30
#: The overfit run is recorded every RECORD_EVERY steps (the first step always: it holds the
#: signals at initialisation) and never stopped before MIN_OVERFIT_STEPS, so that the
#: frozen-parameter rule sees three recorded optimizer steps.
RECORD_EVERY = 4
MIN_OVERFIT_STEPS = 3 * RECORD_EVERY + 1


class _BadLabels(Exception):
    pass


def checkup(model: nn.Module, batch: Any, loss_fn: LossFn | None = None,
            optimizer: torch.optim.Optimizer | None = None, *, quick: bool = False,
            overfit_steps: int | None = None, lr_steps: int | None = None,
            checks: Sequence[str] | None = None, seed: int = 0) -> Checkup:
    """Run the debugging checklist on copies of `model` and `optimizer` before training.

    `batch` is `(inputs, targets)` with `loss_fn(model(inputs), targets)` (inputs a tensor, or
    a tuple/dict spread into the call), or a dict with `loss_fn=None` for a model that returns
    its loss (`model(**batch).loss`). The optimizer gives the class and settings to copy.
    `quick=True` runs shorter overfit and range tests; `checks` picks the checks to run
    (names in :data:`CHECK_TITLES`). The model, the optimizer and every random stream are
    left exactly as they were.

    Example:
        >>> import torch, gradscope
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        >>> ck = gradscope.checkup(model, (x, y), nn.functional.cross_entropy, opt, quick=True)
        >>> [d.sign for d in ck.diagnoses if d.severity != "info"]
        []
    """
    if not isinstance(model, nn.Module):
        raise GradscopeError(
            f"checkup() needs a torch.nn.Module as its first argument, got "
            f"{type(model).__name__}; pass your model, e.g. gradscope.checkup(model, (x, y), "
            "loss_fn, optimizer).")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradscopeError(
            f"checkup() expected a torch.optim.Optimizer as optimizer, got "
            f"{type(optimizer).__name__}; pass the optimizer you will train with, or None.")
    wanted = set(CHECK_TITLES) if checks is None else set(checks)
    unknown = sorted(wanted - set(CHECK_TITLES))
    if unknown:
        raise GradscopeError(f"checkup() got unknown check(s) {', '.join(unknown)}; use some "
                             f"of: {', '.join(CHECK_TITLES)}.")
    overfit_n = _positive("overfit_steps", overfit_steps,
                          QUICK_OVERFIT_STEPS if quick else OVERFIT_STEPS)
    lr_n = _positive("lr_steps", lr_steps, QUICK_LR_STEPS if quick else LR_STEPS)
    checked = Batch.of(batch, loss_fn)
    started = time.perf_counter()
    with preserved_rng(seed), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", GradscopeWarning)
        results = _run(model, checked, optimizer, wanted, overfit_n, lr_n)
    notes = [] if optimizer is not None else [
        "no optimizer given: the overfit and range tests use Adam(lr=1e-3)"]
    return Checkup(results=results, notes=notes, seconds=time.perf_counter() - started)


def _positive(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise GradscopeError(f"{name}={value!r} must be an integer of at least 2.")
    return value


def _label_guard(batch: Batch, model: nn.Module):
    """A check run before the loss: class ids out of range stop the checkup with a finding
    (on CUDA they would end in a device-side assert)."""
    targets = batch.target
    if targets is None or targets.is_floating_point():
        return None
    if batch.self_loss:
        config = getattr(model, "config", None)
        ids = batch.input
        size = (getattr(config, "vocab_size", None) if ids is not None
                and tuple(targets.shape) == tuple(ids.shape)
                else getattr(config, "num_labels", None))
        if isinstance(size, int) and size > 1:
            wrong = labels_out_of_range(targets, size)
            if wrong:
                raise _BadLabels(wrong)
        return None

    def guard(output: Any) -> None:
        logits = model_logits(output)
        classes = class_count(logits, targets) if logits is not None else None
        if classes:
            wrong = labels_out_of_range(targets, classes)
            if wrong:
                raise _BadLabels(wrong)

    return guard


def _forward_failed(err: Exception, batch: Batch, model: nn.Module) -> GradscopeError:
    hint = ""
    x = batch.input
    has_embedding = any(type(m).__name__ in EMBEDDINGS for m in model.modules())
    if x is not None and not (x.is_floating_point() or x.is_complex()) and not has_embedding:
        hint = (f"; the inputs are {str(x.dtype).replace('torch.', '')} and the model has no "
                "embedding layer: cast them with .float()")
    return GradscopeError(
        f"checkup() could not compute the loss on the batch ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}){hint}; check that model(inputs) and "
        "loss_fn(outputs, targets) run on this batch.")


def _run(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer | None,
         wanted: set[str], overfit_n: int, lr_n: int) -> list[CheckResult]:
    copy, params = model_copy(model)
    opt = optimizer_copy(optimizer, params, copy)
    guard = None
    try:
        guard = _label_guard(batch, copy)
    except _BadLabels as bad:
        return _stopped_by_labels(str(bad))
    overfit_n = overfit_n if "overfit" in wanted else 1
    scope = watch(copy, opt, every=RECORD_EVERY, live=False, rules=("params-frozen",),
                  history_size=overfit_n + 1)
    try:
        clock = time.perf_counter()
        tracer = ForwardTracer(copy)
        try:
            output, loss = batch.forward(copy, guard)
        except _BadLabels as bad:
            return _stopped_by_labels(str(bad))
        except GradscopeError:
            raise
        except Exception as err:
            raise _forward_failed(err, batch, copy) from err
        finally:
            tracer.remove()
        tracked = loss.requires_grad
        graph = reached_nodes(loss) if tracked else (set(), set())
        if tracked:
            loss.backward()
            opt.step()
        scope.step(loss)
        first_loss = float(loss.detach())
        losses = [first_loss]
        step_seconds = time.perf_counter() - clock

        timed: dict[str, float] = {}
        clock = time.perf_counter()
        ref = reference(batch, output)
        record = scope.history.records()[0]
        data = check_data(batch, record.data, ref, scope.layout.module_types)
        timed["data"] = time.perf_counter() - clock
        scale_flag = any(c.id == "data-scale" for d in data.diagnoses for c in d.causes)
        clock = time.perf_counter()
        init = check_init_loss(batch, output, first_loss, scale_flag)
        timed["init-loss"] = time.perf_counter() - clock
        del output
        clock = time.perf_counter()
        depth = check_depth(scope.layout, record, scale_flag)
        timed["depth"] = time.perf_counter() - clock

        clock = time.perf_counter()
        if tracked and "overfit" in wanted:
            _overfit(copy, opt, batch, scope, overfit_n, losses)
        overfit_seconds = time.perf_counter() - clock
    finally:
        scope.close()
    engine = scope.diagnose()

    clock = time.perf_counter()
    gradients = check_gradients(scope.layout, scope.history.records(), tracked, graph,
                                [id(t) for t in scope.layout.tensors], tracer)
    gradients.diagnoses += engine
    gradients.seconds = step_seconds + time.perf_counter() - clock
    del copy, opt, scope

    lr = CheckResult("lr-range")
    if not tracked:
        lr.skipped = "the loss has no gradient"
    elif "lr-range" in wanted:
        clock = time.perf_counter()
        lr = check_lr_range(model, batch, optimizer, lr_n)
        lr.seconds = time.perf_counter() - clock
    else:
        lr.skipped = "not requested"

    earlier = [d for r in (gradients, data, init, depth) for d in r.diagnoses]
    if tracked and "overfit" in wanted:
        overfit = check_overfit(losses, overfit_n, earlier, lr.data or None)
        overfit.seconds = overfit_seconds
    else:
        overfit = CheckResult("overfit", skipped="the loss has no gradient" if not tracked
                              else "not requested")
    for result in (data, init, depth):
        result.seconds = timed[result.name]
    by_name = {r.name: r for r in (init, gradients, data, depth, overfit, lr)}
    ordered = []
    for name in CHECK_TITLES:
        result = by_name[name]
        if name not in wanted and result.skipped is None:
            result = CheckResult(name, skipped="not requested")
        ordered.append(result)
    return ordered


def _overfit(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, scope: Any,
             steps: int, losses: list[float]) -> None:
    """Train on the batch up to `steps` steps in all, appending each loss to `losses`; stop
    once it is below STOP of the first (not before MIN_OVERFIT_STEPS) or not finite."""
    for step in range(len(losses), steps):
        opt.zero_grad(set_to_none=True)
        _, loss = batch.forward(model)
        loss.backward()
        opt.step()
        scope.step(loss)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if step + 1 >= MIN_OVERFIT_STEPS and losses[-1] <= STOP * losses[0]:
            break


def _stopped_by_labels(text: str) -> list[CheckResult]:
    data = CheckResult("data", summary=text)
    data.diagnoses.append(finding(
        "data-suspect", "error", "The batch looks wrong", text,
        [("data-labels", 1.0, text)], "data",
        checks=["Map the labels to class ids 0..C-1 (or set the model's number of classes to "
                "match the data)."]))
    return [data if name == "data" else CheckResult(name, skipped="the labels do not fit the "
                                                                  "outputs")
            for name in CHECK_TITLES]


__all__ = ["checkup"]
