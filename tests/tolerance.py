"""Tolerances that follow from floating-point arithmetic, for comparing a statistic computed in
float32 (or bfloat16/float16) against a float64 reference.

The bounds hold whatever order a kernel sums in, so they hold for every ATen CPU kernel
(`ATEN_CPU_CAPABILITY=default|avx2|avx512`) and for CUDA reductions alike:

- a sum of n values computed in a precision with unit round-off u, in any order, is off from
  the exact sum by at most gamma(n) * sum|x|, where gamma(n) = n u / (1 - n u) (Higham,
  "Accuracy and Stability of Numerical Algorithms", 2nd ed., §4.2: every summation order is
  covered, since each value passes through at most n - 1 additions);
- sqrt halves a relative error and adds one rounding; a division adds one rounding.

The bounds are worst cases: loose against the typical error (~sqrt(n) u), yet orders of
magnitude tighter than any real mistake (a wrong formula, a missed element, a wrong
denominator), so a test using them still fails when the feature breaks.

Example:
    >>> gamma(1, torch.float32) > 2 ** -24
    True
"""

from __future__ import annotations

import numpy as np
import torch

#: unit round-off per dtype (half the machine epsilon)
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n for `dtype`: the relative error bound of n roundings in a row."""
    nu = max(int(n), 1) * UNIT_ROUNDOFF[dtype]
    if nu >= 1:
        raise ValueError(f"gamma is undefined for n={n} in {dtype}")
    return nu / (1 - nu)


def _as_f64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().double().reshape(-1).cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def sum_tol(values, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of a sum of `values` computed in `dtype`, in any order."""
    x = _as_f64(values)
    return gamma(len(x) + 1, dtype) * float(np.abs(x).sum())


def mean_tol(values, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of the mean of `values` computed in `dtype` (sum, then divide)."""
    x = _as_f64(values)
    return gamma(len(x) + 2, dtype) * float(np.abs(x).mean())


def norm_rtol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative error bound of an L2 norm of n values computed in `dtype` (squares, a sum of
    n non-negative terms, a square root), in any order or blocking."""
    return gamma(n + 3, dtype)


def var_tol(values, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of the population variance of `values` computed in `dtype` from
    sums of shifted values (any shift taken from the values themselves): the sums of the
    shifted values and of their squares each err by gamma * their magnitudes, and
    |x - shift| <= 2 max|x|."""
    x = _as_f64(values)
    big = 2.0 * float(np.abs(x).max()) if len(x) else 0.0
    return gamma(len(x) + 4, dtype) * 3.0 * big * big


def std_tol(values, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of the population standard deviation: |sqrt(a) - sqrt(b)| is at
    most sqrt(|a - b|) and at most |a - b| / sqrt(b)."""
    x = _as_f64(values)
    dvar = var_tol(x, dtype)
    std = float(x.std()) if len(x) else 0.0
    bound = np.sqrt(dvar)
    if std > 0:
        bound = min(bound, dvar / std)
    return float(bound) + UNIT_ROUNDOFF[dtype] * std


def near_threshold_frac(values, thresholds, dtype: torch.dtype = torch.float32) -> float:
    """Fraction of `values` within a few roundings of any of `thresholds`: a count of values
    past a threshold computed in `dtype` can differ from the float64 count by these."""
    x = _as_f64(values)
    if not len(x):
        return 0.0
    slack = 8 * UNIT_ROUNDOFF[dtype] * max(float(np.abs(x).max()), 1.0)
    near = np.zeros(len(x), dtype=bool)
    for t in thresholds:
        near |= np.abs(x - t) <= slack
    return float(near.mean())


def model_norm_rtol(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """norm_rtol of the model's largest parameter: bounds every per-parameter norm's error."""
    return norm_rtol(max((p.numel() for p in model.parameters()), default=1), dtype)
