"""Update size per optimizer step, from a fixed sample of elements instead of a weight copy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
    "changed" flag combines the tensor's version counter (no write => unchanged, exactly)
    with the sampled difference and the full-tensor norm, both computed on the device.
    """

    def __init__(self, params: Sequence[torch.Tensor], sample_size: int) -> None:
        self._params = list(params)
        self._sample = [sample_indices(p.numel(), sample_size, p.device) for p in self._params]
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _values(self, index: int) -> torch.Tensor:
        flat = self._params[index].detach().reshape(-1)
        sample = self._sample[index]
        values = flat if sample is None else flat.index_select(0, sample)
        return values.to(torch.float64, copy=True)

    @torch.no_grad()
    def before(self, indices: Sequence[int]) -> None:
        for i in indices:
            p = self._params[i]
            norm = torch.linalg.vector_norm(p.detach(), dtype=torch.float64)
            self._before[i] = (self._values(i), norm, p._version)

    @torch.no_grad()
    def after(self, indices: Sequence[int], batch: DeviceBatch) -> list[int]:
        """Queue update ratios and change flags; return indices whose version did not move."""
        untouched = []
        for i in indices:
            if i not in self._before:
                continue
            old_values, old_norm, old_version = self._before.pop(i)
            p = self._params[i]
            if p._version == old_version:
                untouched.append(i)
                continue
            new_values = self._values(i)
            diff = torch.linalg.vector_norm(new_values - old_values)
            base = torch.linalg.vector_norm(old_values)
            ratio = diff / base.clamp_min(torch.finfo(torch.float64).tiny)
            new_norm = torch.linalg.vector_norm(p.detach(), dtype=torch.float64)
            changed = (diff > 0) | (new_norm != old_norm)
            batch.put("update_ratio", ratio.reshape(1), [i])
            batch.put("changed", changed.to(torch.float64).reshape(1), [i])
        return untouched

    def reset(self) -> None:
        self._before.clear()


__all__ = ["UpdateTracker", "put_param_norms", "sample_indices"]
