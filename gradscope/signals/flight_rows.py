"""The flight recorder's per-step values on CPU: one flat tensor per step, few kernels.

On a CPU model the fixed cost of a kernel (a few microseconds of dispatch) outweighs its
arithmetic on small tensors, so a step's numbers are gathered with as few kernels as
possible: one `aminmax` on the model's input and one on its output (their minimum and
maximum: non-finite exactly when the tensor holds NaN/Inf), one `aminmax` per large or
lone-shaped gradient, one stack, in-place abs and max per shape of small gradients, one
concatenation into the step's row and one dot product with zeros that tells whether it is
all finite (float32/float64 rows; others take a multiply and a comparison).
What each value of a row is (a segment list, shared between steps that look the same) is
kept on the host; the rows travel with the next recorded step's single transfer and are
sorted out there. Minimum, maximum and |x| are exact in any dtype and keep NaN, so the
largest |gradient| is exactly what one pass per tensor gives.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .distributed import is_dtensor
from .grads import STACK_LIMIT
from .transfer import DeviceBatch

#: Segment kinds of a row: the model's input (min, max pairs), its output (pairs), gradients
#: read as (min, max) pairs, gradients read as largest |value|, a float64 row over every
#: parameter (-1: not measured), and values that are not kept (the check alone reads them).
IN, OUT, PAIRS, PEAKS, FULL, SKIP = range(6)

#: One segment: its kind and either a count of values or the parameter indices it covers.
Segment = tuple[int, "int | Sequence[int]"]

#: Segment kinds that make a row worth keeping, and those that hold gradient maxima.
_KEPT = frozenset({IN, OUT, PAIRS, PEAKS, FULL})
_GRADS = frozenset({PAIRS, PEAKS, FULL})

#: Row dtypes whose finiteness is read with one dot product (see StepRows.finite).
_DOT_DTYPES = (torch.float32, torch.float64)


class GradPlan:
    """How the gradients of one set of parameters are read: `pairs` one aminmax each (large
    or alone in their shape and dtype), `groups` stacked by shape and dtype (small ones).

    Example:
        >>> plan = GradPlan.of([torch.ones(2), torch.ones(3), torch.ones(2), None])
        >>> plan.pairs, plan.groups
        ([1], [[0, 2]])
    """

    def __init__(self, pairs: list[int], groups: list[list[int]], sharded: bool = False
                 ) -> None:
        self.pairs = pairs
        self.groups = groups
        self.sharded = sharded  # some gradient is a DTensor: read elsewhere
        # made once per plan, used on every step: each group's gradients picked at C speed,
        # and the row segments of the values read (kept, or read for the check alone)
        self.getters: list[Callable[[Sequence], tuple]] = [
            operator.itemgetter(*members) for members in groups]
        self.dims: list[tuple[int, ...]] = []  # per group, the dims of a stack to reduce
        self.kept: list[Segment] = [(PAIRS, pairs)] if pairs else []
        self.kept += [(PEAKS, members) for members in groups]
        self.skipped: list[Segment] = [(SKIP, 2 * len(pairs))] if pairs else []
        self.skipped += [(SKIP, len(members)) for members in groups]

    @classmethod
    def of(cls, grads: Sequence[torch.Tensor | None]) -> GradPlan:
        """The plan of the gradients that can be read here: present, dense, non-empty, real
        and not sharded (the others are not measured, as on other devices)."""
        shapes: dict[tuple, list[int]] = {}
        if any(g is not None and is_dtensor(g) for g in grads):
            return cls([], [], sharded=True)
        for i, g in enumerate(grads):
            if g is None or g.layout is not torch.strided or g.numel() == 0 or g.is_complex():
                continue
            key = (tuple(g.shape), g.dtype) if g.numel() <= STACK_LIMIT else (i,)
            shapes.setdefault(key, []).append(i)
        pairs = [m[0] for m in shapes.values() if len(m) == 1]
        groups = [m for m in shapes.values() if len(m) > 1]
        plan = cls(sorted(pairs), groups)
        plan.dims = [tuple(range(1, grads[m[0]].dim() + 1)) for m in groups]  # type: ignore[union-attr]
        return plan


class StepRows:
    """The flight recorder's rows on CPU: this step's values as they come, the kept rows
    of the steps since the last record, and their reading on the host.

    Example:
        >>> rows = StepRows(2)
        >>> rows.limits(IN, torch.aminmax(torch.tensor([1.0, -2.0])))
        >>> grads = [torch.tensor([3.0, -4.0]), torch.tensor([float("nan")])]
        >>> rows.finite(rows.piece(grads, keep=True))
        False
        >>> rows.end(0); batch = DeviceBatch(); rows.put(batch)
        >>> steps, input_bad, output_bad, norm_steps, grad_max = rows.read(batch.fetch())
        >>> steps, input_bad, norm_steps, grad_max
        ([0], [False], [0], [[4.0, inf]])
    """

    def __init__(self, params: int) -> None:
        self._params = params
        self._limits: list[list[torch.Tensor]] = [[], []]  # input, output (min, max) values
        self._pieces: list[torch.Tensor] = []  # this step's values, in row order
        self._segments: list[Segment] = []
        self._plans: dict[tuple[int, ...], GradPlan] = {}
        self._zeros: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._readers: list[RowReader] = []  # the layouts read lately, worked out
        self.rows: list[torch.Tensor] = []  # kept rows since the last record
        self.layouts: list[tuple[Segment, ...]] = []
        self.steps: list[int] = []  # steps with input/output values
        self.norm_steps: list[int] = []  # steps with gradient maxima

    def limits(self, slot: int, pair: Sequence[torch.Tensor]) -> None:
        """Add the (min, max) of the model's input (IN) or output (OUT) of one forward."""
        self._limits[slot].extend(pair)

    # ------------------------------------------------------------------ per step
    def _take_limits(self) -> tuple[list[torch.Tensor], list[Segment]]:
        """The input/output limits gathered since the last piece (0-d values, in row order)
        and their segments; the step's lists are emptied."""
        limits = self._limits
        scalars: list[torch.Tensor] = []
        segments: list[Segment] = []
        if limits[0]:
            scalars, limits[0] = limits[0], []
            segments.append((IN, len(scalars)))
        if limits[1]:
            values, limits[1] = limits[1], []
            scalars = scalars + values if scalars else values
            segments.append((OUT, len(values)))
        return scalars, segments

    def piece(self, grads: Sequence[torch.Tensor | None] | None, keep: bool,
              full: torch.Tensor | None = None, plan: GradPlan | None = None
              ) -> torch.Tensor | None:
        """This step's values not yet in a row piece (input/output limits, and with `grads`
        the gradient maxima, kept when `keep`), as one 1-d tensor; None when there are none.
        `full` is a float64 row over every parameter made elsewhere (sharded gradients);
        `plan` the plan of `grads` when the caller has it."""
        scalars, segments = self._take_limits()
        vectors: list[torch.Tensor] = []
        if grads is not None:
            try:
                plan = plan or self.plan(grads)
                pair_values, vectors = self._read(grads, plan)
            except RuntimeError:  # a gradient changed shape, dtype or layout: read afresh
                plan = self.plan(grads, cached=False)
                pair_values, vectors = self._read(grads, plan)
            if pair_values:
                scalars = scalars + pair_values if scalars else pair_values
            segments += plan.kept if keep else plan.skipped
        if full is not None:
            vectors.append(full)
            segments.append((FULL, self._params) if keep else (SKIP, self._params))
        if scalars:
            piece = torch.cat([torch.stack(scalars), *vectors]) if vectors else torch.stack(
                scalars)
        elif vectors:
            piece = torch.cat(vectors) if len(vectors) > 1 else vectors[0]
        else:
            return None
        self._pieces.append(piece)
        self._segments += segments
        return piece

    def check_piece(self, grads: Sequence[torch.Tensor | None], plan: GradPlan
                    ) -> torch.Tensor | None:
        """piece() of a step whose gradients are read for the check alone (a recorded step
        measures its own maxima): the input/output limits, (min, max) of each large or lone
        gradient, and per stacked group one value, the sum of x * 0 over its gradients (+-0
        when all are finite, NaN otherwise), not one maximum per gradient: non-finite exactly
        when piece(grads, keep=False) is, with fewer kernels. Groups of other dtypes, and
        gradients that changed, take piece().

        Example:
            >>> rows = StepRows(3)
            >>> grads = [torch.ones(2), torch.tensor([1.0, math.inf]), torch.ones(5)]
            >>> rows.finite(rows.check_piece(grads, rows.plan(grads)))
            False
        """
        try:
            values = self._check_values(grads, plan)
        except RuntimeError:  # a gradient changed shape, dtype or layout: the general path
            values = None
        if values is None:
            return self.piece(grads, keep=False, plan=plan)
        scalars, segments = self._take_limits()
        if values:
            scalars = scalars + values if scalars else values
            segments.append((SKIP, len(values)))
        if not scalars:
            return None
        piece = torch.stack(scalars)
        self._pieces.append(piece)
        self._segments += segments
        return piece

    def _check_values(self, grads: Sequence[torch.Tensor | None], plan: GradPlan
                      ) -> list[torch.Tensor] | None:
        """check_piece()'s gradient values (0-d tensors); None when a group's dtype is not
        one whose finiteness a dot product reads."""
        values: list[torch.Tensor] = []
        for i in plan.pairs:
            values.extend(torch.aminmax(grads[i]))  # type: ignore[arg-type]
        for getter in plan.getters:
            rows = torch.stack(getter(grads)).view(-1)
            if rows.dtype not in _DOT_DTYPES:
                return None
            values.append(torch.dot(rows, self._zeros_of(rows.numel(), rows.dtype)))
        return values

    def _zeros_of(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A kept 1-d tensor of `size` zeros of `dtype`."""
        key = (size, dtype)
        zeros = self._zeros.get(key)
        if zeros is None:
            if len(self._zeros) > 8:
                self._zeros.clear()
            zeros = self._zeros[key] = torch.zeros(size, dtype=dtype)
        return zeros

    def plan(self, grads: Sequence[torch.Tensor | None], cached: bool = True) -> GradPlan:
        """The reading plan of these gradients, kept by which of them are missing."""
        key = tuple([i for i, g in enumerate(grads) if g is None])  # usually empty
        plan = self._plans.get(key) if cached else None
        if plan is None:
            if len(self._plans) > 8:
                self._plans.clear()
            plan = self._plans[key] = GradPlan.of(grads)
        return plan

    @staticmethod
    def _read(grads: Sequence[torch.Tensor | None], plan: GradPlan
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs: list[torch.Tensor] = []
        for i in plan.pairs:
            pairs.extend(torch.aminmax(grads[i]))  # type: ignore[arg-type]
        peaks = []
        for getter, dims in zip(plan.getters, plan.dims):
            # |x| in place on the stacked copy, then one max per gradient (NaN stays NaN)
            rows = torch.stack(getter(grads)).abs_()
            if rows.dim() != len(dims) + 1:
                raise RuntimeError("gradient shapes changed")  # read afresh (see piece())
            peaks.append(rows.amax(dims) if dims else rows)
        return pairs, peaks

    def finite(self, piece: torch.Tensor) -> bool:
        """Whether every value of `piece` is finite (x * 0 is 0 exactly for finite x and NaN
        for NaN/Inf), read on the host without a transfer method (a CPU tensor).

        Example:
            >>> rows = StepRows(1)
            >>> rows.finite(torch.tensor([1.0, -0.0])), rows.finite(torch.tensor([1.0, -math.inf]))
            (True, False)
        """
        zeros = self._zeros_of(piece.numel(), piece.dtype)
        if piece.dtype in _DOT_DTYPES:
            # one kernel: the sum of x * 0 is +-0 when all are finite, NaN otherwise
            return not torch.is_nonzero(torch.dot(piece, zeros))
        return torch.equal(piece * 0, zeros)

    def end(self, step: int) -> None:
        """Close the step: keep its row (input/output limits come late with a closure)."""
        if self._limits[0] or self._limits[1]:
            self.piece(None, keep=False)
        pieces = self._pieces
        if not pieces:
            return
        row = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        segments = self._segments
        kinds = {kind for kind, _ in segments}
        if not kinds.isdisjoint(_KEPT):
            self.rows.append(row)
            self.layouts.append(tuple(segments))
            if IN in kinds or OUT in kinds:
                self.steps.append(step)
            if not kinds.isdisjoint(_GRADS):
                self.norm_steps.append(step)
        self._pieces = []
        self._segments = []

    # ------------------------------------------------------------------ per record
    def put(self, batch: DeviceBatch) -> None:
        """Queue the kept rows (one field)."""
        if self.rows:
            batch.put("flight:rows", torch.cat(self.rows) if len(self.rows) > 1
                      else self.rows[0])

    def read(self, host: dict[str, np.ndarray]
             ) -> tuple[list[int], list[bool], list[bool], list[int], list[list[float]]]:
        """(steps, input_bad, output_bad, norm_steps, grad_max) of the rows put: grad_max
        is inf where a gradient held NaN/Inf, NaN where it was not measured.

        Consecutive rows of one layout (usually all of them) are read as one block: a few
        array operations per record instead of a few per row (see RowReader)."""
        values = host.get("flight:rows")
        if values is None:
            return [], [], [], [], []
        input_bad: list[bool] = []
        output_bad: list[bool] = []
        maxima: list[np.ndarray] = []
        layouts = self.layouts
        offset = 0
        start = 0
        while start < len(layouts):
            layout = layouts[start]
            end = start + 1
            while end < len(layouts) and layouts[end] == layout:
                end += 1
            reader = self._reader(layout)
            size = (end - start) * reader.width
            block = values[offset:offset + size].reshape(end - start, reader.width)
            offset += size
            reader.read(block, input_bad, output_bad, maxima)
            start = end
        grad_max: list[list[float]] = []
        if maxima:
            rows = np.concatenate(maxima) if len(maxima) > 1 else maxima[0]
            # non-finite peaks read inf, unmeasured ones (-1) NaN
            rows = np.where(rows < 0, math.nan, np.where(np.isnan(rows), math.inf, rows))
            grad_max = rows.tolist()
        return list(self.steps), input_bad, output_bad, list(self.norm_steps), grad_max

    def _reader(self, layout: tuple[Segment, ...]) -> RowReader:
        """The RowReader of `layout`, kept for the next records (a layout compares by value:
        its index lists are shared between steps, so this is mostly identity checks)."""
        for reader in self._readers:
            if reader.layout == layout:
                return reader
        if len(self._readers) > 8:
            self._readers.clear()
        reader = RowReader(layout, self._params)
        self._readers.append(reader)
        return reader

    def clear(self) -> None:
        """Drop the kept rows (they were read)."""
        self.rows, self.layouts, self.steps, self.norm_steps = [], [], [], []

    def reset_step(self) -> None:
        """Drop whatever this step gathered (the recorder closed mid-step)."""
        self._limits = [[], []]
        self._pieces = []
        self._segments = []


class RowReader:
    """How the rows of one layout are read on the host, worked out once: the columns of the
    input and output limits, and for every parameter the column(s) its maximum comes from.
    A block of rows of that layout is then read with a few array operations in all.

    Example:
        >>> reader = RowReader(((IN, 2), (PAIRS, [1]), (PEAKS, [0, 2])), 3)
        >>> block = np.array([[1.0, np.inf, -5.0, 2.0, 3.0, 4.0]])
        >>> flags_in, flags_out, maxima = [], [], []
        >>> reader.read(block, flags_in, flags_out, maxima)
        >>> flags_in, flags_out, maxima[0].tolist()
        ([True], [False], [[3.0, 5.0, 4.0]])
    """

    def __init__(self, layout: tuple[Segment, ...], params: int) -> None:
        self.layout = layout
        limits: list[list[int]] = [[], []]  # IN, OUT columns
        sources: dict[int, tuple[int, ...]] = {}  # parameter -> its column(s), last wins
        grads = flags = False
        offset = 0
        for kind, what in layout:
            size = what if isinstance(what, int) else len(what)
            if kind == PAIRS:
                size *= 2
            if kind in (IN, OUT):
                flags = True
                limits[kind] += range(offset, offset + size)
            elif kind != SKIP:
                grads = True
                if isinstance(what, int):  # FULL: a row over every parameter
                    sources.update((i, (offset + i,)) for i in range(what))
                elif kind == PAIRS:
                    sources.update((i, (offset + 2 * j, offset + 2 * j + 1))
                                   for j, i in enumerate(what))
                else:
                    sources.update((i, (offset + j,)) for j, i in enumerate(what))
            offset += size
        self.width = offset
        self.params = params
        self.flags = flags
        self.grads = grads
        self.input_cols = np.array(limits[IN], dtype=np.intp) if limits[IN] else None
        self.output_cols = np.array(limits[OUT], dtype=np.intp) if limits[OUT] else None
        copies = sorted((i, c[0]) for i, c in sources.items() if len(c) == 1)
        pairs = sorted((i, c) for i, c in sources.items() if len(c) == 2)
        self.copy_dest = np.array([i for i, _ in copies], dtype=np.intp)
        self.copy_src = np.array([c for _, c in copies], dtype=np.intp)
        self.pair_dest = np.array([i for i, _ in pairs], dtype=np.intp)
        self.pair_lo = np.array([c[0] for _, c in pairs], dtype=np.intp)
        self.pair_hi = np.array([c[1] for _, c in pairs], dtype=np.intp)
        # every parameter copied from its column, in order: the block's columns are the rows
        self.whole = not pairs and len(copies) == params

    def read(self, block: np.ndarray, input_bad: list[bool], output_bad: list[bool],
             maxima: list[np.ndarray]) -> None:
        """Append the flags (when the layout has limits) and the float64 maxima rows (-1:
        not measured, when it has gradients) of `block`, one row of this layout each."""
        count = block.shape[0]
        if self.flags:
            for cols, out in ((self.input_cols, input_bad), (self.output_cols, output_bad)):
                if cols is None:
                    out += [False] * count
                else:
                    out += (~np.isfinite(block[:, cols]).all(axis=1)).tolist()
        if not self.grads:
            return
        if self.whole:
            maxima.append(block[:, self.copy_src].astype(np.float64))
            return
        rows = np.full((count, self.params), -1.0)
        if self.copy_dest.size:
            rows[:, self.copy_dest] = block[:, self.copy_src]
        if self.pair_dest.size:
            rows[:, self.pair_dest] = np.maximum(np.abs(block[:, self.pair_lo]),
                                                 np.abs(block[:, self.pair_hi]))
        maxima.append(rows)


__all__ = ["FULL", "IN", "OUT", "PAIRS", "PEAKS", "SKIP", "GradPlan", "RowReader",
           "StepRows"]
