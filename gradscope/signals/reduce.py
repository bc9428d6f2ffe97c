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


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]:
    """Sum, L2 norm or sum of squares, and (when it comes for free) the NaN/Inf count.

    Returns `(sum, value, squared, nonfinite)`: `value` is the sum of squares when `squared`
    is True, else the L2 norm (square it in float64 on the host to get the same sum of
    squares, one kernel less than here); `nonfinite` is None when not computed. Large
    float32/float64 CPU tensors are summed in blocks of BLOCK elements in their own dtype
    (vectorised, no copy) and the block results in float64: a relative error near 1e-8
    instead of float64's 1e-16, at a tenth of the cost of casting every element.

    Example:
        >>> total, norm, squared, _ = moments(torch.tensor([3.0, 4.0]))
        >>> float(total), float(norm), squared
        (7.0, 5.0, False)
    """
    if x.device.type == "cpu" and x.numel() >= CPU_SHARED_CAST:
        if x.dtype in (torch.float32, torch.float64):
            return _blocked_moments(x)
        flat = x.to(torch.float64).reshape(-1)
        return flat.sum(), torch.dot(flat, flat), True, None
    return (x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64),
            False, None)


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of `x` as [n, BLOCK] rows (a view when `x` is contiguous) and a tail."""
    flat = x.reshape(-1)
    main = flat.numel() - flat.numel() % BLOCK
    return flat[:main].view(-1, BLOCK), flat[main:]


def _blocked_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]:
    f64 = torch.float64
    rows, tail = _blocks(x)
    row_sums = rows.sum(1)
    total = row_sums.to(f64).sum()
    squares = torch.linalg.vector_norm(rows, dim=1).to(f64).square().sum()
    if tail.numel():
        total = total + tail.sum(dtype=f64)
        squares = squares + torch.linalg.vector_norm(tail, dtype=f64).square()
    return total, squares, True, _nonfinite_in_rows(rows, row_sums, tail)


def _nonfinite_in_rows(rows: torch.Tensor, row_sums: torch.Tensor,
                       tail: torch.Tensor) -> torch.Tensor:
    """Exact NaN/Inf count of CPU rows, counting only rows whose sum is not finite.

    A NaN or an infinity in a row makes its sum NaN or infinite, so the other rows hold
    none (an overflowing sum of finite values only adds a row that then counts 0). Selecting
    rows by value is a host operation on CPU tensors, not a device transfer.
    """
    bad = torch.nonzero(~torch.isfinite(row_sums)).reshape(-1)
    picked = rows.index_select(0, bad)
    count = torch.count_nonzero(picked - picked)
    if tail.numel():
        count = count + torch.count_nonzero(tail - tail)
    return count


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """Number of NaN/Inf elements of a floating-point tensor (0-d, int64).

    `x - x` is exactly 0 for every finite value and NaN otherwise; counting its non-zeros is
    much faster than summing `isfinite()`. Large float32/float64 CPU tensors first sum
    blocks and count only in blocks whose sum is not finite.

    Example:
        >>> int(nonfinite_count(torch.tensor([1.0, float("nan"), float("inf"), 0.0])))
        2
    """
    if (x.device.type == "cpu" and x.numel() >= CPU_SHARED_CAST
            and x.dtype in (torch.float32, torch.float64)):
        rows, tail = _blocks(x)
        return _nonfinite_in_rows(rows, rows.sum(1), tail)
    return torch.count_nonzero(x - x)


__all__ = ["BLOCK", "CPU_SHARED_CAST", "moments", "nonfinite_count", "sum_and_sumsq"]
