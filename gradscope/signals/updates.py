"""Update size per optimizer step, from a fixed sample of elements instead of a weight copy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .distributed import local_tensor
from .grads import put_param_norms
from .transfer import DeviceBatch


def sample_indices(numel: int, size: int, device: torch.device) -> torch.Tensor | None:
    """Evenly spaced element indices (no RNG touched); None when the whole tensor is small.

    Example:
        >>> sample_indices(10, 4, torch.device("cpu")).tolist()
        [0, 3, 6, 9]
    """
    if numel <= size:
        return None
    return torch.linspace(0, numel - 1, size, device=device).round().long()


class UpdateTracker:
    """Measures ||w_after - w_before|| / ||w_before|| on a sample, and whether w changed at all.

    `before()` runs in the optimizer's step pre-hook, `after()` in its post-hook. The exact
    "changed" flag combines the sampled difference with the full-tensor norm, both computed
    on the device (the version counter is no proof: fused optimizer kernels do not move it).
    """

    def __init__(self, params: Sequence[torch.Tensor], sample_size: int) -> None:
        self._params = list(params)
        # a sharded (FSDP2) parameter is measured on this rank's shard: a sample all the same
        self._sample = [sample_indices(local_tensor(p).numel(), sample_size, p.device)
                        for p in self._params]
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _values(self, index: int) -> torch.Tensor:
        flat = local_tensor(self._params[index]).detach().reshape(-1)
        sample = self._sample[index]
        values = flat if sample is None else flat.index_select(0, sample)
        return values.to(torch.float64, copy=True)

    @torch.no_grad()
    def before(self, indices: Sequence[int]) -> None:
        for i in indices:
            p = self._params[i]
            if local_tensor(p).numel() == 0:  # an empty shard: nothing to measure here
                continue
            norm = torch.linalg.vector_norm(local_tensor(p).detach(), dtype=torch.float64)
            self._before[i] = (self._values(i), norm, p._version)

    @torch.no_grad()
    def after(self, indices: Sequence[int], batch: DeviceBatch) -> list[int]:
        """Queue update ratios and change flags; return the indices known unchanged without
        measuring (always empty now that every tensor is measured; kept for callers)."""
        untouched: list[int] = []
        for i in indices:
            if i not in self._before:
                continue
            old_values, old_norm, _ = self._before.pop(i)
            p = self._params[i]
            # An unmoved version counter does not prove "unchanged": fused optimizer kernels
            # (e.g. AdamW(fused=True)) write in place without bumping it. Measure every time.
            new_values = self._values(i)
            diff = torch.linalg.vector_norm(new_values - old_values)
            base = torch.linalg.vector_norm(old_values)
            # ||w_before|| = 0 (e.g. a zero-initialised bias): the ratio is undefined (NaN) if
            # the values moved, and 0 if they did not
            undefined = torch.where(diff > 0, torch.nan, 0.0)
            ratio = torch.where(base > 0, diff / base.clamp_min(torch.finfo(torch.float64).tiny),
                                undefined.to(diff))
            new_norm = torch.linalg.vector_norm(local_tensor(p).detach(), dtype=torch.float64)
            changed = (diff > 0) | (new_norm != old_norm)
            batch.put("update_ratio", ratio.reshape(1), [i])
            batch.put("changed", changed.to(torch.float64).reshape(1), [i])
        return untouched

    def reset(self) -> None:
        self._before.clear()


__all__ = ["UpdateTracker", "put_param_norms", "sample_indices"]
