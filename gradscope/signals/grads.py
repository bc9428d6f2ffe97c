"""Gradient statistics per parameter, computed with foreach kernels and no host sync."""

from __future__ import annotations

from collections.abc import Sequence

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
    present = [(dense_values(g), i) for g, i in zip(grads, indices) if measurable(g)]
    sharded = [(g, i) for g, i in present if is_sharded(g)]
    if sharded:  # FSDP2 shards: combined across ranks in one collective
        put_sharded_grad_stats([g for g, _ in sharded], [i for _, i in sharded], batch)
        present = [(local_tensor(g), i) for g, i in present if not is_sharded(g)]
    if present:
        tensors, idx = zip(*present)
        for group, group_idx in group_by_device_dtype(tensors, idx):
            batch.put("grad_norm", torch.stack(torch._foreach_norm(group, 2)), group_idx)
            batch.put("grad_max", _max_abs(group), group_idx)
    return grads


def _max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |x| of each tensor (one device and dtype), stacked.

    The fused inf-norm is right on accelerators; on CPU it runs ~6x slower than a min/max
    pass, so large CPU tensors use max(|max(x)|, |min(x)|) (the same value, NaN included).
    """
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, float("inf")))
    large = [t.numel() >= 65536 for t in tensors]
    if not any(large):
        return torch.stack(torch._foreach_norm(tensors, float("inf")))
    small = iter(torch._foreach_norm([t for t, big in zip(tensors, large) if not big],
                                     float("inf")) if not all(large) else [])
    out = []
    for t, big in zip(tensors, large):
        if big:
            low, high = torch.aminmax(t)
            out.append(torch.maximum(high.abs(), low.abs()))
        else:
            out.append(next(small))
    return torch.stack(out)


@torch.no_grad()
def put_param_norms(
    params: Sequence[torch.Tensor], indices: Sequence[int], batch: DeviceBatch, field: str
) -> None:
    """Queue the L2 norm of each parameter's values as `field`."""
    if any(is_sharded(p) for p in params):  # FSDP2 shards: combined in one collective
        sharded = [(p, i) for p, i in zip(params, indices) if is_sharded(p)]
        put_sharded_norms([p for p, _ in sharded], [i for _, i in sharded], batch, field)
        kept = [(local_tensor(p), i) for p, i in zip(params, indices) if not is_sharded(p)]
        params, indices = [p for p, _ in kept], [i for _, i in kept]
    for group, group_idx in group_by_device_dtype([p.detach() for p in params], indices):
        batch.put(field, torch.stack(torch._foreach_norm(group, 2)), group_idx)


@torch.no_grad()
def put_stale_grad_norms(
    params: Sequence[torch.Tensor], indices: Sequence[int], batch: DeviceBatch
) -> None:
    """Queue the norm of whatever gradient is already present when a backward pass starts.

    After an optimizer step, a gradient that was cleared is None or all zeros (norm 0); a
    positive norm means the previous step's gradient is still there and the coming backward
    will add onto it.
    """
    # this rank's shard is enough to tell "left over" from "cleared" (no collective here)
    present = [(dense_values(local_tensor(p.grad)), i) for p, i in zip(params, indices)
               if measurable(p.grad)]
    missing = [i for p, i in zip(params, indices) if not measurable(p.grad)]
    if missing:
        batch.put("stale_grad", torch.zeros(len(missing), dtype=torch.float64), missing)
    if present:
        tensors, idx = zip(*present)
        for group, group_idx in group_by_device_dtype(tensors, idx):
            batch.put("stale_grad", torch.stack(torch._foreach_norm(group, 2)), group_idx)


@torch.no_grad()
def put_nonfinite_counts(
    grads: Sequence[torch.Tensor | None], indices: Sequence[int], batch: DeviceBatch
) -> None:
    """Queue the exact count of non-finite elements of each given gradient.

    Called only for gradients whose norm came back non-finite, so healthy steps pay nothing.
    """
    for grad, index in zip(grads, indices):
        if measurable(grad):  # a sharded gradient: this rank's shard is counted
            count = (~torch.isfinite(dense_values(local_tensor(grad)))).sum()
            batch.put("grad_nonfinite", count.reshape(1), [index])
