"""The staged-row reduction against a plain reference of the same arithmetic, bit for bit."""

import pytest
import torch

from gradscope.signals import staging
from gradscope.signals.staging import SATURATION_MARGIN, STATS, RowStat


def _reference(rows: torch.Tensor, bounds: list[float]) -> torch.Tensor:
    """Each statistic from its own out-of-place kernels, on an untouched copy of the rows."""
    dtype = rows.dtype
    total = rows.sum(1)
    centred = rows - rows[:, :1]
    norm = torch.linalg.vector_norm(centred, dim=1)
    nonzero = torch.count_nonzero(rows, dim=1).to(dtype)
    nonfinite = (~torch.isfinite(rows)).sum(1).to(dtype)
    saturated = torch.zeros_like(total)
    for i in range(rows.shape[0]):
        centre, scale = bounds[2 * i], bounds[2 * i + 1]
        if scale:
            x = ((rows[i] - torch.tensor(centre, dtype=dtype)) * torch.tensor(scale, dtype=dtype)
                 ).abs()
            saturated[i] = (x >= 1.0 - 2.0 * SATURATION_MARGIN).sum().to(dtype)
    return torch.stack([total, norm, nonzero, nonfinite, saturated, centred.sum(1)], dim=1)


def _row_stats(rows, bounds, bounded):
    """[rows, STATS]: the staged statistics, one row per staged row."""
    return staging._column_stats(rows, bounds, bounded).view(STATS, -1).t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 7, 2048])
@pytest.mark.parametrize("spacing", ["even", "uneven"])
def test_row_stats_match_the_reference_bit_for_bit(dtype, width, spacing):
    gen = torch.Generator().manual_seed(width)
    rows = torch.randn(9, width, generator=gen, dtype=dtype) * 3 + 5
    rows[1] = rows[1].tanh()  # bounded rows, some values exactly at the saturation edge
    rows[3] = torch.sigmoid(rows[3] * 4)
    rows[3, 0] = 0.99
    rows[1, -1] = -0.98
    rows[2, : width // 2] = 0.0
    rows[4, 0] = float("nan")
    rows[5, -1] = float("inf")
    rows[6] = -0.0
    bounds = [0.0, 0.0] * 9
    bounds[2:4] = [0.0, 1.0]  # tanh: centre 0, 1/half-range 1
    bounds[6:8] = [0.5, 2.0]  # sigmoid
    if spacing == "uneven":  # bounded rows 1, 3, 8: read by index, not through a slice
        rows[8] = rows[8].tanh()
        rows[8, 0] = float("nan")
        bounds[16:18] = [0.0, 1.0]
    bounded = [i for i in range(9) if bounds[2 * i + 1]]
    assert (staging.even_slice(bounded) is None) == (spacing == "uneven")
    expected = _reference(rows.clone(), bounds)
    got = _row_stats(rows.clone(), bounds, True)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert got[1, RowStat.SATURATED] >= 1 and got[4, RowStat.NONFINITE] == 1


def test_row_stats_of_unbounded_rows_count_no_saturation():
    rows = torch.randn(3, 16)
    got = _row_stats(rows.clone(), [0.0, 0.0] * 3, False)
    torch.testing.assert_close(got, _reference(rows, [0.0, 0.0] * 3), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_staged_rows_hold_each_value_as_a_flat_copy_would(dtype):
    # whole tensors of several shapes, a transposed (non-contiguous) one and special values:
    # each row holds the tensor's values in row-major order, converted as `.to()` does
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 6, generator=gen).to(dtype) for _ in range(3)]
    tensors[1][0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0]).to(dtype)
    tensors.append(torch.randn(6, 4, generator=gen).to(dtype).t())
    tensors.append(torch.randn(24, generator=gen).to(dtype))
    stage = staging.RowStage()
    handles = [stage.add(t) for t in tensors]
    group = stage._list[0]
    staged = torch.float64 if dtype == torch.float64 else torch.float32
    for handle, t in zip(handles, tensors):
        row = group.chunk[stage._row_of[handle]]
        expected = t.reshape(-1).to(staged)
        assert torch.equal(row.view(torch.uint8), expected.view(torch.uint8))  # bit for bit
