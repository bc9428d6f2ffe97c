"""Check 3: dtype and range of the inputs and targets of the batch."""

from __future__ import annotations

from typing import Any

import torch

from ..records import DataStats
from ..rules.common import fmt
from .inputs import Batch
from .reference import IGNORE_INDEX, Reference
from .result import CheckResult, finding

#: Standardised features have mean 0 and std 1; beyond ten times that they are not normalised.
FEATURE_SCALE = 10.0
#: Images whose values reach past this (up to 255) look like raw 8-bit pixels.
PIXEL_MAX = 2.0
EMBEDDINGS = ("Embedding", "EmbeddingBag")
#: Smallest batch whose identical targets are reported (4 random labels of 3 classes are all
#: equal 1 time in 27; 8 of them 1 time in 2187).
MIN_CONSTANT_BATCH = 8


def labels_out_of_range(targets: torch.Tensor, classes: int) -> str | None:
    """Why class ids in `targets` do not fit `classes` classes (checked before the loss runs,
    where an out-of-range label is an error on CPU and a device assert on CUDA), or None.

    Example:
        >>> labels_out_of_range(torch.tensor([0, 3]), 3)
        'labels reach 3 but the output has 3 classes (ids 0..2)'
    """
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() == 0:
        return None
    low, high = int(valid.min()), int(valid.max())
    if high >= classes:
        return f"labels reach {high} but the output has {classes} classes (ids 0..{classes - 1})"
    if low < 0:
        return f"labels go down to {low}; class ids start at 0 (ignore_index is {IGNORE_INDEX})"
    return None


def _rows_identical(x: torch.Tensor) -> bool:
    if x.dim() == 0 or x.shape[0] < 2:
        return False
    flat = x.reshape(x.shape[0], -1)
    return bool((flat == flat[:1]).all())


def check_data(batch: Batch, stats: DataStats | None, ref: Reference | None,
               module_types: dict[str, Any]) -> CheckResult:
    """Inputs: dtype, NaN/Inf, raw pixels, unnormalised features, identical rows. Targets:
    NaN/Inf, labels outside the loss's range, the same target for the whole batch."""
    result = CheckResult("data")
    x, y = batch.input, batch.target
    has_embedding = any(t in EMBEDDINGS for t in module_types.values())
    problems: list[tuple[str, str, float, str]] = []  # (severity, cause, score, text)
    if stats is not None:
        result.data["input"] = {"dtype": stats.dtype, "shape": list(stats.shape),
                                "min": stats.min, "max": stats.max, "mean": stats.mean,
                                "std": stats.std}
        described = (f"inputs {stats.dtype} {list(stats.shape)} in [{fmt(stats.min)}, "
                     f"{fmt(stats.max)}]")
        if stats.nonfinite:
            problems.append(("error", "data-nonfinite", 3.0,
                             f"{stats.nonfinite} NaN/Inf value(s) in the inputs"))
        if not stats.is_float and not has_embedding:
            problems.append(("warning", "data-dtype", 1.5,
                             f"inputs arrive as {stats.dtype} and the model has no embedding "
                             "layer: integer values go into float layers"))
        if stats.is_float or not has_embedding:
            pixels = (len(stats.shape) >= 3 and stats.min >= 0 and PIXEL_MAX < stats.max <= 255)
            if pixels:
                problems.append(("warning", "data-scale", 1.0,
                                 f"image inputs span [{fmt(stats.min)}, {fmt(stats.max)}]: raw "
                                 "0..255 pixels; divide by 255 and normalise per channel"))
            elif abs(stats.mean) > FEATURE_SCALE or stats.std > FEATURE_SCALE:
                problems.append(("warning", "data-scale", 1.0,
                                 f"inputs have mean {fmt(stats.mean)} and std {fmt(stats.std)}: "
                                 "features are not normalised"))
    else:
        described = "inputs not seen by the model's forward"
    if x is not None and _rows_identical(x):
        problems.append(("warning", "data-duplicates", 1.0,
                         f"all {x.shape[0]} inputs of the batch are identical"))
    if y is not None:
        described += f"; targets {str(y.dtype).replace('torch.', '')} {list(y.shape)}"
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            problems.append(("error", "data-nonfinite", 3.0,
                             f"{int((~torch.isfinite(y)).sum())} NaN/Inf value(s) in the "
                             "targets"))
        elif ref is not None and ref.kind == "cross-entropy" and ref.classes:
            wrong = labels_out_of_range(y, ref.classes)
            if wrong:
                problems.append(("error", "data-labels", 3.0, wrong))
        elif (ref is not None and ref.kind == "binary-cross-entropy"
              and bool(((y < 0) | (y > 1)).any())):
                problems.append(("error", "data-labels", 3.0,
                                 f"binary targets must lie in [0, 1]; they span "
                                 f"[{fmt(float(y.min()))}, {fmt(float(y.max()))}]"))
        if y.dim() > 0 and y.shape[0] >= MIN_CONSTANT_BATCH and _rows_identical(y):
            problems.append(("warning", "data-labels", 1.0,
                             f"every target of the batch is the same ({_first_value(y)}): the "
                             "model can lower the loss with a constant output"))
    result.summary = described
    if problems:
        severity = "error" if any(p[0] == "error" for p in problems) else "warning"
        result.diagnoses.append(finding(
            "data-suspect", severity, "The batch looks wrong",
            problems[0][3], [(cause, score, text) for _, cause, score, text in problems],
            "data", evidence=result.data.get("input", {}),
            checks=[
                "Check the data pipeline for missing values and divisions by zero.",
                "Normalise features with the training set's mean and std; scale images to "
                "[0, 1] and normalise per channel.",
                "Check that inputs and labels are paired and shuffled, and that labels are "
                "class ids in range for the loss.",
            ]))
    return result


def _first_value(y: torch.Tensor) -> str:
    value = y.reshape(-1)[0].item() if y.numel() else None
    return fmt(value) if isinstance(value, float) else str(value)
