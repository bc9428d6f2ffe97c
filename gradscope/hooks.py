"""Registering hooks so that each one is removable (see gradscope.guard for their safety)."""

from __future__ import annotations

import contextlib

from torch.utils.hooks import RemovableHandle

from .guard import Guard  # its former home: still importable from here


class HookSet:
    """Owns hook handles; `remove()` takes every one of them off, even after partial failure.

    Example:
        >>> import torch
        >>> hooks = HookSet()
        >>> m = torch.nn.Linear(1, 1)
        >>> hooks.add(m.register_forward_hook(lambda *a: None))
        >>> hooks.remove(); len(m._forward_hooks)
        0
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            with contextlib.suppress(Exception):  # removal must go on for every other handle
                handle.remove()

__all__ = ["Guard", "HookSet"]
