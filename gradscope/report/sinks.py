"""The reporters a Scope feeds while training runs (live view, run log), made from its options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..scope import Scope


def make_sinks(scope: Scope) -> list[Any]:
    """Build the sinks asked for by `scope.options` (each has on_record() and on_close())."""
    sinks: list[Any] = []
    return sinks
