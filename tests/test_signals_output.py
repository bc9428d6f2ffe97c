"""The model-output statistics (OutputStats) against a direct computation of each field."""

import math

import pytest
import torch

from gradscope.signals.output import OutputCollector
from gradscope.signals.transfer import DeviceBatch


def _reference(values, grad):
    """The fields as plain reductions: |row sum - 1| over rows, |row sum| and |entry| of the
    gradient over the whole tensor (float32 row sums, extremes rounded to float32)."""
    row_error = float((values.sum(-1, dtype=torch.float32) - 1.0).abs().amax())
    entry = float(torch.linalg.vector_norm(grad, float("inf")).float())
    row_sum = float(grad.sum(-1, dtype=torch.float32).abs().amax())
    grad_row = row_sum / entry if entry > 0 else math.nan
    return (float(values.amin().float()), float(values.amax().float()), row_error, grad_row)


def _measured(values, grad):
    leaf = values.clone().requires_grad_(True)
    collector = OutputCollector()
    collector.observe(leaf)
    leaf.backward(grad)
    batch = DeviceBatch()
    assert collector.put(batch)
    stats = collector.result(batch.fetch())
    return (stats.min, stats.max, stats.row_sum_error, stats.grad_row_sum)


def _same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ["logits", "probabilities", "zero-grad", "nan-grad",
                                  "inf-grad", "nan-output"])
def test_output_stats_match_direct_reductions(dtype, case):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(9, 6, generator=gen, dtype=torch.float64) * 3
    grad = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    if case == "probabilities":
        values = values.softmax(-1)
        grad = grad - grad.mean(-1, keepdim=True)
    elif case == "zero-grad":
        grad = torch.zeros_like(grad)
    elif case == "nan-grad":
        grad[2, 3] = math.nan
    elif case == "inf-grad":
        grad[4, 1] = -math.inf
    elif case == "nan-output":
        values[0, 0] = math.nan
    values, grad = values.to(dtype), grad.to(dtype)
    assert _same(_measured(values, grad), _reference(values, grad))


def test_rows_summing_just_above_and_below_one():
    # |row sum - 1| is largest at the smallest or the largest row sum, exactly in float32
    values = torch.full((4, 3), 1 / 3)
    values[1, 0] += 1e-6
    values[2, 1] -= 3e-6
    grad = torch.ones(4, 3)
    assert _same(_measured(values, grad), _reference(values, grad))
