"""PyTorch Lightning: a Callback that watches the LightningModule for the whole fit.

Example:
    >>> import lightning as L
    >>> from gradscope.integrations.lightning import GradscopeCallback
    >>> callback = GradscopeCallback(every=10)
    >>> trainer = L.Trainer(max_steps=100, callbacks=[callback])  # doctest: +SKIP
    >>> trainer.fit(model, loader)                                # doctest: +SKIP
    >>> callback.scope.diagnose()                                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import (  # type: ignore[no-redef,assignment,unused-ignore]
            Callback,
        )
    except ImportError as err:
        raise ImportError(
            "gradscope.integrations.lightning needs PyTorch Lightning; install it with "
            "`pip install 'torch-gradscope[lightning]'` (or `pip install lightning`)."
        ) from err

from ..checklist import Checkup
from ..guard import Guard
from ..scope import Scope, watch
from ._common import StepLoss, guarded, headline, torch_optimizer


class GradscopeCallback(Callback):
    """Watch a LightningModule during `trainer.fit` and explain what goes wrong.

    - at fit start: `gradscope.watch(pl_module, trainer.optimizers, **watch_options)`;
    - before each optimizer step (after backward, gradient accumulation and AMP unscale, before
      gradient clipping): reads the gradients of that optimizer;
    - after each batch on which an optimizer stepped: `scope.step(loss)`, with the loss of all
      the micro-batches of that step (so `accumulate_grad_batches` gives one gradscope step per
      optimizer step), and logs `gradscope/grad_norm_total`, `gradscope/update_ratio_max`,
      `gradscope/warnings` and `gradscope/errors` through `pl_module.log` on recorded steps;
    - at fit end: prints the report (rank 0 only; `report=False` turns it off);
    - at teardown: removes every hook. `callback.scope` stays readable: `diagnose()`,
      `report()`, `plot()`.
    - `checkup=True` (or a dict of `gradscope.checkup` options, e.g. `{"quick": True}`): on the
      first training batch, before any update, runs `gradscope.checkup()` on copies of the
      module, its loss from `training_step`, and prints its report (rank 0); the result is
      `callback.checkup`.

    Example:
        >>> cb = GradscopeCallback(every=5, report=False)
        >>> cb.scope is None
        True
    """

    def __init__(self, report: bool = True, log_metrics: bool = True,
                 checkup: bool | dict[str, Any] = False, **watch_options: Any):
        super().__init__()
        self.report = report
        self.checkup_setting = checkup
        self.checkup: Checkup | None = None
        self._checkup_pending = False
        self.log_metrics = log_metrics
        self.watch_options = watch_options
        self.scope: Scope | None = None
        self._loss = StepLoss()
        self._stepped = False
        self._once = Guard("callback step")

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.scope is not None and not self.scope.closed:
            self.scope.close()
        optimizers = [o for o in (torch_optimizer(o) for o in trainer.optimizers) if o is not None]
        # bad options raise here, before training starts, with gradscope's own message
        self.scope = watch(pl_module, optimizers or None, **self.watch_options)
        self._loss.clear()
        self._stepped = False
        self._checkup_pending = bool(self.checkup_setting)

    @guarded("train-batch-start")
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        self._stepped = False
        if self._checkup_pending:
            self._checkup_pending = False  # the first training batch, before any update
            self._once.call("checkup", self._run_checkup, trainer, pl_module, batch)

    def _run_checkup(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        from ..checklist.frameworks import lightning_checkup

        optimizers = [o for o in (torch_optimizer(o) for o in trainer.optimizers) if o is not None]
        self.checkup = lightning_checkup(pl_module, batch, optimizers[0] if optimizers else None,
                                         self.checkup_setting)
        if self.report and getattr(trainer, "is_global_zero", True):
            self.checkup.report()

    @guarded("loss")
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        # In automatic optimization the loss arrives divided by accumulate_grad_batches, so
        # the sum over the micro-batches of one step is their mean loss.
        self._loss.add(loss)

    @guarded("gradients")
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepped = True
        if self.scope is not None and not self.scope.closed:
            self.scope.read_gradients(torch_optimizer(optimizer))

    @guarded("step")
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped or self.scope is None or self.scope.closed:
            return
        self._stepped = False
        loss = self._loss.value("sum")
        if not getattr(pl_module, "automatic_optimization", True):
            # manual optimization: the loss training_step returned, if any, not the sum of
            # every backward of the batch (e.g. a GAN's two losses)
            loss = _returned_loss(outputs, loss)
        recorded = self.scope.history.total_recorded
        self.scope.step(loss)
        if self.log_metrics and self.scope.history.total_recorded > recorded:
            self._log(trainer, pl_module)

    def _log(self, trainer: Any, pl_module: Any) -> None:
        record = self.scope.history.last if self.scope is not None else None
        if self.scope is None or record is None:
            return
        to_logger = bool(getattr(trainer, "loggers", None))
        # counts as of the rules' last run: logging runs no rule (see RuleCadence)
        for name, value in headline(record, self.scope.diagnoser.diagnoses()).items():
            self._once.call("logging", pl_module.log, name, value, on_step=True,
                           on_epoch=False, prog_bar=False, logger=to_logger)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.scope is None:
            return
        self._once.call("close", self.scope.close)
        if self.report and getattr(trainer, "is_global_zero", True):
            self._once.call("report", self.scope.report)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.scope is not None and not self.scope.closed:
            self._once.call("close", self.scope.close)


def _returned_loss(outputs: Any, default: Any) -> Any:
    value = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return value.detach().reshape(())
    return default


__all__ = ["GradscopeCallback"]
