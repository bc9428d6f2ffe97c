"""Whole-tensor reductions shared by the signal collectors, chosen for few and fast kernels."""

from __future__ import annotations

import torch

#: From this many elements on, CPU tensors take the faster paths below.
CPU_SHARED_CAST = 32768
#: Block length of the blocked CPU sums (each block is summed exactly enough in float32).
BLOCK = 1024


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


def sum_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Sum and, in one fewer kernel than `sum_and_sumsq`, the L2 norm or the sum of squares.

    Returns `(sum, value, squared)`: `value` is the sum of squares when `squared` is True,
    else the L2 norm (square it in float64 on the host to get the same sum of squares).
    Large float32/float64 CPU tensors are summed in blocks of BLOCK elements in their own
    dtype (vectorised, no copy) and the block results in float64: a relative error near
    1e-8 instead of float64's 1e-16, at a tenth of the cost of casting every element.

    Example:
        >>> total, norm, squared = sum_and_norm(torch.tensor([3.0, 4.0]))
        >>> float(total), float(norm), squared
        (7.0, 5.0, False)
    """
    if x.device.type == "cpu" and x.numel() >= CPU_SHARED_CAST:
        if x.dtype in (torch.float32, torch.float64):
            return (*_blocked_sums(x), True)
        flat = x.to(torch.float64).reshape(-1)
        return flat.sum(), torch.dot(flat, flat), True
    return (x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64),
            False)


def _blocked_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f64 = torch.float64
    flat = x.reshape(-1)
    main = flat.numel() - flat.numel() % BLOCK
    rows = flat[:main].view(-1, BLOCK)
    total = rows.sum(1).to(f64).sum()
    squares = torch.linalg.vector_norm(rows, dim=1).to(f64).square().sum()
    if main < flat.numel():
        tail = flat[main:]
        total = total + tail.sum(dtype=f64)
        squares = squares + torch.linalg.vector_norm(tail, dtype=f64).square()
    return total, squares


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """Number of NaN/Inf elements of a floating-point tensor (0-d, int64).

    `x - x` is exactly 0 for every finite value and NaN otherwise; counting its non-zeros is
    much faster than summing `isfinite()` on CPU.

    Example:
        >>> int(nonfinite_count(torch.tensor([1.0, float("nan"), float("inf"), 0.0])))
        2
    """
    return torch.count_nonzero(x - x)


__all__ = ["BLOCK", "CPU_SHARED_CAST", "nonfinite_count", "sum_and_norm", "sum_and_sumsq"]
