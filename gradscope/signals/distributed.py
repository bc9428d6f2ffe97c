"""Distributed training: which rank reports, and norms of sharded (DTensor) tensors.

Under DDP every rank holds the same all-reduced gradients, so nothing here is needed. Under
FSDP2 (`torch.distributed.fsdp.fully_shard`) parameters and gradients are DTensors and each rank
holds one shard: a norm is the square root of the sum, over ranks, of each shard's sum of
squares. All shards of one read are gathered in a single collective.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from .transfer import DeviceBatch, group_by_device_dtype, on_device


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed).

    Example:
        >>> rank()
        0
    """
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    """Number of processes in the default process group (1 when not distributed)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_rank_zero() -> bool:
    """True on the process that prints and writes the run log (rank 0, or not distributed).

    Example:
        >>> is_rank_zero()
        True
    """
    return rank() == 0


@functools.lru_cache(maxsize=1)
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


#: Types that are never a DTensor: answered without the (slower) subclass check.
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def is_dtensor(tensor: Any) -> bool:
    """True for a `torch.distributed.tensor.DTensor` (FSDP2 parameters and gradients)."""
    if type(tensor) in _PLAIN_TYPES:  # called per tensor per recorded step
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor whose full value is spread over ranks (sharded or pending a sum).

    Example:
        >>> is_sharded(torch.ones(2))
        False
    """
    if not is_dtensor(tensor):
        return False
    return any(p.is_shard() or p.is_partial() for p in tensor.placements)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor is returned as it is).

    Example:
        >>> t = torch.ones(2); local_tensor(t) is t
        True
    """
    dtensor: Any = tensor  # DTensor's own attributes are not on torch.Tensor's type
    return dtensor.to_local() if is_dtensor(tensor) else tensor


def _without_partial(tensor: Any) -> Any:
    """A DTensor with pending sums (Partial placements) reduced, so shards can be combined."""
    if not any(p.is_partial() for p in tensor.placements):
        return tensor
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in tensor.placements]
    return tensor.redistribute(tensor.device_mesh, placements)


def _local_sumsq_and_max(locals_: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squares and max |x| of each local shard (empty shards give 0), in float64."""
    device = locals_[0].device
    sumsq = torch.zeros(len(locals_), dtype=torch.float64, device=device)
    amax = torch.zeros(len(locals_), dtype=torch.float64, device=device)
    nonempty = [(t, i) for i, t in enumerate(locals_) if t.numel() > 0]
    if nonempty:
        tensors, positions = zip(*nonempty)
        for group, group_pos in group_by_device_dtype(tensors, positions):
            where = on_device(group_pos, device)
            norms = torch.stack(torch._foreach_norm(group, 2)).to(torch.float64)
            maxes = torch.stack(torch._foreach_norm(group, float("inf"))).to(torch.float64)
            sumsq.index_copy_(0, where, norms.square())
            amax.index_copy_(0, where, maxes)
    return sumsq, amax


def _reduce_over_shards(
    sumsq: torch.Tensor, amax: torch.Tensor, mesh: Any, dims: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the squares and take the max over the ranks of each sharded mesh dimension."""
    dist = _dist()
    if dist is None:
        return sumsq, amax
    packed = torch.cat([sumsq, amax])
    n = sumsq.numel()
    for dim in dims:
        group = mesh.get_group(dim)
        parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, packed, group=group)
        stacked = torch.stack(parts)
        packed = torch.cat([stacked[:, :n].sum(0), stacked[:, n:].amax(0)])
    return packed[:n], packed[n:]


@torch.no_grad()
def sharded_norms(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm and max |x| of each full DTensor, from the local shards and one collective.

    Every rank must call it with the same tensors (it is a collective). Tensors on different
    meshes or with different sharded dimensions are reduced in separate groups.

    Example (inside a `torchrun` job with FSDP2):
        >>> norms, maxes = sharded_norms([p.grad for p in model.parameters()])  # doctest: +SKIP
    """
    dtensors = [_without_partial(t) for t in tensors]  # DTensors (their attributes are Any)
    norms: list[torch.Tensor] = [torch.empty(())] * len(tensors)
    maxes = list(norms)
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    meshes: dict[int, Any] = {}
    for position, t in enumerate(dtensors):
        dims = tuple(d for d, p in enumerate(t.placements) if p.is_shard())
        meshes[id(t.device_mesh)] = t.device_mesh
        groups.setdefault((id(t.device_mesh), dims), []).append(position)
    for (mesh_id, dims), positions in groups.items():
        locals_ = [dtensors[p].to_local() for p in positions]
        sumsq, amax = _local_sumsq_and_max(locals_)
        sumsq, amax = _reduce_over_shards(sumsq, amax, meshes[mesh_id], dims)
        for k, p in enumerate(positions):
            norms[p] = sumsq[k].sqrt()
            maxes[p] = amax[k]
    return torch.stack(norms), torch.stack(maxes)


@torch.no_grad()
def put_sharded_grad_stats(
    grads: Sequence[torch.Tensor], indices: Sequence[int], batch: DeviceBatch
) -> None:
    """Queue the full L2 norm and max |grad| of sharded gradients (one collective in all)."""
    if not grads:
        return
    norms, maxes = sharded_norms(grads)
    batch.put("grad_norm", norms, list(indices))
    batch.put("grad_max", maxes, list(indices))


@torch.no_grad()
def put_sharded_norms(
    tensors: Sequence[torch.Tensor], indices: Sequence[int], batch: DeviceBatch, field: str
) -> None:
    """Queue the full L2 norm of sharded tensors (e.g. FSDP2 parameters) as `field`."""
    if not tensors:
        return
    norms, _ = sharded_norms([t.detach() for t in tensors])
    batch.put(field, norms, list(indices))


__all__ = [
    "is_dtensor",
    "is_rank_zero",
    "is_sharded",
    "local_tensor",
    "put_sharded_grad_stats",
    "put_sharded_norms",
    "rank",
    "sharded_norms",
    "world_size",
]
