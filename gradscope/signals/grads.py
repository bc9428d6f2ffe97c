"""Gradient statistics per parameter, computed with foreach kernels and no host sync."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, cast

import torch

from .distributed import is_sharded, local_tensor, put_sharded_grad_stats, put_sharded_norms
from .transfer import DeviceBatch, group_by_device_dtype


def measurable(grad: torch.Tensor | None) -> bool:
    """Whether a gradient enters the norm kernels (present and not empty)."""
    return grad is not None and grad.numel() > 0 and (not grad.is_sparse or grad._nnz() > 0)


def dense_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient: a sparse gradient's non-zeros (same norms), else itself.

    Example:
        >>> g = torch.sparse_coo_tensor([[0, 2]], [3.0, 4.0], (4,))
        >>> float(torch.linalg.vector_norm(dense_values(g)))
        5.0
    """
    return grad.coalesce().values() if grad.is_sparse else grad


@torch.no_grad()
def put_grad_stats(
    params: Sequence[torch.Tensor], indices: Sequence[int], batch: DeviceBatch
) -> list[torch.Tensor | None]:
    """Queue L2 norm and max |grad| of each parameter's gradient; return the grads read.

    Parameters whose `.grad` is None get no entry (their fields stay NaN).

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
        >>> b = DeviceBatch(); _ = put_grad_stats([p], [0], b)
        >>> b.fetch({"grad_norm": 1, "grad_max": 1})["grad_max"].tolist()
        [2.0]
    """
    grads = [p.grad for p in params]
    if grads and _plain(grads):  # the common case, without per-gradient calls
        put_norms(batch, cast(list[torch.Tensor], grads), indices, "grad_norm", "grad_max")
        return grads
    present = [(dense_values(g), i) for g, i in zip(grads, indices)
               if g is not None and measurable(g)]
    sharded = [(g, i) for g, i in present if is_sharded(g)]
    if sharded:  # FSDP2 shards: combined across ranks in one collective
        put_sharded_grad_stats([g for g, _ in sharded], [i for _, i in sharded], batch)
        present = [(local_tensor(g), i) for g, i in present if not is_sharded(g)]
    if present:
        tensors, idx = zip(*present)
        for group, group_idx in group_by_device_dtype(tensors, idx):
            put_norms(batch, group, group_idx, "grad_norm", "grad_max")
    return grads


def _plain(tensors: Sequence[Any]) -> bool:
    """Whether every tensor is a plain (not sharded), dense, non-empty one and all share the
    first one's device and dtype: then they are one group of `group_by_device_dtype`, each
    its own `dense_values` and `measurable`."""
    first = tensors[0]
    if first is None:
        return False
    dtype, device = first.dtype, first.device
    return all(type(t) in _PLAIN_TYPES and t.layout is _STRIDED and t.numel() > 0
               and t.dtype == dtype and t.device == device for t in tensors)


_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_GRAD = attrgetter("grad")
_SHAPE = attrgetter("shape")
_STRIDED = torch.strided


#: CPU tensors up to this many elements are measured as rows of one matrix per shape.
STACK_LIMIT = 65536


class _StackPlan:
    """Which tensors of a list are stacked together, and the order to put results back."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, shape in enumerate(shapes):
            numel = math.prod(shape)
            groups.setdefault(shape if numel <= STACK_LIMIT else (-1 - i,), []).append(i)
        self.groups = list(groups.values())
        order = [i for members in self.groups for i in members]
        self.back = torch.empty(len(order), dtype=torch.long)
        self.back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))


_plans: dict[tuple[tuple[int, ...], ...], _StackPlan] = {}


def stack_plan(tensors: Sequence[torch.Tensor]) -> _StackPlan:
    """Which of `tensors` (CPU, one dtype) are reduced together as rows of one stacked
    matrix (small tensors of one shape), and the order that puts results back (cached by
    the shapes).

    Example:
        >>> plan = stack_plan([torch.ones(2), torch.ones(3), torch.ones(2)])
        >>> plan.groups, plan.back.tolist()
        ([[0, 2], [1]], [0, 2, 1])
    """
    shapes = tuple(map(_SHAPE, tensors))  # torch.Size: a tuple, hashed as one
    plan = _plans.get(shapes)
    if plan is None:
        if len(_plans) > 64:
            _plans.clear()
        plan = _plans[shapes] = _StackPlan(shapes)
    return plan


def norms(tensors: Sequence[torch.Tensor], with_max: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2 norm (and, with `with_max`, max |x|) of each tensor of one device and dtype.

    On accelerators one fused foreach kernel does it. On CPU the foreach kernels loop over
    the tensors (~6 us each for a small one), so small tensors of one shape are stacked
    into a matrix and reduced by rows, and large ones read once per statistic; the
    inf-norm is computed as max(|max x|, |min x|) (the same value, NaN included), ~6x
    faster there.

    Example:
        >>> n, m = norms([torch.tensor([3.0, -4.0]), torch.tensor([1.0, 0.0])], with_max=True)
        >>> n.tolist(), m.tolist()
        ([5.0, 1.0], [4.0, 1.0])
    """
    if tensors[0].device.type != "cpu" or tensors[0].is_complex():
        listed = list(tensors)
        peak = torch.stack(torch._foreach_norm(listed, float("inf"))) if with_max else None
        return torch.stack(torch._foreach_norm(listed, 2)), peak
    plan = stack_plan(tensors)
    l2: list[torch.Tensor] = []
    peaks: list[torch.Tensor] = []
    for members in plan.groups:
        if len(members) == 1:
            t = tensors[members[0]].reshape(1, -1)
        else:
            t = torch.stack([tensors[i] for i in members]).view(len(members), -1)
        l2.append(torch.linalg.vector_norm(t, dim=1))
        if with_max:
            # amax and amin along the dim: aminmax along a dim is the slow CPU kernel
            # (timings in benchmarks/README.md, "Kernel choices")
            if len(members) == 1:
                low, high = torch.aminmax(t)
            else:
                low, high = t.amin(1), t.amax(1)
            peaks.append(torch.maximum(high.abs(), low.abs()).reshape(-1))
    norm = torch.cat(l2).index_select(0, plan.back) if len(l2) > 1 else l2[0]
    peak = None
    if with_max:
        peak = torch.cat(peaks).index_select(0, plan.back) if len(peaks) > 1 else peaks[0]
    return norm, peak


#: Gives the values of the tensors at some indices (all of one size) as the rows of one
#: contiguous [count, size] matrix that is already there (what stacking them would copy), or
#: None: (indices, size) -> matrix.
Rows = Callable[[Sequence[int], int], "torch.Tensor | None"]


def put_norms(batch: DeviceBatch, tensors: Sequence[torch.Tensor], indices: Sequence[int],
              field: str, max_field: str | None = None, rows: Rows | None = None) -> None:
    """Queue the L2 norm (and, with `max_field`, the max |x|) of each tensor of one device
    and dtype as `field` at `indices`: the values of norms(), with fewer kernels on CPU.

    On CPU each stack of same-shape tensors is queued with its own indices (the transfer
    puts the values in place: no concatenation and reordering kernels) and its max |x| is
    taken by an in-place |x| and a row max of the stacked copy (3 kernels fewer than min
    and max; the same values, NaN included). Without `max_field`, `rows` may give a stack's
    matrix without copying (the same values in the same layout: the same norms).

    Example:
        >>> b = DeviceBatch()
        >>> put_norms(b, [torch.tensor([3.0, -4.0]), torch.tensor([1.0, 0.0])], [1, 0],
        ...           "n", "m")
        >>> host = b.fetch({"n": 2, "m": 2}); host["n"].tolist(), host["m"].tolist()
        ([1.0, 5.0], [1.0, 4.0])
    """
    if tensors[0].device.type != "cpu" or tensors[0].is_complex():
        norm, peak = norms(tensors, with_max=max_field is not None)
        batch.put(field, norm, indices)
        if max_field is not None and peak is not None:
            batch.put(max_field, peak, indices)
        return
    plan = stack_plan(tensors)
    for members in plan.groups:
        where = [indices[i] for i in members]
        if len(members) == 1:
            t = tensors[members[0]].reshape(1, -1)
            batch.put(field, torch.linalg.vector_norm(t, dim=1), where)
            if max_field is not None:
                low, high = torch.aminmax(t)  # a view of the tensor itself: not changed
                batch.put(max_field, torch.maximum(high.abs(), low.abs()), where)
            continue
        found = None
        if rows is not None and max_field is None:  # read only: the max would write to it
            found = rows(where, tensors[members[0]].numel())
        t = found if found is not None else torch.stack(
            [tensors[i] for i in members]).view(len(members), -1)
        batch.put(field, torch.linalg.vector_norm(t, dim=1), where)
        if max_field is not None:
            batch.put(max_field, t.abs_().amax(1), where)  # the stacked copy, after its norm


@torch.no_grad()
def put_param_norms(
    params: Sequence[torch.Tensor], indices: Sequence[int], batch: DeviceBatch, field: str,
    rows: Rows | None = None
) -> None:
    """Queue the L2 norm of each parameter's values as `field`; `rows`: a copy of the
    current values of some of them, by their indices, to read instead of stacking them
    (see `put_norms`)."""
    if params and _plain(params):  # the common case, without per-parameter calls
        put_norms(batch, params, indices, field, rows=rows)
        return
    if any(is_sharded(p) for p in params):  # FSDP2 shards: combined in one collective
        sharded = [(p, i) for p, i in zip(params, indices) if is_sharded(p)]
        put_sharded_norms([p for p, _ in sharded], [i for _, i in sharded], batch, field)
        kept = [(local_tensor(p), i) for p, i in zip(params, indices) if not is_sharded(p)]
        params, indices = [p for p, _ in kept], [i for _, i in kept]
    # read under no_grad: the parameters themselves, no detached copy of each
    for group, group_idx in group_by_device_dtype(list(params), indices):
        put_norms(batch, group, group_idx, field)


@torch.no_grad()
def put_stale_grad_norms(
    params: Sequence[torch.Tensor], indices: Sequence[int], batch: DeviceBatch
) -> None:
    """Queue the norm of whatever gradient is already present when a backward pass starts.

    After an optimizer step, a gradient that was cleared is None or all zeros (norm 0); a
    positive norm means the previous step's gradient is still there and the coming backward
    will add onto it.
    """
    if not [g for g in map(_GRAD, params) if g is not None]:  # all cleared to None (usual)
        if indices:
            batch.put("stale_grad", torch.zeros(len(indices), dtype=torch.float64),
                      list(indices))
        return
    # this rank's shard is enough to tell "left over" from "cleared" (no collective here)
    present = [(dense_values(local_tensor(p.grad)), i) for p, i in zip(params, indices)
               if p.grad is not None and measurable(p.grad)]
    missing = [i for p, i in zip(params, indices) if not measurable(p.grad)]
    if missing:
        batch.put("stale_grad", torch.zeros(len(missing), dtype=torch.float64), missing)
    if present:
        tensors, idx = zip(*present)
        for group, group_idx in group_by_device_dtype(tensors, idx):
            put_norms(batch, group, group_idx, "stale_grad")


@torch.no_grad()
def put_nonfinite_counts(
    grads: Sequence[torch.Tensor | None], indices: Sequence[int], batch: DeviceBatch
) -> None:
    """Queue the exact count of non-finite elements of each given gradient.

    Called only for gradients whose norm came back non-finite, so healthy steps pay nothing.
    """
    for grad, index in zip(grads, indices):
        if grad is not None and measurable(grad):  # sharded: this rank's shard is counted
            count = (~torch.isfinite(dense_values(local_tensor(grad)))).sum()
            batch.put("grad_nonfinite", count.reshape(1), [index])
