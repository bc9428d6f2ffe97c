"""Whole-tensor reductions shared by the signal collectors, chosen for few and fast kernels."""

from __future__ import annotations

import torch

#: From this many elements on, CPU sums share one float64 copy (faster than two casts).
CPU_SHARED_CAST = 32768


def sum_and_sumsq(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squares of all elements, accumulated in float64 (0-d tensors).

    Example:
        >>> [float(v) for v in sum_and_sumsq(torch.tensor([1.0, -2.0, 3.0]))]
        [2.0, 14.0]
    """
    if x.device.type == "cpu" and x.numel() >= CPU_SHARED_CAST:
        flat = x.to(torch.float64).reshape(-1)
        return flat.sum(), torch.dot(flat, flat)
    return (x.sum(dtype=torch.float64),
            torch.linalg.vector_norm(x, dtype=torch.float64).square())


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """Number of NaN/Inf elements of a floating-point tensor (0-d, int64).

    `x - x` is exactly 0 for every finite value and NaN otherwise; counting its non-zeros is
    much faster than summing `isfinite()` on CPU.

    Example:
        >>> int(nonfinite_count(torch.tensor([1.0, float("nan"), float("inf"), 0.0])))
        2
    """
    return torch.count_nonzero(x - x)


__all__ = ["CPU_SHARED_CAST", "nonfinite_count", "sum_and_sumsq"]
