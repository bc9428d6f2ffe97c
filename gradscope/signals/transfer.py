"""Collect on-device statistics during a step and bring them to the host in one transfer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch


class DeviceBatch:
    """Named device tensors waiting for the step's single device-to-host transfer.

    Example:
        >>> batch = DeviceBatch()
        >>> batch.put("norm", torch.tensor([3.0, 4.0]), indices=[2, 0])
        >>> batch.fetch({"norm": 3})["norm"].tolist()
        [4.0, nan, 3.0]
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, Sequence[int] | None, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._items)

    def put(self, field: str, tensor: torch.Tensor, indices: Sequence[int] | None = None) -> None:
        """Queue `tensor` (flattened) as `field`, optionally scattered to `indices`."""
        if tensor.dim() != 1 or tensor.requires_grad:  # most callers queue plain 1-D results
            tensor = tensor.detach().reshape(-1)
        self._items.append((field, indices, tensor))

    def fetch(self, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Transfer everything (one copy per device) and assemble the fields.

        Fields with indices become arrays of length `sizes[field]` (missing entries NaN);
        fields without indices are the concatenation of what was put.
        """
        items = self._items
        device = items[0][2].device if items else None
        if any(t.device != device for _, _, t in items):
            host = self._transfer_by_device()
        else:
            host = self._transfer(range(len(items)), device)
        out = self._assemble(host, sizes or {})
        self._items.clear()
        return out

    def _transfer(self, positions: Sequence[int],
                  device: torch.device | None) -> list[np.ndarray | None]:
        """The values of the items at `positions` (all on `device`) as float64 host arrays
        (float32 from MPS), one copy to the host; None at the other positions."""
        host: list[np.ndarray | None] = [None] * len(self._items)
        if device is None:
            return host
        dtype = torch.float32 if device.type == "mps" else torch.float64
        # parts of another dtype are concatenated first (one cast per dtype, not one per
        # part); parts already of the transfer's dtype go into the final concatenation as
        # they are
        groups: dict[torch.dtype, list[int]] = {}
        for p in positions:
            groups.setdefault(self._items[p][2].dtype, []).append(p)
        parts: list[torch.Tensor] = []
        order: list[int] = []
        for kind, members in groups.items():
            tensors = [self._items[p][2] for p in members]
            if kind == dtype:
                parts.extend(tensors)
            else:
                parts.append((torch.cat(tensors) if len(tensors) > 1 else tensors[0]).to(dtype))
            order.extend(members)
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        values = flat.to("cpu").numpy() if device.type != "cpu" else flat.numpy()
        offset = 0
        for p in order:
            size = self._items[p][2].numel()
            host[p] = values[offset : offset + size]
            offset += size
        return host

    def _transfer_by_device(self) -> list[np.ndarray | None]:
        """As `_transfer`, for items on several devices: one copy per device."""
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for position, (_, _, tensor) in enumerate(self._items):
            by_device[tensor.device].append(position)
        host: list[np.ndarray | None] = [None] * len(self._items)
        for device, positions in by_device.items():
            for p, values in enumerate(self._transfer(positions, device)):
                if values is not None:
                    host[p] = values
        return host

    def _assemble(self, host: list[np.ndarray | None],
                  sizes: dict[str, int]) -> dict[str, np.ndarray]:
        """The fields from the items' host values, in the order they were put."""
        out: dict[str, np.ndarray] = {}
        pieces: dict[str, list[np.ndarray]] = {}
        for (field, indices, _), values in zip(self._items, host):
            if values is None:
                continue
            if indices is None:
                pieces.setdefault(field, []).append(values)
                continue
            target = out.get(field)
            if target is None:
                target = out[field] = _nans(sizes.get(field, 0))
            target[np.asarray(indices, dtype=np.int64)] = values
        for field, chunks in pieces.items():
            # a copy either way: no field is a view of another
            out[field] = np.concatenate(chunks) if len(chunks) > 1 else chunks[0].copy()
        return out


K = TypeVar("K")
V = TypeVar("V")


def kept(cache: dict[K, V], key: K, make: Callable[[], V], limit: int = 64) -> V:
    """`cache[key]`, made by `make()` the first time it is asked for; a cache grown past
    `limit` keys is emptied first (a few keys are all a run uses).

    Example:
        >>> cache: dict[int, list[int]] = {}
        >>> kept(cache, 3, lambda: [0] * 3) is kept(cache, 3, lambda: [])
        True
    """
    found = cache.get(key)
    if found is None:
        if len(cache) > limit:
            cache.clear()
        found = cache[key] = make()
    return found


_nan_rows: dict[int, np.ndarray] = {}


def _nans(size: int) -> np.ndarray:
    """A new float64 array of `size` NaNs (copied from one kept per size)."""
    return kept(_nan_rows, size, lambda: np.full(size, np.nan)).copy()


def on_device(values: list | torch.Tensor, device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small host-made tensor (e.g. row indices) on `device` without a blocking copy.

    A plain copy from pageable host memory to a CUDA device synchronises the stream; a
    copy from pinned memory with non_blocking=True does not.

    Example:
        >>> on_device([2, 0], torch.device("cpu")).tolist()
        [2, 0]
    """
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def group_by_device_dtype(
    tensors: Sequence[torch.Tensor], indices: Sequence[int]
) -> list[tuple[list[torch.Tensor], list[int]]]:
    """Split tensors into (device, dtype) groups, as foreach kernels need.

    Example:
        >>> pair = [torch.ones(2), torch.ones(2, dtype=torch.float64)]
        >>> groups = group_by_device_dtype(pair, [0, 1])
        >>> [idx for _, idx in groups]
        [[0], [1]]
    """
    if not tensors:
        return []
    device, dtype = tensors[0].device, tensors[0].dtype
    if all(t.dtype == dtype and t.device == device for t in tensors):  # the common case
        return [(list(tensors), list(indices))]
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
    for tensor, index in zip(tensors, indices):
        key = (tensor.device, tensor.dtype)
        group = groups.setdefault(key, ([], []))
        group[0].append(tensor)
        group[1].append(index)
    return list(groups.values())
