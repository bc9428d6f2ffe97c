"""Update size per optimizer step, from a fixed sample of elements instead of a weight copy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, itemgetter

import numpy as np
import torch

from .distributed import is_dtensor, local_tensor
from .grads import put_param_norms
from .transfer import DeviceBatch, on_device

#: Tensors up to this many elements are concatenated whole and sampled with one gather;
#: larger ones are sampled one by one (copying them whole would cost more than a launch).
GATHER_WHOLE = 65536


def sample_indices(numel: int, size: int, device: torch.device) -> torch.Tensor | None:
    """Evenly spaced element indices (no RNG touched); None when the whole tensor is small.

    Example:
        >>> sample_indices(10, 4, torch.device("cpu")).tolist()
        [0, 3, 6, 9]
    """
    if numel <= size:
        return None
    return torch.linspace(0, numel - 1, size, device=device).round().long()


def bit_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of the tensor's raw bits as integers, wrapping on overflow: a cheap change check.

    Example:
        >>> t = torch.ones(4); before = bit_sum(t); t[2] = 1.0000001
        >>> bool(bit_sum(t) != before)
        True
    """
    size = tensor.element_size()
    bits = tensor.view(_BIT_VIEWS[size])
    return bits.sum(dtype=torch.int64 if size == 8 else torch.int32)


_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_DTYPE = attrgetter("dtype")
_VERSION = attrgetter("_version")


def _picker(indices: Sequence[int]) -> Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]:
    """A function giving the items of `indices` of a sequence, as a tuple (a list's
    comprehension in one C call).

    Example:
        >>> _picker([2, 0])("abc"), _picker([1])("abc")
        (('c', 'a'), ('b',))
    """
    if len(indices) == 1:
        index = indices[0]
        return lambda items: (items[index],)
    return itemgetter(*indices)


#: Integer dtype of each element size, to read raw bits (`bit_sum`).
_BIT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


#: Samples up to this long share one row width (padding them costs less than more kernels).
SHARED_WIDTH = 256


def _width(length: int, size: int) -> int:
    """Row width for a sample of `length` values: `size`, or the next power of two below it
    (at least SHARED_WIDTH, so that the default sample size puts everything in one batch)."""
    if length >= size:
        return size
    return min(size, max(SHARED_WIDTH, 1 << max(length - 1, 0).bit_length()))


@dataclass
class _Bucket:
    """Parameters of one device, dtype and row width, sampled into one [rows, width] matrix.

    `whole` rows come from one gather over the concatenated tensors (padding points at a
    trailing zero), `single` rows from one index_select each.
    """

    indices: list[int]  # parameter index of each row: whole rows first, then single rows
    whole: list[int]
    single: list[int]
    gather: torch.Tensor | None  # [len(whole) * width] positions in the concatenation
    full_check: list[int]  # rows whose sample is not the whole tensor: need a full-tensor check
    full_check_rows: torch.Tensor  # the same, as a tensor on the device
    # the concatenation holds the whole-row tensors in this order: those checked whole
    # grouped by size, so that one row sum per size gives all their bit sums
    source: list[int] = field(default_factory=list)
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (start, tensors, numel)
    sum_at: dict[int, int] = field(default_factory=dict)  # row -> position in the run sums
    pick: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]] | None = None  # of indices
    place: dict[int, int] = field(default_factory=dict)  # parameter -> position in `source`


@dataclass
class _Snapshot:
    """Sampled values of one bucket, and bit sums of the whole tensors of some of its rows."""

    bucket: _Bucket
    values: torch.Tensor  # float64 [rows, width]
    base: torch.Tensor  # float64 [rows]: norm of the sampled values
    checked: list[int]  # rows of bucket.full_check whose whole tensor is summed
    sums: torch.Tensor | None  # [len(checked)]: bit sums of those whole tensors


@dataclass
class _KeptSums:
    """After-step bit sums of a bucket, kept for the next step's before-step ones."""

    bucket: _Bucket
    checked: list[int]
    sums: torch.Tensor | None
    step: int
    versions: tuple[int, ...]  # version counters of the bucket's tensors when kept


class UpdateTracker:
    """Measures ||w_after - w_before|| / ||w_before|| on a sample, and whether w changed at all.

    `before()` runs in the optimizer's step pre-hook, `after()` in its post-hook. Values that
    the sample shows moved are changed; a tensor whose sample did not move is checked whole
    by a wrapping integer sum of its raw bits (any change of any element moves it, short of
    an exact cancellation; a float norm can round a small change away). Only tensors that
    did not move at their last measurement get that whole-tensor check: one that moved then
    and whose sample is still now reads "unknown" (NaN) for this step and is checked whole
    from its next measurement on. The version counter is no proof either way: fused
    optimizer kernels do not move it.

    When the next step is recorded too (every=1), the after-step bit sums are kept and serve
    as the next step's before-step ones if no parameter of theirs was written to since
    (version counters unchanged; a write through `.data` is not seen and shows as a change
    in the next step). Samples are always taken fresh.

    Parameters are batched by device, dtype and sample width: a step costs a few kernels per
    batch (one gather, one norm over the rows), not a dozen per parameter.
    """

    def __init__(self, params: Sequence[torch.Tensor], sample_size: int) -> None:
        self._params = list(params)
        self._size = sample_size
        # a sharded (FSDP2) parameter is measured on this rank's shard: a sample all the same
        self._sample = [sample_indices(local_tensor(p).numel(), sample_size, p.device)
                        for p in self._params]
        self._plans: dict[tuple[int, ...], list[_Bucket]] = {}
        self._before: dict[int, tuple[_Snapshot, int]] = {}
        self._kept: dict[int, _KeptSums] = {}  # after-step bit sums, by id of their bucket
        self._moving: set[int] = set()  # parameters seen changed at their last measurement
        self._measured: list[int] = []  # parameters measured since the last results()
        self._partial = np.array([s is not None for s in self._sample], dtype=bool)
        self._flats: dict[int, torch.Tensor] = {}  # 1-D views of the parameters (see _flat)
        self._sources: dict[int, tuple] = {}  # the same per bucket, by its id (see _source)
        # the concatenations the last before() read, while their values are current
        self._current: list[tuple[_Bucket, torch.Tensor, list[int]]] = []
        self._concatenated: list[int] | None = None  # sizes of the last one-dtype concatenation

    def _flat(self, index: int) -> torch.Tensor:
        """The parameter's values as a 1-D tensor: a view kept from step to step for a
        contiguous plain tensor (its values are read, never kept: they are copied at once),
        made anew when the parameter's storage, dtype or size changed (`p.data = ...`).
        The kept view holds its storage, so an unchanged address means the same storage."""
        p = self._params[index]
        flat = self._flats.get(index)
        if (flat is not None and flat.data_ptr() == p.data_ptr() and flat.dtype == p.dtype
                and flat.numel() == p.numel()):
            return flat
        flat = local_tensor(p).detach().reshape(-1)
        if not is_dtensor(p) and p.layout is torch.strided and p.is_contiguous():  # a view
            self._flats[index] = flat
        return flat

    def _plan(self, indices: Sequence[int]) -> list[_Bucket]:
        key = tuple(indices)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 16:  # param groups change rarely; keep the cache small
                self._plans.clear()
                self._sources.clear()
            plan = self._plans[key] = self._make_plan(indices)
        return plan

    def _make_plan(self, indices: Sequence[int]) -> list[_Bucket]:
        groups: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
        for i in indices:
            local = local_tensor(self._params[i])
            numel = local.numel()
            if numel == 0 or local.is_complex():  # an empty shard, or complex values (whose
                continue  # real-valued sample is not defined): not measured, ratio stays NaN
            key = (local.device, local.dtype, _width(min(numel, self._size), self._size))
            groups.setdefault(key, []).append(i)
        buckets = []
        for (device, _, width), members in groups.items():
            single = [i for i in members if self._sample[i] is not None
                      and local_tensor(self._params[i]).numel() > GATHER_WHOLE]
            chosen = set(single)
            whole = [i for i in members if i not in chosen]
            gather = None
            place: dict[int, int] = {}
            source: list[int] = []
            runs: list[tuple[int, int, int]] = []
            sum_at: dict[int, int] = {}
            if whole:
                numels = {i: local_tensor(self._params[i]).numel() for i in whole}
                by_size: dict[int, list[int]] = {}
                for i in whole:
                    if self._sample[i] is not None:
                        by_size.setdefault(numels[i], []).append(i)
                offsets: dict[int, int] = {}
                offset = 0
                for numel, same in by_size.items():
                    runs.append((offset, len(same), numel))
                    for i in same:
                        offsets[i] = offset
                        offset += numel
                        source.append(i)
                checked = len(source)
                for i in whole:
                    if i not in offsets:
                        offsets[i] = offset
                        offset += numels[i]
                        source.append(i)
                total = offset
                place = {i: k for k, i in enumerate(source)}
                row_of = {i: row for row, i in enumerate(whole)}
                sum_at = {row_of[i]: pos for pos, i in enumerate(source[:checked])}
                rows = []
                for i in whole:
                    sample = self._sample[i]
                    pos = (torch.arange(numels[i], device=device) if sample is None
                           else sample.to(device)) + offsets[i]
                    pad = torch.full((width - pos.numel(),), total, dtype=torch.long,
                                     device=device)
                    rows.append(torch.cat([pos, pad]))
                gather = torch.cat(rows)
            order = whole + single
            full_check = [row for row, i in enumerate(order) if self._sample[i] is not None]
            where = on_device(full_check, device)
            buckets.append(_Bucket(order, whole, single, gather, full_check, where, source,
                                   runs, sum_at, place=place))
        return buckets

    def _source(self, bucket: _Bucket) -> tuple[torch.Tensor, bool]:
        """The bucket's whole-row tensors concatenated in `bucket.source` order, plus a
        trailing zero (what padding points at); and whether they share one dtype, so that
        its raw bits are each tensor's own.

        The 1-D views of the tensors are kept per bucket and checked all at once (data
        pointer, dtype and size, what `_flat` checks one by one)."""
        kept = self._sources.get(id(bucket))
        if kept is not None and kept[0] is bucket:
            _, flats, pointers, dtype, numels, pick = kept
            tensors = pick(self._params)
            # map over the tensors' own methods: the same checks as a loop, at C speed
            if (list(map(_DATA_PTR, tensors)) == pointers
                    and set(map(_DTYPE, tensors)) == {dtype}
                    and list(map(_NUMEL, tensors)) == numels):
                self._concatenated = numels
                return torch.cat([*flats, flats[0].new_zeros(1)]), True
        flats = [self._flat(i) for i in bucket.source]
        dtype = flats[0].dtype
        same = all(f.dtype == dtype for f in flats)
        self._concatenated = list(map(_NUMEL, flats)) if same else None
        if same and all(self._flats.get(i) is f for i, f in zip(bucket.source, flats)):
            self._sources[id(bucket)] = (bucket, flats, [f.data_ptr() for f in flats], dtype,
                                         [f.numel() for f in flats], _picker(bucket.source))
        return torch.cat([*flats, flats[0].new_zeros(1)]), same

    def current_rows(self, members: Sequence[int], numel: int) -> torch.Tensor | None:
        """The values of the parameters `members` (all of `numel` elements), as the
        [len(members), numel] rows of the concatenation the last `before()` read, when they
        sit there one after another in that order (else None): what stacking them gives,
        without a copy. Read-only, and valid only until the parameters change: the caller
        reads it right after `before()`, and `drop_current()` lets it go.

        Example:
            >>> ps = [torch.ones(2, 2), torch.zeros(2, 2)]
            >>> tracker = UpdateTracker(ps, 2); tracker.before([0, 1])
            >>> tracker.current_rows([0, 1], 4).tolist()
            [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
        """
        first = members[0]
        for bucket, source, numels in self._current:
            position = bucket.place.get(first)
            if position is None:
                continue
            count = len(members)
            end = position + count
            if (bucket.source[position: end] != list(members)
                    or numels[position: end] != [numel] * count):
                return None
            start = sum(numels[:position])
            return source[start: start + count * numel].view(count, numel)
        return None

    def drop_current(self) -> None:
        """Let go of the concatenations of the last `before()` (see `current_rows`)."""
        self._current = []

    def _values(self, bucket: _Bucket) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampled values of the bucket's parameters as a fresh float64 [rows, width] matrix,
        and the concatenation they were gathered from when its raw bits are the tensors'
        own (see `_bit_sums`)."""
        parts = []
        source = None
        if bucket.whole:
            source, exact = self._source(bucket)
            parts.append(source.index_select(0, _present(bucket.gather)).view(
                len(bucket.whole), -1))
            if not exact:
                source = None
        if bucket.single:
            parts.append(torch.stack([self._flat(i).index_select(0, _present(self._sample[i]))
                                      for i in bucket.single]))
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        return values.to(torch.float64), source  # a new tensor either way: indexing copies

    def _bit_sums(self, bucket: _Bucket, rows: Sequence[int],
                  source: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bit sums (`bit_sum`) of the whole tensors of `rows`, in that order. Those of
        whole rows are row sums over `source` (one per tensor size; integer sums wrap the
        same in any order), the others one by one."""
        if not rows:
            return None
        at = bucket.sum_at
        listed = [r for r in rows if r in at] if source is not None else []
        if source is None or not listed:
            return torch.stack([bit_sum(local_tensor(self._params[bucket.indices[r]]).detach())
                                for r in rows])
        size = source.element_size()
        kind = _BIT_VIEWS[size]
        total = torch.int64 if size == 8 else torch.int32
        sums = [source[start: start + count * numel].view(count, numel).view(kind).sum(
            1, dtype=total) for start, count, numel in bucket.runs]
        found = torch.cat(sums) if len(sums) > 1 else sums[0]
        position = {r: at[r] for r in listed}
        others = [r for r in rows if r not in position]
        if others:
            position.update({r: found.shape[0] + k for k, r in enumerate(others)})
            found = torch.cat([found, torch.stack(
                [bit_sum(local_tensor(self._params[bucket.indices[r]]).detach())
                 for r in others])])
        picked = [position[r] for r in rows]
        if picked == list(range(found.shape[0])):
            return found
        return found.index_select(0, on_device(picked, found.device))

    def _versions(self, bucket: _Bucket) -> tuple[int, ...]:
        pick = bucket.pick
        if pick is None:
            pick = bucket.pick = _picker(bucket.indices)
        return tuple(map(_VERSION, pick(self._params)))

    def _to_check(self, bucket: _Bucket) -> list[int]:
        return [r for r in bucket.full_check if bucket.indices[r] not in self._moving]

    @torch.no_grad()
    def before(self, indices: Sequence[int], step: int = -1) -> None:
        current: list[tuple[_Bucket, torch.Tensor, list[int]]] = []
        self._current = current
        for bucket in self._plan(indices):
            self._concatenated = None
            # fresh samples every time (a write through .data moves no version counter, and
            # a gather per bucket is cheap); bit sums are carried over when still valid
            values, source = self._values(bucket)
            numels = self._concatenated
            if source is not None and numels is not None:  # the tensors' values, one dtype
                current.append((bucket, source, numels))
            checked, sums = self._before_sums(bucket, step, source)
            snapshot = _Snapshot(bucket, values, torch.linalg.vector_norm(values, dim=1),
                                 checked, sums)
            rows = bucket.indices
            self._before.update(zip(rows, zip(repeat(snapshot), range(len(rows)))))

    def _before_sums(self, bucket: _Bucket, step: int, source: torch.Tensor | None = None
                     ) -> tuple[list[int], torch.Tensor | None]:
        """The rows to check whole, and their bit sums: from the previous step's after-step
        sums when no tensor of the bucket was written to since, else computed now."""
        wanted = self._to_check(bucket)
        kept = self._kept.pop(id(bucket), None)
        if (kept is None or kept.bucket is not bucket or step - kept.step not in (0, 1)
                or kept.versions != self._versions(bucket)):
            return wanted, self._bit_sums(bucket, wanted, source)
        have = {row: pos for pos, row in enumerate(kept.checked)}
        present = [row for row in wanted if row in have]
        missing = [row for row in wanted if row not in have]
        parts = []
        if present:
            sums = _present(kept.sums)
            parts.append(sums.index_select(
                0, on_device([have[row] for row in present], sums.device)))
        if missing:
            parts.append(_present(self._bit_sums(bucket, missing, source)))
        return present + missing, (torch.cat(parts) if len(parts) > 1
                                   else (parts[0] if parts else None))

    @torch.no_grad()
    def after(self, indices: Sequence[int], batch: DeviceBatch, step: int = -1,
              keep: bool = False) -> None:
        """Queue the update measurements of `indices`; with `keep`, hold the after-step bit
        sums for the next `before()`."""
        entries = list(map(self._before.pop, indices, repeat(None)))
        first = entries[0] if entries else None
        if (first is not None and len(entries) == len(first[0].bucket.indices)
                and all(e is not None and e[0] is first[0] for e in entries)):
            # the common case: every row of one snapshot (what the loop below finds then)
            self._measure(first[0], None, batch, step, keep)
            return
        wanted: dict[int, tuple[_Snapshot, list[tuple[int, int]]]] = {}
        for i, entry in zip(indices, entries):
            if entry is not None:
                snapshot, row = entry
                wanted.setdefault(id(snapshot), (snapshot, []))[1].append((row, i))
        for snapshot, rows in wanted.values():
            self._measure(snapshot, rows, batch, step, keep)

    def _measure(self, snap: _Snapshot, rows: list[tuple[int, int]] | None,
                 batch: DeviceBatch, step: int, keep: bool) -> None:
        """Queue ||w_after - w_before|| and ||w_before|| of the sampled values, and for the
        checked rows whether the whole tensor's bit sum moved; `results()` makes the update
        ratio and the changed flag of them on the host (a few numbers per parameter).
        `rows`: (row, parameter index) of the rows to measure; None for all of them."""
        bucket = snap.bucket
        new_values, source = self._values(bucket)
        # in place: the fresh values are read for nothing else
        diff = torch.linalg.vector_norm(new_values.sub_(snap.values), dim=1)
        new_sums = self._bit_sums(bucket, snap.checked, source)
        if keep:
            self._kept[id(bucket)] = _KeptSums(bucket, snap.checked, new_sums, step,
                                               self._versions(bucket))
        base = snap.base
        targets = bucket.indices
        if rows is not None and len(rows) < len(bucket.indices):
            rows = sorted(rows)
            pick = on_device([r for r, _ in rows], base.device)
            diff, base = diff.index_select(0, pick), base.index_select(0, pick)
            targets = [i for _, i in rows]
        batch.put("update_diff", diff, targets)
        batch.put("update_base", base, targets)
        self._measured.extend(targets)
        if snap.checked and targets is bucket.indices:  # every row: every checked one too
            differs = torch.ne(_present(new_sums), _present(snap.sums)).to(torch.float64)
            batch.put("update_bits_moved", differs, [targets[r] for r in snap.checked])
        elif snap.checked:
            wanted = set(targets)
            checked = [(pos, bucket.indices[r]) for pos, r in enumerate(snap.checked)
                       if bucket.indices[r] in wanted]
            if checked:
                differs = torch.ne(_present(new_sums), _present(snap.sums)).to(torch.float64)
                if len(checked) < len(snap.checked):
                    differs = differs.index_select(0, on_device([pos for pos, _ in checked],
                                                                base.device))
                batch.put("update_bits_moved", differs, [i for _, i in checked])

    def results(self, host: dict[str, np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
        """(update ratio, changed) of every parameter from the fetched values (NaN where not
        measured this step; changed NaN also for a moved-before tensor whose sample is still).
        """
        nan = np.full(count, np.nan)
        diff = host.get("update_diff", nan)
        base = host.get("update_base", nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            # ||w_before|| = 0 (e.g. a zero-initialised bias): the ratio is undefined (NaN)
            # if the values moved, and 0 if they did not
            ratio = np.where(base > 0, diff / np.where(base > 0, base, 1.0),
                             np.where(diff > 0, np.nan, 0.0))
        moved = diff != 0  # NaN (a NaN weight) counts as moved, as it did for a whole norm
        changed = moved.astype(np.float64)
        # a partial sample that did not move says nothing about the other elements...
        changed[self._partial[:count] & ~moved] = np.nan
        # ...unless the whole tensor's bit sum was compared
        bits = host.get("update_bits_moved")
        if bits is not None:
            checked = ~np.isnan(bits)
            changed[checked] = (moved[checked] | (bits[checked] > 0)).astype(np.float64)
        indices = self._measured
        self._measured = []
        # a tensor whose sample moved skips the whole-tensor check next time (a NaN
        # difference does not count: such a tensor keeps being checked whole)
        if len(indices) == count and len(set(indices)) == count:  # every one (usual case)
            self._moving = set(np.flatnonzero(diff > 0).tolist())
            return ratio, changed
        measured = np.zeros(count, dtype=bool)
        measured[np.asarray(indices, dtype=np.int64)] = True
        self._moving = set(np.flatnonzero(measured & (diff > 0)).tolist())
        ratio[~measured] = np.nan
        changed[~measured] = np.nan
        return ratio, changed

    def reset(self) -> None:
        self._current = []
        self._before.clear()
        self._kept.clear()
        self._flats.clear()
        self._sources.clear()
        self._measured = []


__all__ = ["UpdateTracker", "bit_sum", "put_param_norms", "sample_indices"]


def _present(tensor: torch.Tensor | None) -> torch.Tensor:
    """`tensor`, known to be there where it is read (a sample or kept sums of a checked row)."""
    if tensor is None:
        raise ValueError("update tracker: a sampled or checked row has no tensor")
    return tensor
