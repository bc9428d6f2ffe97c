"""Copies of module outputs (whole when small, sampled when large) reduced together per step.

A forward hook that reduces its output on the spot launches a handful of kernels per call;
on a model of many small modules the launches, not the arithmetic, are the cost. Here a
hook launches one copy into a row of a staging buffer, and each buffer (all rows of one
device, dtype and length) is reduced once per recorded step: a few kernels in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch

from .transfer import DeviceBatch, on_device

#: Outputs with more elements than this are statistically sampled down to this many...
SAMPLE = 16384
#: ...as SAMPLE // PIECE runs of PIECE consecutive elements spread over the tensor (a copy
#: of a few whole cache lines each, instead of one scattered element per cache line).
PIECE = 128


class RowStat(IntEnum):
    """Columns of a staged row's statistics (one row per module output and call).

    SUM is the sum of the row's values; NORM and CENTRED are the L2 norm and the sum of the
    values minus the row's first value, so that the variance keeps its precision when the
    values sit far from zero.
    """

    SUM = 0
    NORM = 1
    NONZERO = 2
    NONFINITE = 3
    SATURATED = 4
    CENTRED = 5


STATS = len(RowStat)
#: Values one group holds at most before its full rows are reduced (bounds the memory of a
#: module called many times per step, e.g. an unrolled recurrent cell).
GROUP_VALUES = 1 << 22
#: Fraction of a bounded activation's range, at either end, counted as saturated.
SATURATION_MARGIN = 0.01

_indices: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def spread_indices(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """`size` distinct positions spread evenly over `numel` (sorted), made on `device`.

    Positions follow the golden-ratio sequence frac(i * 0.618...) * numel: as even as a
    regular stride over the whole tensor, without a stride's habit of landing on the same
    columns of every row (a stride of 8 on rows of 1024 would see one unit in eight). With
    fewer than 2 * size positions to choose from, where that sequence would repeat some, a
    regular stride is used.

    Example:
        >>> spread_indices(10, 4, torch.device("cpu")).tolist()
        [0, 2, 6, 8]
    """
    key = (numel, size, device)
    index = _indices.get(key)
    if index is None:
        if len(_indices) > 256:
            _indices.clear()
        steps = torch.arange(size, device=device, dtype=torch.float64)
        if numel < 2 * size:
            positions = (steps * (numel / size)).long()
        else:
            golden = (steps * 0.6180339887498949) % 1.0
            positions = (golden * numel).long().clamp_(max=numel - 1).sort().values
        index = _indices[key] = positions
    return index


@dataclass(slots=True)
class _Group:
    """Rows of one device, dtype and length: chunks of [rows, width] buffers."""

    device: torch.device
    dtype: torch.dtype
    width: int
    key: tuple[int, torch.dtype, int]
    chunk: torch.Tensor | None = None  # [rows, width] buffer being filled
    capacity: int = 0  # rows of the buffer
    shaped: dict[torch.Size, torch.Tensor] = field(default_factory=dict)  # views of it
    used: int = 0  # rows written in the buffer
    rows: int = 0  # rows written in all
    done: list[torch.Tensor] = field(default_factory=list)  # flat statistics of rows reduced early
    # centre and 1/half-range of each row's bounds, flat (floats: no object per row)
    bounds: list[float] = field(default_factory=list)
    bounded: bool = False


_FLOAT64 = torch.float64
_FLOAT32 = torch.float32
_NO_BOUNDS = (0.0, 0.0)


class RowStage:
    """Staging buffers for the values measured in one step.

    Example:
        >>> stage = RowStage()
        >>> handle = stage.add(torch.tensor([0.0, 3.0, -4.0]))
        >>> from gradscope.signals.transfer import DeviceBatch
        >>> batch = DeviceBatch(); fields = stage.put(batch, "stage")
        >>> stats = stage.results(batch.fetch())
        >>> stats[handle].tolist()  # see STATS: sum, ..., sum of x - x[0]
        [-1.0, 5.0, 2.0, 0.0, 0.0, -1.0]
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, torch.dtype, int], int] = {}
        self._list: list[_Group] = []
        self._group_of: list[int] = []  # by handle: its group and its row there
        self._row_of: list[int] = []
        self._capacity: dict[tuple[int, torch.dtype, int], int] = {}
        self._fields: list[str] = []

    def __len__(self) -> int:
        return sum(g.rows for g in self._list)

    def add(self, values: torch.Tensor, bounds: tuple[float, float] | None = None) -> int:
        """Copy the tensor `values` (any shape, read as flat) into a row, or a sample of
        SAMPLE of its elements when it has more; return the row's handle (an int).

        Floating dtypes other than float64 are staged as float32 (the copy converts).
        `bounds` (low, high) of a saturating function: its row also counts saturated values.
        """
        dtype = _FLOAT64 if values.dtype is _FLOAT64 else _FLOAT32
        numel = values.numel()
        # an int is cheaper than .device
        key = (values.get_device(), dtype, numel if numel < SAMPLE else SAMPLE)
        index_of_group = self._groups.get(key)
        if index_of_group is None:
            index_of_group = self._groups[key] = len(self._list)
            self._list.append(_Group(values.device, dtype, key[2], key))
        group = self._list[index_of_group]
        chunk = group.chunk
        if chunk is None or group.used == group.capacity:
            chunk = self._make_room(group)
        if numel > SAMPLE:
            # a view per call, dropped at once (views made ahead would be objects that
            # live through the step, each one more for the garbage collector to walk)
            row = chunk.select(0, group.used)
            flat = values.reshape(-1)
            pieces = numel // PIECE
            where = spread_indices(pieces, SAMPLE // PIECE, values.device)
            runs = flat[: pieces * PIECE].view(pieces, PIECE)
            if values.dtype == dtype:  # gathered straight into the row
                torch.index_select(runs, 0, where, out=row.view(-1, PIECE))
            else:
                row.view(-1, PIECE).copy_(runs.index_select(0, where))
        elif numel:
            # copied whole through a view of the buffer in the tensor's shape (one per
            # shape and buffer): no flattened copy of the tensor and no row view to shape;
            # an item assignment is select + copy_ inside one call, without a Python object
            # for the row's view
            shape = values.shape
            shaped = group.shaped.get(shape)
            if shaped is None:
                shaped = group.shaped[shape] = chunk.view(group.capacity, *shape)
            shaped[group.used] = values
        group.used += 1
        group.rows += 1
        if bounds is None:
            group.bounds += _NO_BOUNDS
        else:
            low, high = bounds
            group.bounds += ((low + high) / 2, 2.0 / (high - low))
            group.bounded = True
        self._group_of.append(index_of_group)
        row_of = self._row_of
        row_of.append(group.rows - 1)
        return len(row_of) - 1

    def _make_room(self, group: _Group) -> torch.Tensor:
        """A buffer with a free row for `group`: a new one, a bigger copy of a full one, or
        a full one whose rows were reduced (at its cap)."""
        if group.chunk is None:
            rows = max(self._capacity.get(group.key, 0), 4)
            group.chunk = torch.empty(min(rows, max(GROUP_VALUES // group.width, 1)),
                                      group.width, dtype=group.dtype, device=group.device)
        elif group.chunk.numel() * 2 <= GROUP_VALUES:  # grow: copy the rows over
            bigger = group.chunk.new_empty(group.chunk.shape[0] * 2, group.width)
            bigger[: group.used].copy_(group.chunk)
            group.chunk = bigger
        else:  # full at its cap: reduce its rows now, then fill it again
            first = group.rows - group.used
            group.done.append(_column_stats(group.chunk, group.bounds[2 * first:],
                                            group.bounded))
            group.used = 0
        group.capacity = group.chunk.shape[0]
        group.shaped = {}
        return group.chunk

    @torch.no_grad()
    def put(self, batch: DeviceBatch, prefix: str) -> list[str]:
        """Reduce every buffer and queue a [rows, STATS] matrix per buffer in `batch`."""
        self._fields = []
        for index, group in enumerate(self._list):
            first = group.rows - group.used
            if group.chunk is None:
                raise ValueError(f"staging group {index} has no buffer to reduce")
            stats = _column_stats(group.chunk[: group.used], group.bounds[2 * first:],
                                  group.bounded)
            if group.done:  # rows reduced early come first: concatenated statistic by statistic
                stats = torch.cat([p.view(STATS, -1) for p in (*group.done, stats)], 1).view(-1)
            name = f"{prefix}:{index}"
            batch.put(name, stats)
            self._fields.append(name)
            self._capacity[group.key] = group.rows
        self.drop()
        return self._fields

    def drop(self) -> None:
        """Let go of every staging buffer (nothing staged outlives the step)."""
        for group in self._list:
            group.chunk = None
            group.shaped = {}
            group.done = []

    def results(self, host: dict[str, np.ndarray]) -> StagedStats:
        """The fetched statistics of every row, indexable by a handle: `out[handle]`."""
        # each group's statistics arrive statistic by statistic: [STATS, rows], read as rows
        return StagedStats([host[name].reshape(STATS, -1).T for name in self._fields],
                           self._group_of, self._row_of)

    def layout(self) -> tuple[int, ...]:
        """The group of each handle, in handle order: with the same layout two steps place
        every handle at the same position (see `positions`)."""
        return tuple(self._group_of)

    def positions(self, handles: Sequence[int]) -> np.ndarray:
        """Where the rows of `handles` sit along the second axis of `columns(host)`.

        Example:
            >>> stage = RowStage(); a = stage.add(torch.ones(2)); b = stage.add(torch.ones(3))
            >>> stage.positions([b, a]).tolist()
            [1, 0]
        """
        offsets = np.cumsum([0] + [g.rows for g in self._list[:-1]], dtype=np.int64)
        group_of = np.asarray(self._group_of, dtype=np.int64)
        where = offsets[group_of] + np.asarray(self._row_of, dtype=np.int64) if len(
            group_of) else np.zeros(0, dtype=np.int64)
        return where[np.asarray(handles, dtype=np.int64)]

    def columns(self, host: dict[str, np.ndarray]) -> np.ndarray:
        """The fetched statistics of every row as one [STATS, rows] array (groups one after
        another, statistic by statistic): `columns(host)[stat, positions(handles)]`."""
        arrays = [host[name].reshape(STATS, -1) for name in self._fields]
        if len(arrays) == 1:
            return arrays[0]
        return np.concatenate(arrays, axis=1) if arrays else np.zeros((STATS, 0))

    def reset(self) -> None:
        self.drop()
        self._groups.clear()
        self._list.clear()
        self._group_of = []
        self._row_of = []
        self._fields = []


class StagedStats:
    """Per-group [rows, STATS] arrays, looked up by handle."""

    def __init__(self, arrays: list[np.ndarray], group_of: list[int], row_of: list[int]
                 ) -> None:
        self.arrays = arrays
        offsets = np.cumsum([0] + [len(a) for a in arrays[:-1]], dtype=np.int64)
        self._position = offsets[np.asarray(group_of, dtype=np.int64)] + np.asarray(
            row_of, dtype=np.int64) if group_of else np.zeros(0, dtype=np.int64)
        self._flat = (np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
                      ) if arrays else np.zeros((0, STATS))

    def __getitem__(self, handle: int) -> np.ndarray:
        return self._flat[self._position[handle]]

    def gather(self, handles: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the given handles as one [len(handles), 5] array."""
        return self._flat[self._position[np.asarray(handles, dtype=np.int64)]]


_bounds: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice | None]] = {}


def _bound_tensors(bounds: tuple[float, ...], dtype: torch.dtype, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice | None]:
    """Rows with bounds, and their centres and 1/half-ranges as [n, 1] columns, as tensors
    (cached: the same modules stage the same rows each step); and the same rows as a slice
    when they are evenly spaced (e.g. every other module of a stack), else None."""
    key = (bounds, dtype, device)
    found = _bounds.get(key)
    if found is None:
        if len(_bounds) > 64:
            _bounds.clear()
        bounded = [i for i in range(len(bounds) // 2) if bounds[2 * i + 1]]
        found = _bounds[key] = (
            on_device(bounded, device),
            on_device([bounds[2 * i : 2 * i + 1] for i in bounded], device, dtype),
            on_device([bounds[2 * i + 1 : 2 * i + 2] for i in bounded], device, dtype),
            even_slice(bounded))
    return found


def even_slice(indices: Sequence[int]) -> slice | None:
    """A slice that selects exactly `indices` (increasing, evenly spaced), else None.

    Example:
        >>> even_slice([1, 3, 5]), even_slice([4]), even_slice([0, 1, 3])
        (slice(1, 6, 2), slice(4, 5, 1), None)
    """
    if not indices:
        return None
    first = indices[0]
    step = indices[1] - first if len(indices) > 1 else 1
    if step < 1 or list(indices) != list(range(first, first + step * len(indices), step)):
        return None
    return slice(first, indices[-1] + 1, step)


def _count_rows(mask: torch.Tensor) -> torch.Tensor:
    """True values per row of a boolean matrix (a byte sum: faster than count_nonzero).

    Rows hold at most SAMPLE values, so an int16 sum is exact; on CPU it is ~3x faster
    than an int32 one (the byte-to-int32 widening reduction is not vectorised).
    """
    dtype = torch.int16 if mask.shape[-1] <= 32767 else torch.int32
    return mask.view(torch.uint8).sum(1, dtype=dtype)


def _column_stats(rows: torch.Tensor, bounds: list[float], bounded: bool) -> torch.Tensor:
    """Statistics of each row, in the rows' dtype (counts of up to SAMPLE values are exact
    in float32), flat as [STATS, rows]: one statistic after another (each written in place,
    no stack): sum, L2 norm of the values minus the row's first value, non-zero count,
    NaN/Inf count, saturated count, and the sum of the values minus the row's first value.
    `bounds` holds a (centre, 1/half-range) pair per row, zeros for rows of unbounded
    modules.

    `rows` is a staging buffer that nothing reads afterwards: it is centred in place (no
    second buffer of its size: a fresh allocation of megabytes costs its page faults).
    Sums accumulate in the rows' dtype (vectorised; float32 sums on CPU are cascaded,
    ~1e-7 relative error of the centred values); the transfer widens them to float64.
    """
    dtype = rows.dtype
    count = rows.shape[0]
    flat = torch.zeros(STATS * count, dtype=dtype, device=rows.device)
    # views of each statistic's place in `flat`, in RowStat order
    s_sum, s_norm, s_nonzero, s_nonfinite, s_saturated, s_centred = flat.view(
        STATS, count).unbind()
    total = torch.sum(rows, 1, out=s_sum)  # NaN/Inf in a row makes it non-finite
    # a bool() cast counts NaN as non-zero and -0.0 as zero, like count_nonzero, but
    # without its per-element branch (faster on ReLU outputs on CPU)
    s_nonzero.copy_(_count_rows(rows.bool()))
    if rows.device.type == "cpu":
        # count only when some row's sum is not finite (then only in those rows: selecting
        # them by value is a host operation on CPU tensors, not a device transfer); x * 0
        # is 0 exactly for finite x, and the NaN/Inf column is still all zeros here
        if not torch.equal(total * 0, s_nonfinite):
            bad = torch.nonzero(~torch.isfinite(total)).reshape(-1)
            if bad.numel():
                picked = rows.index_select(0, bad)
                s_nonfinite.index_copy_(
                    0, bad, torch.count_nonzero(picked - picked, dim=1).to(dtype))
    else:
        # x - x is 0 exactly when finite
        s_nonfinite.copy_(torch.count_nonzero(rows - rows, dim=1))
    if bounded and count:
        where, centres, scales, even = _bound_tensors(tuple(bounds[: 2 * count]), dtype,
                                                      rows.device)
        if where.numel():
            # evenly spaced rows are read through a view (no copy of them first): the same
            # element-wise differences into a fresh tensor
            centre = (torch.sub(rows[even], centres) if even is not None
                      else rows.index_select(0, where).sub_(centres)).mul_(scales).abs_()
            # |x - centre| / half-range >= 1 - 2 * margin: within the margin of either end;
            # compared in place (1.0 or 0.0 in the rows' dtype, no boolean buffer) and
            # counted by a row sum (exact: a row holds at most SAMPLE values)
            hits = centre.ge_(1.0 - 2.0 * SATURATION_MARGIN).sum(1)
            s_saturated.index_copy_(0, where, hits)
    centred = rows.sub_(rows[:, :1].clone())  # the last reader of the raw values is above
    torch.linalg.vector_norm(centred, dim=1, out=s_norm)
    torch.sum(centred, 1, out=s_centred)
    return flat


__all__ = ["PIECE", "SAMPLE", "SATURATION_MARGIN", "RowStage", "StagedStats", "spread_indices"]
