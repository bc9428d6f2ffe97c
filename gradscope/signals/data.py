"""Statistics of the input batch as the root module receives it."""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from ..records import DataStats
from .reduce import CPU_SHARED_CAST, moments, sum_and_sumsq
from .transfer import DeviceBatch, kept


class InputStat(IntEnum):
    """Columns of the input-statistics vector: [count, min, max, sum, sum of squares, NaN/Inf]."""

    COUNT = 0
    MIN = 1
    MAX = 2
    SUM = 3
    SUMSQ = 4
    NONFINITE = 5


def first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The first tensor among positional then keyword arguments (the batch, by convention).

    Example:
        >>> first_tensor((1, torch.zeros(2)), {}).shape
        torch.Size([2])
    """
    if args and isinstance(args[0], torch.Tensor):  # the common case, without pytree
        return args[0]
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _large_cpu_stats(x: torch.Tensor) -> torch.Tensor:
    """[count, min, max, sum, sum of squares, NaN/Inf count] of a large float CPU tensor.

    Blocked sums count NaN/Inf on the way; min/max of a finite batch come from one aminmax
    pass, and the cleaned copies that skip NaN/Inf are made only for a batch that holds
    some (selected by value, a host operation on CPU tensors): 3 passes instead of 8.
    """
    f64 = torch.float64
    inf = float("inf")
    total, squares, _, counted = moments(x)
    nonfinite = counted if counted is not None else (~torch.isfinite(x)).sum()
    low, high = torch.aminmax(x)
    # the whole batch as one row when it holds NaN/Inf, else no row at all
    flat = x.reshape(1, -1)
    picked = flat.index_select(0, torch.nonzero(nonfinite.reshape(1)).reshape(-1))
    clean_low = torch.cat([picked.nan_to_num(nan=inf, posinf=inf, neginf=inf).reshape(-1),
                           low.new_full((1,), inf)]).amin()
    clean_high = torch.cat([picked.nan_to_num(nan=-inf, posinf=-inf, neginf=-inf).reshape(-1),
                            high.new_full((1,), -inf)]).amax()
    clean_total, clean_squares = sum_and_sumsq(picked.nan_to_num(nan=0.0, posinf=0.0,
                                                                 neginf=0.0))
    bad = nonfinite > 0
    low, high = torch.where(bad, clean_low, low), torch.where(bad, clean_high, high)
    total = torch.where(bad, clean_total, total)
    squares = torch.where(bad, clean_squares, squares)
    return torch.stack([torch.full((), float(x.numel()), dtype=f64), low.to(f64),
                        high.to(f64), total, squares, nonfinite.to(f64)])


_constants: dict[float, torch.Tensor] = {}


def _constant(value: float) -> torch.Tensor:
    """A 0-d float64 CPU tensor of `value`, made once (the element count of a batch shape)."""
    return kept(_constants, value, lambda: torch.tensor(value, dtype=torch.float64))


class SmallStats(NamedTuple):
    """The statistics of a small finite CPU batch, kept as the kernels gave them."""

    extremes: torch.Tensor  #: [min, max] in the batch's dtype
    moments: torch.Tensor  #: [sum, L2 norm] in float64 (squared on the host, as square() would)
    numel: float


def _small_cpu_stats(x: torch.Tensor) -> SmallStats | None:
    """The statistics of a small contiguous float CPU batch that holds no NaN/Inf, in 6
    kernels instead of 16 (the same values: on a finite batch the cleaned copy is the batch
    itself); None when its sum is not finite (then the general path counts NaN/Inf).
    Whether the float64 sum is finite is read on the host without a transfer (CPU). Min
    and max are stacked apart from the float64 sums: a stack of mixed dtypes is slower.
    """
    total = x.sum(dtype=torch.float64)
    if not torch.equal(total * 0, _constant(0.0)):  # x * 0 is 0 exactly for finite x
        return None
    norm = torch.linalg.vector_norm(x, dtype=torch.float64)
    low, high = torch.aminmax(x)
    return SmallStats(torch.stack([low, high]), torch.stack([total, norm]),
                      float(x.numel()))


def _vector(stats: SmallStats) -> torch.Tensor:
    """The general path's statistics vector of `stats` (to pool it with another forward)."""
    f64 = torch.float64
    moments = stats.moments
    return torch.cat([_constant(stats.numel).reshape(1), stats.extremes.to(f64),
                      moments[:1], moments[1:].square(), _constant(0.0).reshape(1)])


class DataCollector:
    """Pools min/max/mean/std/non-finite count of each step's input batch on the device."""

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None
        self._small: SmallStats | None = None  # the step's only batch, when small and finite
        self._meta: tuple[str, tuple[int, ...], bool] | None = None

    def observe(self, batch_input: torch.Tensor) -> None:
        x = batch_input.detach()  # nothing below records a graph: no no_grad() needed
        if x.numel() == 0 or x.is_complex():
            return
        is_float = x.is_floating_point()
        f64 = torch.float64
        if (x.device.type == "cpu" and x.numel() >= CPU_SHARED_CAST
                and x.dtype in (torch.float32, f64)):
            self._add(x, _large_cpu_stats(x), is_float)
            return
        if is_float and x.device.type == "cpu" and x.is_contiguous():
            small = _small_cpu_stats(x)
            if small is not None:
                if self._meta is None:  # the first forward of the step: kept as it is
                    self._small = small
                    self._meta = _meta(x, is_float)
                else:
                    self._add(x, _vector(small), is_float)
                return
        if is_float:  # min/max are exact in the input's dtype; only the sums need float64
            inf = float("inf")
            finite = torch.isfinite(x)
            nonfinite = x.numel() - torch.count_nonzero(finite)
            clean = torch.where(finite, x, 0.0)
            low = torch.where(finite, x, inf).amin()
            high = torch.where(finite, x, -inf).amax()
        else:  # integer or bool: every value is finite
            clean = x.to(f64)
            nonfinite = torch.zeros((), dtype=torch.int64, device=x.device)
            low, high = clean.amin(), clean.amax()
        total, squares = sum_and_sumsq(clean)
        vector = torch.stack([
            torch.full((), float(x.numel()), dtype=f64, device=x.device),
            low.to(f64), high.to(f64), total, squares, nonfinite.to(f64),
        ])
        self._add(x, vector, is_float)

    def _add(self, x: torch.Tensor, vector: torch.Tensor, is_float: bool) -> None:
        if self._small is not None:  # pooled with a later forward: on the device
            self._acc, self._small = _vector(self._small), None
        if self._acc is None:
            self._acc = vector
            self._meta = _meta(x, is_float)
        else:
            acc = self._acc
            self._acc = torch.stack([
                acc[InputStat.COUNT] + vector[InputStat.COUNT],
                torch.minimum(acc[InputStat.MIN], vector[InputStat.MIN]),
                torch.maximum(acc[InputStat.MAX], vector[InputStat.MAX]),
                acc[InputStat.SUM] + vector[InputStat.SUM],
                acc[InputStat.SUMSQ] + vector[InputStat.SUMSQ],
                acc[InputStat.NONFINITE] + vector[InputStat.NONFINITE],
            ])

    def put(self, batch: DeviceBatch) -> bool:
        if self._small is not None:
            batch.put("data:extremes", self._small.extremes)
            batch.put("data:moments", self._small.moments)
            return True
        if self._acc is None:
            return False
        batch.put("data", self._acc)
        return True

    def result(self, host: dict[str, np.ndarray]) -> DataStats | None:
        # Python floats: the same float64 arithmetic as numpy scalars, without their overhead
        small, meta = self._small, self._meta
        self.reset()
        if meta is None:
            return None
        if small is not None:
            if "data:extremes" not in host or "data:moments" not in host:
                return None
            low, high = host["data:extremes"].tolist()
            total, norm = host["data:moments"].tolist()
            count, squares, nonfinite = small.numel, norm * norm, 0.0  # as square(): x * x
        elif "data" in host:
            count, low, high, total, squares, nonfinite = host["data"].tolist()
        else:
            return None
        finite_count = max(count - nonfinite, 1.0)
        mean = total / finite_count
        var = max(squares / finite_count - mean * mean, 0.0)
        dtype, shape, is_float = meta
        return DataStats(
            dtype=dtype, shape=shape, min=low, max=high, mean=mean, std=math.sqrt(var),
            nonfinite=int(nonfinite), is_float=is_float,
        )

    def reset(self) -> None:
        self._acc = None
        self._small = None
        self._meta = None


def _meta(x: torch.Tensor, is_float: bool) -> tuple[str, tuple[int, ...], bool]:
    """(dtype name, shape, is float) of a batch: what DataStats reports of the first one."""
    return str(x.dtype).replace("torch.", ""), tuple(x.shape), is_float
