"""Guard: runs gradscope's code inside training so that an error never stops training.

An exception switches that piece off, is warned about once, and training goes on.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from .errors import GradscopeWarning


class Guard:
    """Runs gradscope's hook bodies; an exception switches that piece off and is warned once.

    Example:
        >>> guard = Guard()
        >>> def broken(): raise ValueError("boom")
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     guard.call("activations", broken)
        >>> guard.is_off("activations")
        True
    """

    def __init__(self, kind: str = "signal") -> None:
        self._kind = kind  # what a piece is, for the warning ("signal", "callback step")
        self._off: dict[str, str] = {}

    def is_off(self, piece: str) -> bool:
        return piece in self._off

    @property
    def switched_off(self) -> dict[str, str]:
        """The live dict of the pieces switched off (by piece): for a hook that guards
        itself as `wrap` does (`piece in guard.switched_off`, then `guard.fail`)."""
        return self._off

    @property
    def failures(self) -> dict[str, str]:
        """The pieces switched off, with the error that switched each off."""
        return dict(self._off)

    def call(self, piece: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if piece in self._off:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # gradscope must never stop training
            self._fail(piece, err)
            return None

    def _fail(self, piece: str, err: Exception) -> None:
        """Switch `piece` off and warn once."""
        self._off[piece] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"gradscope: the '{piece}' {self._kind} failed ({type(err).__name__}: {err}) "
            "and is switched off for the rest of this run; training is not affected.",
            GradscopeWarning,
            stacklevel=3,
        )

    #: Switch `piece` off and warn once, from a hook that guards itself (the same warning
    #: location as a `wrap`ped hook's: the hook's caller).
    fail = _fail

    def wrap(self, piece: str, fn: Callable[..., Any]) -> Callable[..., None]:
        """A hook that calls `fn` under this guard and always returns None (never alters values)."""

        off = self._off

        @functools.wraps(fn)
        def hook(*args: Any, **kwargs: Any) -> None:
            if piece in off:  # the common case without a second call (hooks run per module)
                return
            try:
                fn(*args, **kwargs)
            except Exception as err:  # gradscope must never stop training
                self._fail(piece, err)

        return hook
